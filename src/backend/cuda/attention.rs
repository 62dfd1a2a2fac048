//! Causal GQA attention with RoPE applied as q and k are loaded (`kernels/attention.cu`; CPU
//! reference `crate::ops::attention` after `crate::ops::rope`): flash-style tiles, an online
//! softmax forward, and a deterministic two-kernel backward (dk/dv per key tile, then dq per
//! query tile; no atomics).

use super::CudaBackend;
use super::grid;
use super::launch::{KArg, check_args, kargs, native};
use super::view::{DView, DViewMut};
use crate::backend::{AttnRopeShape, AttnSaved, AttnShape};
use anyhow::{Result, ensure};

fn check_heads(h: usize, hkv: usize, d: usize) -> Result<()> {
    ensure!(
        d == 64 || d == 128,
        "attention: head dim {d} unsupported (64 or 128)"
    );
    ensure!(
        hkv > 0 && h.is_multiple_of(hkv),
        "attention: {h} heads not a multiple of {hkv} kv heads"
    );
    Ok(())
}

impl CudaBackend {
    /// Causal GQA attention with RoPE (base `theta`, positions `pos_offset + t`) applied to q and k as
    /// they are loaded; `theta = 0` is plain attention. `out =`, `lse =`; q, k un-rotated.
    pub fn attention_rope_forward(
        &self,
        out: DViewMut<'_>,
        lse: DViewMut<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        shape: AttnRopeShape,
    ) {
        let AttnRopeShape {
            attn: AttnShape { b, t, h, hkv, d },
            theta,
            pos_offset,
        } = shape;
        self.run(|| {
            check_heads(h, hkv, d)?;
            let args = [
                out.out("out", b * t * h * d).half(),
                lse.out("lse", b * h * t).f32(),
                q.arg("q", b * t * h * d).half(),
                k.arg("k", b * t * hkv * d).half(),
                v.arg("v", b * t * hkv * d).half(),
            ];
            // Checked in the order q, k, v, out, lse.
            check_args("attention", &[args[2], args[3], args[4], args[0], args[1]])?;
            if b * t * h == 0 {
                return Ok(());
            }
            let inv_freq = self.rope_inv_freq(theta, d)?;
            self.dispatch(&args, native(&args, true), |sfx, p| {
                self.launch(
                    &format!("attention_forward_v1_d{d}_{sfx}"),
                    grid::attention_query_tiles(b, t, h),
                    &kargs(
                        p,
                        &[
                            KArg::I(b as i32),
                            KArg::I(t as i32),
                            KArg::I(h as i32),
                            KArg::I(hkv as i32),
                            KArg::P(inv_freq),
                            KArg::I(pos_offset as i32),
                        ],
                    ),
                )
            })
        });
    }

    /// Backward of [`Self::attention_rope_forward`]: `dq =`, `dk =`, `dv =` with respect to the
    /// un-rotated q and k (`saved`: the forward's un-rotated q, k, v, its out and lse).
    /// Deterministic (no atomics): dk/dv per key tile, then dq per query tile.
    pub fn attention_rope_backward(
        &self,
        dq: DViewMut<'_>,
        dk: DViewMut<'_>,
        dv: DViewMut<'_>,
        dout: DView<'_>,
        saved: AttnSaved<DView<'_>>,
        shape: AttnRopeShape,
    ) {
        let AttnSaved { q, k, v, out, lse } = saved;
        let AttnRopeShape {
            attn: AttnShape { b, t, h, hkv, d },
            theta,
            pos_offset,
        } = shape;
        self.run(|| {
            check_heads(h, hkv, d)?;
            let args = [
                dq.out("dq", b * t * h * d).half(),
                dk.out("dk", b * t * hkv * d).half(),
                dv.out("dv", b * t * hkv * d).half(),
                dout.arg("dout", b * t * h * d).half(),
                q.arg("q", b * t * h * d).half(),
                k.arg("k", b * t * hkv * d).half(),
                v.arg("v", b * t * hkv * d).half(),
                out.arg("out", b * t * h * d).half(),
                lse.arg("lse", b * h * t).f32(),
            ];
            check_args("attention backward", &args)?;
            if b * t * h == 0 {
                return Ok(());
            }
            let inv_freq = self.rope_inv_freq(theta, d)?;
            let delta = self.scratch("att_delta", b * h * t * 4)?;
            let shape = [
                KArg::I(b as i32),
                KArg::I(t as i32),
                KArg::I(h as i32),
                KArg::I(hkv as i32),
                KArg::P(inv_freq),
                KArg::I(pos_offset as i32),
            ];
            self.dispatch(&args, native(&args, true), |sfx, p| {
                // p: dq dk dv dout q k v out lse
                self.launch(
                    &format!("attention_backward_delta_v1_{sfx}"),
                    grid::attention_delta(b * t * h),
                    &kargs(
                        &[delta, p[3], p[7]],
                        &[
                            KArg::I(b as i32),
                            KArg::I(t as i32),
                            KArg::I(h as i32),
                            KArg::I(d as i32),
                        ],
                    ),
                )?;
                self.launch(
                    &format!("attention_backward_dkdv_v1_d{d}_{sfx}"),
                    grid::attention_key_tiles(b, t, hkv),
                    &kargs(&[p[1], p[2], p[3], p[4], p[5], p[6], p[8], delta], &shape),
                )?;
                self.launch(
                    &format!("attention_backward_dq_v1_d{d}_{sfx}"),
                    grid::attention_query_tiles(b, t, h),
                    &kargs(&[p[0], p[3], p[4], p[5], p[6], p[8], delta], &shape),
                )
            })
        });
    }
}
