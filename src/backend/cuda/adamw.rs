//! AdamW (`kernels/adamw.cu`; CPU reference `crate::ops::adamw`): one fused pass over an fp32
//! master shard that can also write the updated weights in their 16-bit storage type.

use super::grid;
use super::launch::{KArg, check_view, kargs, suffix};
use super::view::{DView, DViewMut};
use super::{CudaBackend, kernels};
use crate::backend::AdamW;
use crate::tensor::DType;
use anyhow::ensure;

impl CudaBackend {
    /// AdamW ([`crate::backend::Backend::adamw_step`]) that also writes `param_bf16 =` the updated
    /// parameters in the copy's 16-bit type, bf16 or f16 (the fp32 master shard → the weights the
    /// forward reads, in the same pass).
    pub fn adamw_step_with_copy(
        &self,
        param: DViewMut<'_>,
        m: DViewMut<'_>,
        v: DViewMut<'_>,
        grad: DView<'_>,
        param_bf16: Option<DViewMut<'_>>,
        hp: AdamW,
    ) {
        self.run(|| {
            let len = param.len;
            check_view("adamw m", m.len, len)?;
            check_view("adamw v", v.len, len)?;
            check_view("adamw grad", grad.len, len)?;
            let copy = match &param_bf16 {
                Some(c) => {
                    check_view("adamw param_bf16", c.len, len)?;
                    ensure!(
                        matches!(c.dtype, DType::BF16 | DType::F16),
                        "adamw: the copy target must be a bf16 or f16 buffer"
                    );
                    c.ptr
                }
                None => 0,
            };
            // The `_cf16` instances write an f16 copy (and take f16 params/grads); the others bf16.
            let cf16 = match &param_bf16 {
                Some(c) => c.dtype == DType::F16,
                None => param.dtype == DType::F16 || grad.dtype == DType::F16,
            };
            let (fam, cs) = if cf16 {
                (DType::F16, "_cf16")
            } else {
                (DType::BF16, "")
            };
            if len == 0 {
                return Ok(());
            }
            let k = kernels::adamw_coefficients(hp);
            let args = [
                param.inout("param", len),
                m.inout("m", len),
                v.inout("v", len),
                grad.arg("grad", len),
            ];
            let nat = (m.dtype == DType::F32
                && v.dtype == DType::F32
                && [param.dtype, grad.dtype]
                    .iter()
                    .all(|&d| d == DType::F32 || d == fam))
            .then(|| format!("{}_{}", suffix(param.dtype), suffix(grad.dtype)));
            let nat = nat.as_deref();
            // Named by (param, grad) storage; staged, both are fp32.
            let name = format!("adamw_step_v1_{}{cs}", nat.unwrap_or("f32_f32"));
            self.dispatch(&args, nat, |_, p| {
                self.launch(
                    &name,
                    grid::adamw(len, self.sm_count),
                    &kargs(
                        &[p[0], p[1], p[2], p[3], copy],
                        &[
                            KArg::L(len as i64),
                            KArg::F(k[0]),
                            KArg::F(k[1]),
                            KArg::F(k[2]),
                            KArg::F(k[3]),
                            KArg::F(k[4]),
                            KArg::F(k[5]),
                            KArg::F(k[6]),
                        ],
                    ),
                )
            })
        });
    }

    /// [`crate::backend::Backend::adamw_step_copy`]: a bf16/f16 `copy` is written by the AdamW
    /// kernel itself ([`Self::adamw_step_with_copy`], one pass); an fp32 `copy` is a device copy
    /// after the step.
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
            let updated = DView::from_raw(param.ptr, param.len, param.dtype);
            self.adamw_step_with_copy(param, m, v, grad, None, hp);
            let r = self.copy_impl(copy, updated);
            self.record(r);
        }
    }
}
