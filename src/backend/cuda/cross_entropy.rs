//! Cross-entropy (`kernels/cross_entropy.cu`; CPU reference `crate::ops::cross_entropy`): over
//! materialised logits, and fused with the lm_head GEMM over vocabulary chunks so the `[n, v]`
//! logits are never held.

use super::grid;
use super::launch::{KArg, check_args, check_view, kargs, suffix};
use super::view::{DView, DViewMut};
use super::{CudaBackend, CudaIds};
use crate::backend::{GemmShape, LmHeadIn, LmHeadShape};
use crate::tensor::DType;
use anyhow::{Result, ensure};

/// What the fused lm_head + cross-entropy backward re-reads: the forward's `x[n,c]`, `w[v,c]`,
/// `targets[n]` and its saved `lse[n]` (it never holds the logits).
#[derive(Clone, Copy)]
pub struct LmHeadCeSaved<'a> {
    pub x: DView<'a>,
    pub w: DView<'a>,
    pub lse: DView<'a>,
    pub targets: &'a CudaIds,
}

/// The gradients the fused backward writes: `dx[n,c]` (`accumulate`: `+=`, else `=`) and
/// `dw[v,c] +=` (`None`: a frozen lm_head).
pub(super) struct LmHeadCeGrads<'a> {
    pub dx: DViewMut<'a>,
    pub accumulate: bool,
    pub dw: Option<DViewMut<'a>>,
}

impl CudaBackend {
    /// [`crate::backend::Backend::cross_entropy_forward`].
    pub(super) fn cross_entropy_forward_impl(
        &self,
        losses: DViewMut<'_>,
        logits: DView<'_>,
        targets: &CudaIds,
        n: usize,
        v: usize,
    ) -> Result<()> {
        let args = [losses.out("losses", n), logits.arg("logits", n * v)];
        check_args("cross_entropy", &args)?;
        check_view("cross_entropy targets", targets.len, n)?;
        if n == 0 {
            return Ok(());
        }
        let nat = (losses.dtype == DType::F32).then(|| suffix(logits.dtype));
        self.dispatch(&args, nat, |sfx, p| {
            self.launch(
                &format!("cross_entropy_forward_v1_{sfx}"),
                grid::cross_entropy_rows(n),
                &kargs(
                    &[p[0], p[1], targets.ptr],
                    &[KArg::I(n as i32), KArg::I(v as i32)],
                ),
            )
        })
    }

    /// [`crate::backend::Backend::cross_entropy_backward`].
    pub(super) fn cross_entropy_backward_impl(
        &self,
        dlogits: DViewMut<'_>,
        logits: DView<'_>,
        targets: &CudaIds,
        n: usize,
        v: usize,
        scale: f32,
    ) -> Result<()> {
        let args = [dlogits.out("dlogits", n * v), logits.arg("logits", n * v)];
        check_args("cross_entropy", &args)?;
        check_view("cross_entropy targets", targets.len, n)?;
        if n == 0 {
            return Ok(());
        }
        let nat = (dlogits.dtype == logits.dtype).then(|| suffix(logits.dtype));
        self.dispatch(&args, nat, |sfx, p| {
            self.launch(
                &format!("cross_entropy_backward_v1_{sfx}"),
                grid::cross_entropy_rows(n),
                &kargs(
                    &[p[0], p[1], targets.ptr],
                    &[KArg::I(n as i32), KArg::I(v as i32), KArg::F(scale)],
                ),
            )
        })
    }

    // ---- fused lm_head + cross-entropy ----------------------------------------------------------
    /// `out[n, vc] =` x[n,c] · w_chunk[vc,c]ᵀ: one vocabulary chunk of the logits (the first step of
    /// both passes of the fused lm_head + cross-entropy).
    fn chunk_logits(
        &self,
        out: DViewMut<'_>,
        x: DView<'_>,
        w_chunk: DView<'_>,
        n: usize,
        vc: usize,
        c: usize,
    ) -> Result<()> {
        self.matmul_impl(out, x, w_chunk, GemmShape::nt(n, vc, c), 1.0, 0.0)
    }

