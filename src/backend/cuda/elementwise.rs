//! Elementwise ops and reductions (`kernels/elementwise.cu`; CPU reference
//! `crate::ops::elementwise`): zero, copy with conversion, axpy, scale, and the deterministic f64
//! sums.

use super::CudaBackend;
use super::grid;
use super::launch::{KArg, check_view, suffix};
use super::view::{DView, DViewMut};
use crate::tensor::DType;
use anyhow::{Result, anyhow};
use cudarc::driver::result as drv;

impl CudaBackend {
    /// `out = x` with conversion, on raw pointers (also the staging copies of
    /// [`CudaBackend::with_f32`]).
    pub(super) fn cast(&self, out: u64, od: DType, x: u64, xd: DType, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let name = format!("copy_v1_{}_{}", suffix(od), suffix(xd));
        self.launch(
            &name,
            grid::cast(len),
            &[KArg::P(out), KArg::P(x), KArg::L(len as i64)],
        )
    }

    /// [`crate::backend::Backend::zero`]: a byte memset.
    pub(super) fn zero_impl(&self, out: DViewMut<'_>) -> Result<()> {
        self.bind()?;
        // SAFETY: the view is a live range of `len·size` bytes.
        unsafe {
            drv::memset_d8_async(
                out.ptr,
                0,
                out.len * out.dtype.size(),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("zero: {e:?}"))
    }

    /// [`crate::backend::Backend::copy`]: a device copy, or the conversion kernel across types.
    pub(super) fn copy_impl(&self, out: DViewMut<'_>, x: DView<'_>) -> Result<()> {
        check_view("copy", x.len, out.len)?;
        if out.dtype == x.dtype {
            self.bind()?;
            // SAFETY: both live ranges of the same byte length.
            unsafe {
                drv::memcpy_dtod_async(
                    out.ptr,
                    x.ptr,
                    out.len * out.dtype.size(),
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| anyhow!("copy: {e:?}"))
        } else {
            self.cast(out.ptr, out.dtype, x.ptr, x.dtype, out.len)
        }
    }

    /// [`crate::backend::Backend::axpy`]: `out += alpha·x`, any pair of storage types.
    pub(super) fn axpy_impl(&self, out: DViewMut<'_>, alpha: f32, x: DView<'_>) -> Result<()> {
        check_view("axpy", x.len, out.len)?;
        if out.len == 0 {
            return Ok(());
        }
        self.launch(
            &format!("axpy_v1_{}_{}", suffix(out.dtype), suffix(x.dtype)),
            grid::elementwise(out.len),
            &[
                KArg::P(out.ptr),
                KArg::P(x.ptr),
                KArg::F(alpha),
                KArg::L(out.len as i64),
            ],
        )
    }

    /// [`crate::backend::Backend::scale`]: `out *= alpha`.
    pub(super) fn scale_impl(&self, out: DViewMut<'_>, alpha: f32) -> Result<()> {
        if out.len == 0 {
            return Ok(());
        }
        self.launch(
            &format!("scale_v1_{}", suffix(out.dtype)),
            grid::elementwise(out.len),
            &[KArg::P(out.ptr), KArg::F(alpha), KArg::L(out.len as i64)],
        )
    }

    /// `Σ x` (`what` = "sum") or `Σ x²` ("sum_squares") in f64: per-block partials, then one
    /// block sums them in a fixed order (deterministic for a given grid); one f64 comes back.
    pub(super) fn reduce_f64(&self, x: DView<'_>, what: &str) -> Result<f64> {
        self.take_error()?;
        if x.len == 0 {
            return Ok(0.0);
        }
        let parts = grid::reduce_partial(x.len, self.sm_count);
        let nparts = parts.grid.0 as usize;
        let partial = self.scratch("ss_partial", nparts * 8)?;
        let out = self.scratch("ss_out", 8)?;
        self.launch(
            &format!("{what}_partial_v1_{}", suffix(x.dtype)),
            parts,
            &[KArg::P(partial), KArg::P(x.ptr), KArg::L(x.len as i64)],
        )?;
        self.launch(
            "sum_squares_finish_v1_f64",
            grid::reduce_finish(),
            &[KArg::P(out), KArg::P(partial), KArg::I(nparts as i32)],
        )?;
        let mut h = [0f64; 1];
        self.count_transfer(8);
        self.bind()?;
        // SAFETY: `out` holds one f64; the copy is stream-ordered after the kernels, then synced.
        unsafe { drv::memcpy_dtoh_async(&mut h, out, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("{what}: {e:?}"))?;
        self.sync_and_take_error()?;
        Ok(h[0])
    }
}
