//! RMSNorm (`kernels/rmsnorm.cu`; CPU reference `crate::ops::rmsnorm`): one block per row
//! forward; backward writes dx per row and dw through per-block partials reduced in a fixed
//! order (deterministic).

use super::CudaBackend;
use super::grid;
use super::launch::{KArg, check_args, kargs, native};
use super::view::{DView, DViewMut};
use crate::backend::{RmsNormSaved, RowShape};
use anyhow::{Result, ensure};

fn check_width(c: usize) -> Result<()> {
    ensure!(
        c.is_multiple_of(4) && c <= 8192,
        "rmsnorm: c = {c} must be a multiple of 4 and ≤ 8192"
    );
    Ok(())
}

impl CudaBackend {
    /// [`crate::backend::Backend::rmsnorm_forward`].
    pub(super) fn rmsnorm_forward_impl(
        &self,
        out: DViewMut<'_>,
        rstd: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        shape: RowShape,
        eps: f32,
    ) -> Result<()> {
        let RowShape { n, c } = shape;
        check_width(c)?;
        let args = [
            out.out("out", n * c).half(),
            rstd.out("rstd", n).f32(),
            x.arg("x", n * c).half(),
            w.arg("w", c).half(),
        ];
        check_args("rmsnorm", &args)?;
        if n == 0 {
            return Ok(());
        }
        self.dispatch(&args, native(&args, true), |sfx, p| {
            self.launch(
                &format!("rmsnorm_forward_v1_{sfx}"),
                grid::rmsnorm_forward(n),
                &kargs(p, &[KArg::I(n as i32), KArg::I(c as i32), KArg::F(eps)]),
            )
        })
    }

    /// [`crate::backend::Backend::rmsnorm_backward`].
    pub(super) fn rmsnorm_backward_impl(
        &self,
        dx: DViewMut<'_>,
        dw: DViewMut<'_>,
        dout: DView<'_>,
        saved: RmsNormSaved<DView<'_>>,
        shape: RowShape,
    ) -> Result<()> {
        let RmsNormSaved { x, w, rstd } = saved;
        let RowShape { n, c } = shape;
        check_width(c)?;
        let args = [
            dx.inout("dx", n * c).half(),
            dw.inout("dw", c).f32(),
            dout.arg("dout", n * c).half(),
            x.arg("x", n * c).half(),
            w.arg("w", c).half(),
            rstd.arg("rstd", n).f32(),
        ];
        check_args("rmsnorm", &args)?;
        if n == 0 {
            return Ok(());
        }
        let nblocks = grid::rmsnorm_backward_blocks(n, self.sm_count);
        let partial = self.scratch("rms_partial", nblocks * c * 4)?;
        self.dispatch(&args, native(&args, true), |sfx, p| {
            // p: dx dw dout x w rstd
            self.launch(
                &format!("rmsnorm_backward_v1_{sfx}"),
                grid::rmsnorm_backward(nblocks),
                &kargs(
                    &[p[0], partial, p[2], p[3], p[4], p[5]],
                    &[KArg::I(n as i32), KArg::I(c as i32)],
                ),
            )?;
            self.launch(
                "rmsnorm_dw_reduce_v1_f32",
                grid::rmsnorm_dw_reduce(c),
                &kargs(
                    &[p[1], partial],
                    &[KArg::I(nblocks as i32), KArg::I(c as i32)],
                ),
            )
        })
    }
}