    /// Fused lm_head + cross-entropy, never holding the `[n, v]` logits: for each vocabulary chunk
    /// of `chunk_len = chunk.len / n` rows of `w[v, c]`, cuBLAS writes `x·w_chunkᵀ` into `chunk` and a
    /// kernel folds it into per-row running (max, Σexp) and the target's logit.
    /// `losses[n] =` (0 where the target is −100), `lse[n] =` (saved for the backward).
    pub fn lm_head_cross_entropy_forward(
        &self,
        losses: DViewMut<'_>,
        lse: DViewMut<'_>,
        mut chunk: DViewMut<'_>,
        input: LmHeadIn<'_, DView<'_>, CudaIds>,
        shape: LmHeadShape,
    ) {
        let LmHeadIn { x, w, targets } = input;
        let LmHeadShape { n, c, v } = shape;
        self.run(|| {
            ensure!(
                losses.dtype == DType::F32 && lse.dtype == DType::F32,
                "lm_head CE: losses and lse must be fp32 buffers"
            );
            check_view("lm_head CE losses", losses.len, n)?;
            check_view("lm_head CE lse", lse.len, n)?;
            check_view("lm_head CE x", x.len, n * c)?;
            check_view("lm_head CE w", w.len, v * c)?;
            check_view("lm_head CE targets", targets.len, n)?;
            ensure!(
                n > 0 && chunk.len >= n,
                "lm_head CE: chunk buffer smaller than one column of logits"
            );
            let vc_max = (chunk.len / n).min(v);
            let stats = self.scratch("ce_stats", n * 8)?;
            let tlogit = self.scratch("ce_tlogit", n * 4)?;
            let sfx = suffix(chunk.dtype);
            let mut v0 = 0;
            while v0 < v {
                let vc = vc_max.min(v - v0);
                let wv = w.sub(v0 * c, vc * c);
                self.chunk_logits(chunk.sub_mut(0, n * vc), x, wv, n, vc, c)?;
                self.launch(
                    &format!("lmhead_ce_chunk_forward_v1_{sfx}"),
                    grid::cross_entropy_rows(n),
                    &[
                        KArg::P(stats),
                        KArg::P(tlogit),
                        KArg::P(chunk.ptr),
                        KArg::P(targets.ptr),
                        KArg::I(n as i32),
                        KArg::I(vc as i32),
                        KArg::I(v0 as i32),
                        KArg::I((v0 == 0) as i32),
                    ],
                )?;
                v0 += vc;
            }
            self.launch(
                "lmhead_ce_finish_v1_f32",
                grid::lm_head_ce_finish(n),
                &[
                    KArg::P(losses.ptr),
                    KArg::P(lse.ptr),
                    KArg::P(stats),
                    KArg::P(tlogit),
                    KArg::P(targets.ptr),
                    KArg::I(n as i32),
                ],
            )
        });
    }

    /// Backward of [`Self::lm_head_cross_entropy_forward`] with loss weight `scale` per token
    /// (`1/count` for HF's mean): per chunk, recompute the logits, turn them into dlogits in place,
    /// then `dx[n,c] +=` dlogits·w_chunk and `dw[v,c] +=` dlogitsᵀ·x (cuBLAS, beta = 1). A 16-bit
    /// `dx` is summed in fp32 and rounded once (the same code as the `Backend` trait's op, which
    /// writes `dx =`).
    pub fn lm_head_cross_entropy_backward(
        &self,
        dx: DViewMut<'_>,
        dw: DViewMut<'_>,
        chunk: DViewMut<'_>,
        saved: LmHeadCeSaved<'_>,
        shape: LmHeadShape,
        scale: f32,
    ) {
        let grads = LmHeadCeGrads {
            dx,
            accumulate: true,
            dw: Some(dw),
        };
        let r = self.lm_head_ce_backward_fp32_dx(grads, chunk, saved, shape, scale);
        self.record(r);
    }

