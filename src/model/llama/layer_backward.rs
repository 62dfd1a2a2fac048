//! One decoder layer's backward, the RMSNorm and projection backwards, LoRA included.

use super::activations::{BackwardBufs, LayerActs, LoraActs, LoraScratch};
use super::{LinCtx, Llama, v, vm};
use crate::backend::Backend;
use crate::backend::{AttnSaved, AttnShape, GemmShape, RmsNormSaved, RowShape};
use crate::model::lora::{Proj, dropout_key};
use crate::model::params::Loc;
use anyhow::Result;

/// What one projection's backward re-reads: the call's context, which projection, its input `x`
/// and the LoRA intermediates its forward saved (`None` without an adapter on it).
pub(super) struct LinSaved<'a, B: Backend> {
    pub(super) ctx: &'a LinCtx,
    pub(super) proj: Proj,
    pub(super) x: &'a B::Buf,
    pub(super) lora: Option<&'a LoraActs<B>>,
}

impl<B: Backend> Llama<B> {
    /// One decoder layer's backward from `bw.dres` = the gradient of its output: `bw.dres +=`
    /// the gradient through the layer to its input `x`; `grads +=` the layer's trainable tensors.
    /// `la` holds what the layer's forward (or its recompute) saved.
    pub(super) fn layer_backward(
        &self,
        la: &LayerActs<B>,
        x: &B::Buf,
        ctx: &LinCtx,
        (b, t): (usize, usize),
        bw: &mut BackwardBufs<B>,
        grads: &mut B::Buf,
    ) -> Result<()> {
        let be = &*self.backend;
        let cfg = &self.config;
        let ll = &self.layers[ctx.li];
        let (n, h, hkv, d) = (
            ctx.n,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let [lq, lk, lv, lo, lg, lu, ld] = &la.lora;
        // MLP: next = resid_mid + down(swiglu(gate(ln2), up(ln2)))
        self.linear_backward(
            &mut bw.dhid,
            0.0,
            &bw.dres,
            LinSaved {
                ctx,
                proj: Proj::Down,
                x: &la.hid,
                lora: ld.as_ref(),
            },
            grads,
            &mut bw.scratch,
        )?;
        be.swiglu_backward(
            vm(be, &mut bw.dgate),
            vm(be, &mut bw.dup),
            v(be, &bw.dhid),
            v(be, &la.gate),
            v(be, &la.up),
        );
        self.linear_backward(
            &mut bw.dln,
            0.0,
            &bw.dgate,
            LinSaved {
                ctx,
                proj: Proj::Gate,
                x: &la.ln2,
                lora: lg.as_ref(),
            },
            grads,
            &mut bw.scratch,
        )?;
        self.linear_backward(
            &mut bw.dln,
            1.0,
            &bw.dup,
            LinSaved {
                ctx,
                proj: Proj::Up,
                x: &la.ln2,
                lora: lu.as_ref(),
            },
            grads,
            &mut bw.scratch,
        )?;
        self.norm_backward(bw, grads, &la.resid_mid, &la.rstd2, ll.ln2, n);
        // Attention: resid_mid = resid_in + o(attn(rope(q(ln1)), rope(k(ln1)), v(ln1)))
        self.linear_backward(
            &mut bw.datt,
            0.0,
            &bw.dres,
            LinSaved {
                ctx,
                proj: Proj::O,
                x: &la.att,
                lora: lo.as_ref(),
            },
            grads,
            &mut bw.scratch,
        )?;
        be.attention_rope_backward(
            &mut bw.dq,
            &mut bw.dk,
            vm(be, &mut bw.dv),
            v(be, &bw.datt),
            AttnSaved {
                q: v(be, &la.q),
                k: v(be, &la.k),
                v: v(be, &la.v),
                out: v(be, &la.att),
                lse: v(be, &la.lse),
            },
            AttnShape { b, t, h, hkv, d }.with_rope(cfg.rope_theta, 0),
        );
        self.linear_backward(
            &mut bw.dln,
            0.0,
            &bw.dq,
            LinSaved {
                ctx,
                proj: Proj::Q,
                x: &la.ln1,
                lora: lq.as_ref(),
            },
            grads,
            &mut bw.scratch,
        )?;
        self.linear_backward(
            &mut bw.dln,
            1.0,
            &bw.dk,
            LinSaved {
                ctx,
                proj: Proj::K,
                x: &la.ln1,
                lora: lk.as_ref(),
            },
            grads,
            &mut bw.scratch,
        )?;
        self.linear_backward(
            &mut bw.dln,
            1.0,
            &bw.dv,
            LinSaved {
                ctx,
                proj: Proj::V,
                x: &la.ln1,
                lora: lv.as_ref(),
            },
            grads,
            &mut bw.scratch,
        )?;
        self.norm_backward(bw, grads, x, &la.rstd1, ll.ln1, n);
        Ok(())
    }

    /// `bw.dres += ∂/∂x` of `rmsnorm(x, w)` given `bw.dln`; `grads[w] +=` when `w` trains.
    pub(super) fn norm_backward(
        &self,
        bw: &mut BackwardBufs<B>,
        grads: &mut B::Buf,
        x: &B::Buf,
        rstd: &B::Buf,
        w: Loc,
        n: usize,
    ) {
        let be = &*self.backend;
        let dw = if w.trainable() {
            be.view_mut(grads, w.range())
        } else {
            // A frozen weight's gradient goes to scratch (the op always writes one).
            vm(be, &mut bw.dnorm_scratch)
        };
        be.rmsnorm_backward(
            vm(be, &mut bw.dres),
            dw,
            v(be, &bw.dln),
            RmsNormSaved {
                x: v(be, x),
                w: self.p(w),
                rstd: v(be, rstd),
            },
            RowShape {
                n,
                c: self.config.hidden_size,
            },
        );
    }

    /// For `y = x·Wᵀ (+ s·x_d·Aᵀ·Bᵀ)` given `dy`: `dx (beta)=` the input gradient; `grads +=` the
    /// weight gradients of the trainable tensors among W, A, B; `saved` names the projection and
    /// what its forward read.
    pub(super) fn linear_backward(
        &self,
        dx: &mut B::Buf,
        dx_beta: f32,
        dy: &B::Buf,
        saved: LinSaved<'_, B>,
        grads: &mut B::Buf,
        scratch: &mut LoraScratch<B>,
    ) -> Result<()> {
        let LinSaved {
            ctx,
            proj,
            x,
            lora: lora_acts,
        } = saved;
        let pl = &self.layers[ctx.li].proj[proj.index()];
        let be = &*self.backend;
        let n = ctx.n;
        if pl.w.trainable() {
            // dW[out,in] += dyᵀ · x
            be.matmul(
                be.view_mut(grads, pl.w.range()),
                v(be, dy),
                v(be, x),
                GemmShape::tn(pl.out, pl.inp, n),
                1.0,
                1.0,
            );
        }
        // dx[n,in] (beta)= dy · W
        be.matmul(
            vm(be, dx),
            v(be, dy),
            self.p(pl.w),
            GemmShape::nn(n, pl.inp, pl.out),
            1.0,
            dx_beta,
        );
        if let (Some((a, bl)), Some(la)) = (pl.lora, lora_acts) {
            let lora = self.lora().expect("LoRA locs imply a LoRA config");
            let (r, s) = (lora.r, lora.scaling());
            let xin = if ctx.dropout {
                la.xd.as_ref().expect("dropout buffers allocated")
            } else {
                x
            };
            let dxa_range = 0..n * r;
            // dB[out,r] += s · dyᵀ · xa
            be.matmul(
                be.view_mut(grads, bl.range()),
                v(be, dy),
                v(be, &la.xa),
                GemmShape::tn(pl.out, r, n),
                s,
                1.0,
            );
            // dxa[n,r] = s · dy · B
            be.matmul(
                be.view_mut(&mut scratch.dxa, dxa_range.clone()),
                v(be, dy),
                self.p(bl),
                GemmShape::nn(n, r, pl.out),
                s,
                0.0,
            );
            // dA[r,in] += dxaᵀ · x_d
            be.matmul(
                be.view_mut(grads, a.range()),
                be.view(&scratch.dxa, dxa_range.clone()),
                v(be, xin),
                GemmShape::tn(r, pl.inp, n),
                1.0,
                1.0,
            );
            if ctx.dropout {
                // dx += mask ⊙ (dxa · A) / (1-p), the same mask as the forward.
                let buf = scratch
                    .dxd
                    .get_mut(&pl.inp)
                    .expect("scratch per input width");
                be.matmul(
                    vm(be, buf),
                    be.view(&scratch.dxa, dxa_range),
                    self.p(a),
                    GemmShape::nn(n, pl.inp, r),
                    1.0,
                    0.0,
                );
                be.dropout(
                    vm(be, buf),
                    lora.dropout,
                    dropout_key(ctx.key, ctx.li, proj),
                );
                be.axpy(vm(be, dx), 1.0, v(be, buf));
            } else {
                // dx[n,in] += dxa · A
                be.matmul(
                    vm(be, dx),
                    be.view(&scratch.dxa, dxa_range),
                    self.p(a),
                    GemmShape::nn(n, pl.inp, r),
                    1.0,
                    1.0,
                );
            }
        }
        Ok(())
    }
}
