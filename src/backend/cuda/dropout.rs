//! Dropout in place (`kernels/dropout.cu`; CPU reference `crate::ops::dropout`): the same
//! counter-based mask on both backends.

use super::CudaBackend;
use super::grid;
use super::launch::{KArg, suffix};
use super::view::DViewMut;
use anyhow::{Result, ensure};

impl CudaBackend {
    /// [`crate::backend::Backend::dropout`].
    pub(super) fn dropout_impl(&self, out: DViewMut<'_>, p: f32, key: u64) -> Result<()> {
        ensure!((0.0..1.0).contains(&p), "dropout: p = {p} not in [0, 1)");
        if out.len == 0 || p == 0.0 {
            return Ok(());
        }
        // The same fp32 scale the CPU reference multiplies by.
        let keep_scale = 1.0f32 / (1.0 - p);
        self.launch(
            &format!("dropout_v1_{}", suffix(out.dtype)),
            grid::dropout(out.len),
            &[
                KArg::P(out.ptr),
                KArg::L(out.len as i64),
                KArg::Q(key),
                KArg::F(p),
                KArg::F(keep_scale),
            ],
        )
    }
}
