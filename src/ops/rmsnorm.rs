//! RMSNorm as HF `LlamaRMSNorm` in f32: `y = (x · rstd) · w`, `rstd = 1/sqrt(mean(x²) + eps)`.
//!
//! - forward:  `out[n,c] =`, `rstd[n] =` (saved for the backward).
//! - backward: `dx[n,c] +=` (the residual stream's gradient accumulates), `dw[c] +=`.
//!
//! Backward, with `x̂ = x·rstd` and `g = dout ⊙ w`:
//! `dx = rstd · (g − x̂ · mean(g ⊙ x̂))`, `dw = Σ_rows dout ⊙ x̂`.

use super::math::simd_fn;
use super::shape::{RmsNormSaved, RowShape};
use rayon::prelude::*;

/// Rows per rayon task; also the fixed blocking of the `dw` reduction, so `dw` does not depend on
/// the number of threads.
const ROWS_PER_TASK: usize = 16;

/// `Σ a·b` of f32 products, accumulated in f64 over 8 lanes (fixed order).
#[inline(always)]
fn sum_products_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += (x[l] * y[l]) as f64;
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += (x * y) as f64;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

simd_fn! {
    /// One row: `out =`, returns its rstd.
    fn forward_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        // HF: variance = x.pow(2).mean(-1) in f32; we sum the f32 squares in f64, which is at
        // least as accurate as torch's f32 cascade sum, then round the mean to f32.
        let var = (sum_products_f64(x, x) / x.len() as f64) as f32;
        let rs = 1.0 / (var + eps).sqrt();
        for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
            *o = (xv * rs) * wv;
        }
        rs
    }
}

simd_fn! {
    /// One row: `dx +=`, `dw +=` (the block's partial).
    fn backward_row(dx: &mut [f32], dw: &mut [f32], dout: &[f32], x: &[f32], w: &[f32], rs: f32) {
        // mean(g ⊙ x̂) with g = dout ⊙ w, x̂ = x·rstd, in f64 for accuracy.
        let mut acc = [0.0f64; 8];
        let (cg, cx, cw) = (dout.chunks_exact(8), x.chunks_exact(8), w.chunks_exact(8));
        let (rg, rx, rw) = (cg.remainder(), cx.remainder(), cw.remainder());
        for ((g8, x8), w8) in cg.zip(cx).zip(cw) {
            for l in 0..8 {
                acc[l] += ((g8[l] * w8[l]) * (x8[l] * rs)) as f64;
            }
        }
        for (l, ((&go, &xv), &wv)) in rg.iter().zip(rx).zip(rw).enumerate() {
            acc[l] += ((go * wv) * (xv * rs)) as f64;
        }
        let s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        let mean = (s / x.len() as f64) as f32;
        for ((((d, &go), &xv), &wv), dwv) in dx.iter_mut().zip(dout).zip(x).zip(w).zip(dw.iter_mut()) {
            let xh = xv * rs;
            *d += rs * (go * wv - xh * mean);
            *dwv += go * xh;
        }
    }
}

/// `out[n,c] = x / sqrt(mean(x²) + eps) * w`, `rstd[n] = 1 / sqrt(mean(x²) + eps)`.
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    shape: RowShape,
    eps: f32,
) {
    let RowShape { n, c } = shape;
    assert_eq!(
        out.len(),
        n * c,
        "rmsnorm_forward: out is not [n={n}, c={c}]"
    );
    assert_eq!(rstd.len(), n, "rmsnorm_forward: rstd is not [n={n}]");
    assert_eq!(x.len(), n * c, "rmsnorm_forward: x is not [n={n}, c={c}]");
    assert_eq!(w.len(), c, "rmsnorm_forward: w is not [c={c}]");
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, r), x)| *r = forward_row(o, x, w, eps));
}

/// `dx[n,c] += rstd·(g − x̂·mean(g⊙x̂))` with `g = dout⊙w`, `x̂ = x·rstd`; `dw[c] += Σ dout⊙x̂`.
/// `saved` holds the forward's `x`, `w` and its `rstd`.
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    saved: RmsNormSaved<&[f32]>,
    shape: RowShape,
) {
    let RmsNormSaved { x, w, rstd } = saved;
    let RowShape { n, c } = shape;
    assert_eq!(
        dx.len(),
        n * c,
        "rmsnorm_backward: dx is not [n={n}, c={c}]"
    );
    assert_eq!(dw.len(), c, "rmsnorm_backward: dw is not [c={c}]");
    assert_eq!(
        dout.len(),
        n * c,
        "rmsnorm_backward: dout is not [n={n}, c={c}]"
    );
    assert_eq!(x.len(), n * c, "rmsnorm_backward: x is not [n={n}, c={c}]");
    assert_eq!(w.len(), c, "rmsnorm_backward: w is not [c={c}]");
    assert_eq!(rstd.len(), n, "rmsnorm_backward: rstd is not [n={n}]");
    if c == 0 || n == 0 {
        return;
    }
    let block = ROWS_PER_TASK * c;
    // One partial dw per block of rows, summed afterwards in block order (deterministic).
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(block)
        .zip(dout.par_chunks(block))
        .zip(x.par_chunks(block))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, dout), x), rstd)| {
            let mut dwp = vec![0.0f32; c];
            for (((dx, dout), x), &rs) in dx
                .chunks_mut(c)
                .zip(dout.chunks(c))
                .zip(x.chunks(c))
                .zip(rstd)
            {
                backward_row(dx, &mut dwp, dout, x, w, rs);
            }
            dwp
        })
        .collect();
    for p in &partials {
        for (d, &v) in dw.iter_mut().zip(p) {
            *d += v;
        }
    }
}
