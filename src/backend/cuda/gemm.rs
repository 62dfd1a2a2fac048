//! GEMM through cuBLAS (`cublasGemmEx`, fp32 compute): row-major `out[m,n] = alpha·op(a)·op(b) +
//! beta·out` on bf16, f16 or fp32 inputs. The CPU reference is `crate::ops::matmul`.

use super::launch::{check_args, suffix, uni16};
use super::view::{DView, DViewMut};
use super::{CudaBackend, nvtx};
use crate::backend::GemmShape;
use crate::tensor::DType;
use anyhow::{Result, anyhow};
use cudarc::cublas::{result as blas_result, sys as blas_sys};

/// The device operands of one cuBLAS call: `out` stored as `od`, `a` and `b` both stored as `ab`.
#[derive(Clone, Copy)]
struct GemmPtrs {
    out: u64,
    od: DType,
    a: u64,
    b: u64,
    ab: DType,
}

impl CudaBackend {
    /// [`crate::backend::Backend::matmul`], returning its error: a combination of storage types
    /// cuBLAS does not take is staged through fp32.
    pub(super) fn matmul_impl(
        &self,
        out: DViewMut<'_>,
        a: DView<'_>,
        b: DView<'_>,
        shape: GemmShape,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let GemmShape { m, n, k, .. } = shape;
        let o = if beta == 0.0 {
            out.out("out", m * n)
        } else {
            out.inout("out", m * n)
        };
        let args = [o, a.arg("a", m * k), b.arg("b", k * n)];
        check_args("matmul", &args)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        // cuBLAS takes 16-bit inputs of one type with an output of that type or fp32.
        let ok = (uni16(&[a.dtype, b.dtype]) && (out.dtype == a.dtype || out.dtype == DType::F32))
            || (a.dtype == DType::F32 && b.dtype == DType::F32 && out.dtype == DType::F32);
        if !ok {
            return self.with_f32(&args, |p| {
                let ptrs = GemmPtrs {
                    out: p[0],
                    od: DType::F32,
                    a: p[1],
                    b: p[2],
                    ab: DType::F32,
                };
                self.gemm(ptrs, shape, alpha, beta)
            });
        }
        let ptrs = GemmPtrs {
            out: out.ptr,
            od: out.dtype,
            a: a.ptr,
            b: b.ptr,
            ab: a.dtype,
        };
        self.gemm(ptrs, shape, alpha, beta)
    }

    /// Row-major `out[m,n] = alpha·op(a)·op(b) + beta·out` as the column-major
    /// `outᵀ[n,m] = op(b)ᵀ·op(a)ᵀ`: cuBLAS's A is our b, its B our a.
    fn gemm(&self, ptrs: GemmPtrs, shape: GemmShape, alpha: f32, beta: f32) -> Result<()> {
        let GemmPtrs { out, od, a, b, ab } = ptrs;
        let GemmShape {
            m,
            n,
            k,
            trans_a,
            trans_b,
        } = shape;
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let cty = |d: DType| match d {
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            _ => blas_sys::cudaDataType::CUDA_R_32F,
        };
        let (opb, ldb_) = if trans_b {
            (CUBLAS_OP_T, k)
        } else {
            (CUBLAS_OP_N, n)
        };
        let (opa, lda_) = if trans_a {
            (CUBLAS_OP_T, m)
        } else {
            (CUBLAS_OP_N, k)
        };
        let name = format!("cublas_gemm_{}_{}", suffix(ab), suffix(od));
        self.bind()?;
        let _range = nvtx::Range::new(self.nvtx_ops, &name);
        let start = self.prof_start();
        // SAFETY: pointers are live device buffers of the checked sizes; alpha/beta are host f32
        // (compute type 32F, host pointer mode).
        unsafe {
            blas_result::gemm_ex(
                self.blas,
                opb,
                opa,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                b as *const _,
                cty(ab),
                ldb_.max(1) as i32,
                a as *const _,
                cty(ab),
                lda_.max(1) as i32,
                (&beta) as *const f32 as *const _,
                out as *mut _,
                cty(od),
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(|e| anyhow!("cublasGemmEx m={m} n={n} k={k}: {e:?}"))?;
        self.prof_end(&name, start);
        Ok(())
    }
}
