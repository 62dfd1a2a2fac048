//! SwiGLU (`kernels/swiglu.cu`; CPU reference `crate::ops::swiglu`): `out = silu(gate)·up` and
//! its backward, elementwise; four elements per thread when every view is 16-byte aligned.

use super::CudaBackend;
use super::grid;
use super::launch::{Arg, KArg, aligned, check_args, kargs, native};
use super::view::{DView, DViewMut};
use anyhow::Result;

impl CudaBackend {
    /// Launch the swiglu kernel `dir` ("forward" / "backward") over `args` of `len` elements each:
    /// the native 16-bit kernel (vectorised when `len` is a multiple of 4 and every view is
    /// aligned), else the scalar fp32 kernel on staged copies.
    fn swiglu_launch(&self, dir: &str, args: &[Arg], len: usize) -> Result<()> {
        let nat = native(args, false);
        let ptrs: Vec<u64> = args.iter().map(|a| a.ptr).collect();
        let vec4 = nat.is_some() && len.is_multiple_of(4) && aligned(&ptrs);
        let v = if vec4 { "v1" } else { "x1" };
        self.dispatch(args, nat, |sfx, p| {
            self.launch(
                &format!("swiglu_{dir}_{v}_{sfx}"),
                grid::swiglu(len, vec4),
                &kargs(p, &[KArg::L(len as i64)]),
            )
        })
    }

    /// [`crate::backend::Backend::swiglu_forward`].
    pub(super) fn swiglu_forward_impl(
        &self,
        out: DViewMut<'_>,
        gate: DView<'_>,
        up: DView<'_>,
    ) -> Result<()> {
        let len = out.len;
        let args = [
            out.out("out", len).half(),
            gate.arg("gate", len).half(),
            up.arg("up", len).half(),
        ];
        check_args("swiglu", &args)?;
        if len == 0 {
            return Ok(());
        }
        self.swiglu_launch("forward", &args, len)
    }

    /// [`crate::backend::Backend::swiglu_backward`].
    pub(super) fn swiglu_backward_impl(
        &self,
        dgate: DViewMut<'_>,
        dup: DViewMut<'_>,
        dout: DView<'_>,
        gate: DView<'_>,
        up: DView<'_>,
    ) -> Result<()> {
        let len = dout.len;
        let args = [
            dgate.out("dgate", len).half(),
            dup.out("dup", len).half(),
            dout.arg("dout", len).half(),
            gate.arg("gate", len).half(),
            up.arg("up", len).half(),
        ];
        check_args("swiglu backward", &args)?;
        if len == 0 {
            return Ok(());
        }
        self.swiglu_launch("backward", &args, len)
    }
}
