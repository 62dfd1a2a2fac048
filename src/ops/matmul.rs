//! Matrix multiply, row-major: `out[m,n] = alpha * op(a) · op(b) + beta * out`.
//!
//! `out` is written (`=`) when `beta == 0` (its old content is ignored, even NaN) and accumulated
//! into otherwise. `a` is stored `[m,k]`, or `[k,m]` when `trans_a`; `b` is stored `[k,n]`, or `[n,k]`
//! when `trans_b` (an HF `Linear` weight `[out, in]`, so `y = x·Wᵀ` is `trans_b = true`).
//!
//! There is no separate backward: the model expresses `dA = dOut·op(B)ᵀ`, `dB = op(A)ᵀ·dOut` as
//! further `matmul` calls with the transposes flipped and `beta = 1` to accumulate.
//!
//! The work is done by the pure-Rust `gemm` crate (packing + SIMD micro-kernels chosen at run time,
//! threads from rayon's pool); chosen by measurement, see docs/PERF.md. The test suite checks it
//! against a naive triple loop for every transpose combination.

use super::shape::GemmShape;
use gemm::{Parallelism, gemm};

/// `out[m,n] = alpha * op(a)·op(b) + beta * out` (`=` when `beta == 0`, else a blend).
/// Large products use rayon's pool.
pub fn matmul(out: &mut [f32], a: &[f32], b: &[f32], shape: GemmShape, alpha: f32, beta: f32) {
    // Small products are not worth waking the pool for.
    let threaded = shape.m * shape.n * shape.k >= 64 * 64 * 64;
    matmul_on(out, a, b, shape, (alpha, beta), threaded);
}

/// [`matmul`] on the calling thread only: for callers that are themselves one of many rayon tasks
/// (attention's per-head blocks).
pub fn matmul_serial(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) {
    matmul_on(out, a, b, shape, (alpha, beta), false);
}

/// [`matmul`] with `(alpha, beta)`, on rayon's pool when `threaded`.
fn matmul_on(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    shape: GemmShape,
    (alpha, beta): (f32, f32),
    threaded: bool,
) {
    let GemmShape {
        m,
        n,
        k,
        trans_a,
        trans_b,
    } = shape;
    assert_eq!(out.len(), m * n, "matmul: out is not [m={m}, n={n}]");
    assert_eq!(a.len(), m * k, "matmul: a is not {m}x{k}");
    assert_eq!(b.len(), k * n, "matmul: b is not {k}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // The product is empty: only the beta term remains.
        if beta == 0.0 {
            out.fill(0.0);
        } else {
            out.iter_mut().for_each(|o| *o *= beta);
        }
        return;
    }
    // Strides in elements: (row stride, column stride) of each operand as it enters the product.
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    let par = if threaded {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the three slices have the asserted lengths, so every index the strides reach is in
    // bounds; `out` is exclusively borrowed and does not alias `a` or `b`.
    // gemm's convention is `dst = alpha·dst + beta·lhs·rhs` (the names are swapped w.r.t. BLAS).
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}
