//! Random initialisation (`kernels/fill.cu`; CPU reference `crate::ops::fill`): the same
//! counter-based uniform draw on both backends.

use super::CudaBackend;
use super::grid;
use super::launch::{KArg, suffix};
use super::view::DViewMut;
use anyhow::Result;

impl CudaBackend {
    /// [`crate::backend::Backend::fill_uniform`].
    pub(super) fn fill_uniform_impl(
        &self,
        out: DViewMut<'_>,
        seed: u64,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        if out.len == 0 {
            return Ok(());
        }
        let key = crate::ops::fill::uniform_key(seed);
        self.launch(
            &format!("fill_uniform_v1_{}", suffix(out.dtype)),
            grid::fill(out.len),
            &[
                KArg::P(out.ptr),
                KArg::Q(key),
                KArg::F(lo),
                KArg::F(hi),
                KArg::L(out.len as i64),
            ],
        )
    }
}