    /// The fused lm_head + CE backward with `dx` summed in fp32: the chunks add their
    /// `dlogits·w_chunk` into dx (cuBLAS, beta = 1, ~V/8192 times); a 16-bit dx would be rounded
    /// after every chunk, so the sum is kept in fp32 scratch (bf16 inputs with an fp32 output are
    /// native to cuBLAS), starting from dx (`accumulate`: `dx +=`) or zero (`dx =`), and rounded
    /// once at the end, as the composite default rounds once.
    pub(super) fn lm_head_ce_backward_fp32_dx(
        &self,
        grads: LmHeadCeGrads<'_>,
        chunk: DViewMut<'_>,
        saved: LmHeadCeSaved<'_>,
        shape: LmHeadShape,
        scale: f32,
    ) -> Result<()> {
        let LmHeadCeGrads { dx, accumulate, dw } = grads;
        let len = dx.len;
        let acc = if dx.dtype == DType::F32 {
            dx.ptr
        } else {
            self.scratch("lm_head_ce_dx", len * 4)?
        };
        let acc_view = || DViewMut::from_raw(acc, len, DType::F32);
        if !accumulate {
            self.zero_impl(acc_view())?;
        } else if acc != dx.ptr {
            self.cast(acc, DType::F32, dx.ptr, dx.dtype, len)?;
        }
        self.lm_head_ce_backward(acc_view(), dw, chunk, saved, shape, scale);
        self.take_error()?;
        if acc != dx.ptr {
            self.cast(dx.ptr, dx.dtype, acc, DType::F32, len)?;
        }
        Ok(())
    }

    /// [`Self::lm_head_cross_entropy_backward`] with `dw` optional (`None`: a frozen lm_head, the
    /// per-chunk dW GEMM skipped).
    fn lm_head_ce_backward(
        &self,
        mut dx: DViewMut<'_>,
        mut dw: Option<DViewMut<'_>>,
        mut chunk: DViewMut<'_>,
        saved: LmHeadCeSaved<'_>,
        shape: LmHeadShape,
        scale: f32,
    ) {
        let LmHeadCeSaved { x, w, lse, targets } = saved;
        let LmHeadShape { n, c, v } = shape;
        self.run(|| {
            ensure!(lse.dtype == DType::F32, "lm_head CE: lse must be fp32");
            check_view("lm_head CE dx", dx.len, n * c)?;
            if let Some(dw) = &dw {
                check_view("lm_head CE dw", dw.len, v * c)?;
            }
            check_view("lm_head CE x", x.len, n * c)?;
            check_view("lm_head CE w", w.len, v * c)?;
            check_view("lm_head CE lse", lse.len, n)?;
            ensure!(
                n > 0 && chunk.len >= n,
                "lm_head CE: chunk buffer smaller than one column of logits"
            );
            let vc_max = (chunk.len / n).min(v);
            let sfx = suffix(chunk.dtype);
            let mut v0 = 0;
            while v0 < v {
                let vc = vc_max.min(v - v0);
                let wv = w.sub(v0 * c, vc * c);
                self.chunk_logits(chunk.sub_mut(0, n * vc), x, wv, n, vc, c)?;
                self.launch(
                    &format!("lmhead_ce_chunk_backward_v1_{sfx}"),
                    grid::cross_entropy_rows(n),
                    &[
                        KArg::P(chunk.ptr),
                        KArg::P(lse.ptr),
                        KArg::P(targets.ptr),
                        KArg::I(n as i32),
                        KArg::I(vc as i32),
                        KArg::I(v0 as i32),
                        KArg::F(scale),
                    ],
                )?;
                let g = chunk.ro().sub(0, n * vc);
                // dx[n,c] += g[n,vc] · w_chunk[vc,c]
                self.matmul_impl(dx.reborrow(), g, wv, GemmShape::nn(n, c, vc), 1.0, 1.0)?;
                // dw_chunk[vc,c] += gᵀ[vc,n] · x[n,c]
                if let Some(dw) = dw.as_mut() {
                    let dwv = dw.sub_mut(v0 * c, vc * c);
                    self.matmul_impl(dwv, g, x, GemmShape::tn(vc, c, n), 1.0, 1.0)?;
                }
                v0 += vc;
            }
            Ok(())
        });
    }
}
