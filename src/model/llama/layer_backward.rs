//! One decoder layer's backward, the RMSNorm and projection backwards, LoRA included.

use super::activations::{BackwardBufs, LayerActs, LoraActs, LoraScratch};
use super::{LayerLocs, LinCtx, Llama, ProjLocs, v, vm};
use crate::backend::Backend;
use crate::model::lora::{Proj, dropout_key};
use crate::model::params::Loc;
use anyhow::Result;

impl<B: Backend> Llama<B> {
    /// One decoder layer's backward from `bw.dres` = the gradient of its output: `bw.dres +=`
    /// the gradient through the layer to its input `x`; `grads +=` the layer's trainable tensors.
    /// `la` holds what the layer's forward (or its recompute) saved.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_backward(
        &self,
        la: &LayerActs<B>,
        x: &B::Buf,
        ll: &LayerLocs,
        ctx: &LinCtx,
        (b, t): (usize, usize),
        bw: &mut BackwardBufs<B>,
        grads: &mut B::Buf,
    ) -> Result<()> {
        let be = &*self.backend;
        let cfg = &self.config;
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
            &la.hid,
            ld.as_ref(),
            &ll.proj[6],
            Proj::Down,
            ctx,
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
            &la.ln2,
            lg.as_ref(),
            &ll.proj[4],
            Proj::Gate,
            ctx,
            grads,
            &mut bw.scratch,
        )?;
        self.linear_backward(
            &mut bw.dln,
            1.0,
            &bw.dup,
            &la.ln2,
            lu.as_ref(),
            &ll.proj[5],
            Proj::Up,
            ctx,
            grads,
            &mut bw.scratch,
        )?;
        self.norm_backward(bw, grads, &la.resid_mid, &la.rstd2, ll.ln2, n);
        // Attention: resid_mid = resid_in + o(attn(rope(q(ln1)), rope(k(ln1)), v(ln1)))
        self.linear_backward(
            &mut bw.datt,
            0.0,
            &bw.dres,
            &la.att,
            lo.as_ref(),
            &ll.proj[3],
            Proj::O,
            ctx,
            grads,
            &mut bw.scratch,
        )?;
        be.attention_rope_backward(
            &mut bw.dq,
            &mut bw.dk,
            vm(be, &mut bw.dv),
            v(be, &bw.datt),
            v(be, &la.q),
            v(be, &la.k),
            v(be, &la.v),
            v(be, &la.att),
            v(be, &la.lse),
            b,
            t,
            h,
            hkv,
            d,
            cfg.rope_theta,
            0,
        );
        self.linear_backward(
            &mut bw.dln,
            0.0,
            &bw.dq,
            &la.ln1,
            lq.as_ref(),
            &ll.proj[0],
            Proj::Q,
            ctx,
            grads,
            &mut bw.scratch,
        )?;
        self.linear_backward(
            &mut bw.dln,
            1.0,
            &bw.dk,
            &la.ln1,
            lk.as_ref(),
            &ll.proj[1],
            Proj::K,
            ctx,
            grads,
            &mut bw.scratch,
        )?;
        self.linear_backward(
            &mut bw.dln,
            1.0,
            &bw.dv,
            &la.ln1,
            lv.as_ref(),
            &ll.proj[2],
            Proj::V,
            ctx,
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
            v(be, x),
            self.p(w),
            v(be, rstd),
            n,
            self.config.hidden_size,
        );
    }

    /// For `y = x·Wᵀ (+ s·x_d·Aᵀ·Bᵀ)` given `dy`: `dx (beta)=` the input gradient; `grads +=` the
    /// weight gradients of the trainable tensors among W, A, B.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_backward(
        &self,
        dx: &mut B::Buf,
        dx_beta: f32,
        dy: &B::Buf,
        x: &B::Buf,
        lora_acts: Option<&LoraActs<B>>,
        pl: &ProjLocs,
        proj: Proj,
        ctx: &LinCtx,
        grads: &mut B::Buf,
        scratch: &mut LoraScratch<B>,
    ) -> Result<()> {
        let be = &*self.backend;
        let n = ctx.n;
        if pl.w.trainable() {
            // dW[out,in] += dyᵀ · x
            be.matmul(
                be.view_mut(grads, pl.w.range()),
                v(be, dy),
                v(be, x),
                pl.out,
                pl.inp,
                n,
                true,
                false,
                1.0,
                1.0,
            );
        }
        // dx[n,in] (beta)= dy · W
        be.matmul(
            vm(be, dx),
            v(be, dy),
            self.p(pl.w),
            n,
            pl.inp,
            pl.out,
            false,
            false,
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
                pl.out,
                r,
                n,
                true,
                false,
                s,
                1.0,
            );
            // dxa[n,r] = s · dy · B
            be.matmul(
                be.view_mut(&mut scratch.dxa, dxa_range.clone()),
                v(be, dy),
                self.p(bl),
                n,
                r,
                pl.out,
                false,
                false,
                s,
                0.0,
            );
            // dA[r,in] += dxaᵀ · x_d
            be.matmul(
                be.view_mut(grads, a.range()),
                be.view(&scratch.dxa, dxa_range.clone()),
                v(be, xin),
                r,
                pl.inp,
                n,
                true,
                false,
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
                    n,
                    pl.inp,
                    r,
                    false,
                    false,
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
                    n,
                    pl.inp,
                    r,
                    false,
                    false,
                    1.0,
                    1.0,
                );
            }
        }
        Ok(())
    }
}
