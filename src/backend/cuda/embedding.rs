//! Token embedding (`kernels/embedding.cu`; CPU reference `crate::ops::embedding`): a row gather
//! forward; the backward sums each id's rows in position order (one block per distinct id, from
//! the CSR grouping `upload_ids` built), so it is deterministic without atomics.

use super::grid;
use super::launch::{KArg, aligned, check_args, check_view, kargs, suffix};
use super::view::{DView, DViewMut};
use super::{CudaBackend, CudaIds};
use crate::tensor::DType;
use anyhow::{Result, ensure};
use cudarc::driver::DevicePtr;

impl CudaBackend {
    /// [`crate::backend::Backend::embedding_forward`].
    pub(super) fn embedding_forward_impl(
        &self,
        out: DViewMut<'_>,
        ids: &CudaIds,
        table: DView<'_>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let args = [out.out("out", n * c), table.arg("table", 0).any_len()];
        check_args("embedding", &args)?;
        check_view("embedding ids", ids.len, n)?;
        ensure!(
            c > 0 && table.len.is_multiple_of(c),
            "embedding: table of {} is not [v, {c}]",
            table.len
        );
        if n == 0 {
            return Ok(());
        }
        let nat =
            (out.dtype == table.dtype && aligned(&[out.ptr, table.ptr])).then(|| suffix(out.dtype));
        self.dispatch(&args, nat, |sfx, p| {
            self.launch(
                &format!("embedding_forward_v1_{sfx}"),
                grid::embedding_forward(n),
                &kargs(
                    &[p[0], ids.ptr, p[1]],
                    &[KArg::I(n as i32), KArg::I(c as i32)],
                ),
            )
        })
    }

    /// [`crate::backend::Backend::embedding_backward`].
    pub(super) fn embedding_backward_impl(
        &self,
        dtable: DViewMut<'_>,
        dout: DView<'_>,
        ids: &CudaIds,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let args = [dtable.inout("dtable", 0).any_len(), dout.arg("dout", n * c)];
        check_args("embedding", &args)?;
        check_view("embedding ids", ids.len, n)?;
        ensure!(
            c > 0 && dtable.len.is_multiple_of(c),
            "embedding: dtable of {} is not [v, {c}]",
            dtable.len
        );
        if ids.n_uniq == 0 {
            return Ok(());
        }
        let (u, o, pos) = (
            ids.uniq.device_ptr(&self.stream).0,
            ids.offsets.device_ptr(&self.stream).0,
            ids.positions.device_ptr(&self.stream).0,
        );
        let nat = (dtable.dtype == DType::F32).then(|| suffix(dout.dtype));
        self.dispatch(&args, nat, |sfx, p| {
            self.launch(
                &format!("embedding_backward_v1_{sfx}"),
                grid::embedding_backward(ids.n_uniq),
                &kargs(&[p[0], p[1], u, o, pos], &[KArg::I(c as i32)]),
            )
        })
    }
}
