//! The optimizer side of the device-resident training step: AdamW on an fp32 master shard that
//! writes the weights' storage type in the same pass, and the host-transfer count.

use super::{CudaBackend, DView, DViewMut};
use crate::backend::{AdamW, Backend};
use crate::tensor::DType;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;

impl CudaBackend {
    /// Count `bytes` of payload crossing host↔device ([`Backend::host_transfer_bytes`]).
    pub(super) fn count_transfer(&self, bytes: usize) {
        self.transferred.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// [`Backend::adamw_step_copy`]: a bf16/f16 `copy` is written by the AdamW kernel itself
    /// (`adamw_step_with_copy`, one pass); an fp32 `copy` is a device copy after the step.
    pub(super) fn adamw_step_copy_impl(
        &self,
        param: DViewMut<'_>,
        m: DViewMut<'_>,
        v: DViewMut<'_>,
        grad: DView<'_>,
        copy: DViewMut<'_>,
        hp: AdamW,
    ) {
        if matches!(copy.dtype, DType::BF16 | DType::F16) {
            self.adamw_step_with_copy(param, m, v, grad, Some(copy), hp);
        } else {
            let updated = DView {
                ptr: param.ptr,
                len: param.len,
                dtype: param.dtype,
                _p: PhantomData,
            };
            self.adamw_step_with_copy(param, m, v, grad, None, hp);
            self.copy(copy, updated);
        }
    }
}
