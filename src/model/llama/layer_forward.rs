//! One decoder layer's forward (training, recompute and inference with a KV cache) and the
//! projections with their LoRA branch.

use super::activations::{LayerActs, LoraActs};
use super::{KvCache, LinCtx, Llama, v, vm};
use crate::backend::Backend;
use crate::backend::{AttnShape, CachedAttnShape, GemmShape, RopeShape, RowShape};
use crate::model::lora::{Proj, dropout_key};
use anyhow::{Result, ensure};

impl<B: Backend> Llama<B> {
    /// One decoder layer's forward: `la =` everything its backward reads, `next =` (when given)
    /// the residual stream after the layer, from its input `x`. With a KV cache, this layer's new
    /// keys/values are appended at `past` and attention runs over the cache (inference only).
    pub(super) fn layer_forward(
        &self,
        la: &mut LayerActs<B>,
        x: &B::Buf,
        mut next: Option<&mut B::Buf>,
        ctx: &LinCtx,
        (b, t, past): (usize, usize, usize),
        cache: Option<&mut KvCache<B>>,
    ) -> Result<()> {
        let be = &*self.backend;
        let cfg = &self.config;
        let (li, n) = (ctx.li, ctx.n);
        let ll = &self.layers[li];
        let (c, h, hkv, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        be.rmsnorm_forward(
            vm(be, &mut la.ln1),
            vm(be, &mut la.rstd1),
            v(be, x),
            self.p(ll.ln1),
            RowShape { n, c },
            cfg.rms_norm_eps,
        );
        let [lq, lk, lv, lo, lg, lu, ld] = &mut la.lora;
        self.linear_forward(Some(&mut la.q), 0.0, &la.ln1, lq.as_mut(), Proj::Q, ctx)?;
        self.linear_forward(Some(&mut la.k), 0.0, &la.ln1, lk.as_mut(), Proj::K, ctx)?;
        self.linear_forward(Some(&mut la.v), 0.0, &la.ln1, lv.as_mut(), Proj::V, ctx)?;
        if ctx.train {
            ensure!(cache.is_none(), "a training forward takes no KV cache");
            be.attention_rope_forward(
                vm(be, &mut la.att),
                vm(be, &mut la.lse),
                &mut la.q,
                &mut la.k,
                v(be, &la.v),
                AttnShape { b, t, h, hkv, d }.with_rope(cfg.rope_theta, past),
            );
        } else {
            let qkv = (&mut la.q, &mut la.k, &la.v);
            self.attention_inference(qkv, &mut la.att, &mut la.lse, (b, t, past), li, cache);
        }
        be.copy(vm(be, &mut la.resid_mid), v(be, x));
        self.linear_forward(
            Some(&mut la.resid_mid),
            1.0,
            &la.att,
            lo.as_mut(),
            Proj::O,
            ctx,
        )?;
        be.rmsnorm_forward(
            vm(be, &mut la.ln2),
            vm(be, &mut la.rstd2),
            v(be, &la.resid_mid),
            self.p(ll.ln2),
            RowShape { n, c },
            cfg.rms_norm_eps,
        );
        self.linear_forward(
            Some(&mut la.gate),
            0.0,
            &la.ln2,
            lg.as_mut(),
            Proj::Gate,
            ctx,
        )?;
        self.linear_forward(Some(&mut la.up), 0.0, &la.ln2, lu.as_mut(), Proj::Up, ctx)?;
        be.swiglu_forward(vm(be, &mut la.hid), v(be, &la.gate), v(be, &la.up));
        // A recompute passes no `next`: the down projection's output (the next layer's input) is
        // not needed again, only its LoRA intermediates are.
        if let Some(next) = next.as_deref_mut() {
            be.copy(vm(be, next), v(be, &la.resid_mid));
        }
        self.linear_forward(next, 1.0, &la.hid, ld.as_mut(), Proj::Down, ctx)?;
        Ok(())
    }

    /// Inference attention of one layer (`forward_logits`, generation): RoPE on `la.q`/`la.k` in
    /// place, the new keys/values appended to the cache (when given), then causal attention over
    /// this step's keys, or over the cache when it already holds `past > 0` positions.
    pub(super) fn attention_inference(
        &self,
        (q, k, vb): (&mut B::Buf, &mut B::Buf, &B::Buf),
        att: &mut B::Buf,
        lse: &mut B::Buf,
        (b, t, past): (usize, usize, usize),
        li: usize,
        mut cache: Option<&mut KvCache<B>>,
    ) {
        let be = &*self.backend;
        let cfg = &self.config;
        let (h, hkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let kvd = hkv * d;
        be.rope_forward(
            vm(be, q),
            RopeShape {
                b,
                t,
                h,
                d,
                theta: cfg.rope_theta,
                pos_offset: past,
            },
        );
        be.rope_forward(
            vm(be, k),
            RopeShape {
                b,
                t,
                h: hkv,
                d,
                theta: cfg.rope_theta,
                pos_offset: past,
            },
        );
        if let Some(kc) = cache.as_deref_mut() {
            // Rows past..past+t of each sequence's cache = the new keys/values.
            let tmax = kc.tmax;
            for bi in 0..b {
                let src = bi * t * kvd..(bi + 1) * t * kvd;
                let dst = (bi * tmax + past) * kvd..(bi * tmax + past + t) * kvd;
                be.copy(
                    be.view_mut(&mut kc.k[li], dst.clone()),
                    be.view(k, src.clone()),
                );
                be.copy(be.view_mut(&mut kc.v[li], dst), be.view(vb, src));
            }
        }
        match cache.as_deref() {
            Some(kc) if past > 0 => be.attention_cached_forward(
                vm(be, att),
                v(be, q),
                v(be, &kc.k[li]),
                v(be, &kc.v[li]),
                CachedAttnShape {
                    b,
                    tq: t,
                    past,
                    tmax: kc.tmax,
                    h,
                    hkv,
                    d,
                },
            ),
            _ => be.attention_forward(
                vm(be, att),
                vm(be, lse),
                v(be, q),
                v(be, k),
                v(be, vb),
                AttnShape { b, t, h, hkv, d },
            ),
        }
    }

    pub(super) fn linear_forward(
        &self,
        mut out: Option<&mut B::Buf>,
        beta: f32,
        x: &B::Buf,
        lora_acts: Option<&mut LoraActs<B>>,
        proj: Proj,
        ctx: &LinCtx,
    ) -> Result<()> {
        let pl = &self.layers[ctx.li].proj[proj.index()];
        let be = &*self.backend;
        let n = ctx.n;
        // out[n,out] (+)= x[n,in] · W[out,in]ᵀ (no `out`: only the LoRA intermediates)
        if let Some(out) = out.as_deref_mut() {
            be.matmul(
                vm(be, out),
                v(be, x),
                self.p(pl.w),
                GemmShape::nt(n, pl.out, pl.inp),
                1.0,
                beta,
            );
        }
        if let (Some((a, bl)), Some(la)) = (pl.lora, lora_acts) {
            let lora = self.lora().expect("LoRA locs imply a LoRA config");
            let (r, s) = (lora.r, lora.scaling());
            let xin = if ctx.dropout {
                let xd = la.xd.as_mut().expect("dropout buffers allocated");
                be.copy(vm(be, xd), v(be, x));
                be.dropout(vm(be, xd), lora.dropout, dropout_key(ctx.key, ctx.li, proj));
                &*xd
            } else {
                x
            };
            // xa[n,r] = x_d · Aᵀ;  out += s · xa · Bᵀ
            be.matmul(
                vm(be, &mut la.xa),
                v(be, xin),
                self.p(a),
                GemmShape::nt(n, r, pl.inp),
                1.0,
                0.0,
            );
            if let Some(out) = out {
                be.matmul(
                    vm(be, out),
                    v(be, &la.xa),
                    self.p(bl),
                    GemmShape::nt(n, pl.out, r),
                    s,
                    1.0,
                );
            }
        }
        Ok(())
    }
}
