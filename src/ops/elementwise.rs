//! Elementwise helpers on flat ranges: `zero` (`out =`), `copy` (`out =`), `axpy` (`out +=`),
//! `scale` (`out *=`) and the f64 `sum_squares` used for the gradient norm and NaN checks.

use rayon::prelude::*;

/// Elements per rayon task; also the fixed blocking of `sum_squares` (deterministic result).
const CHUNK: usize = 1 << 14;

/// `out = 0`.
pub fn zero(out: &mut [f32]) {
    out.par_chunks_mut(CHUNK).for_each(|o| o.fill(0.0));
}

/// `out = x`.
pub fn copy(out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), x.len(), "copy: out and x differ in length");
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| o.copy_from_slice(x));
}

/// `out += alpha * x`.
pub fn axpy(out: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(out.len(), x.len(), "axpy: out and x differ in length");
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| super::math::axpy_slice(o, alpha, x));
}

/// `out *= alpha`.
pub fn scale(out: &mut [f32], alpha: f32) {
    out.par_chunks_mut(CHUNK)
        .for_each(|o| o.iter_mut().for_each(|v| *v *= alpha));
}

/// `Σ x²` accumulated in f64 (blocks summed in a fixed order); non-finite if any `x` is.
pub fn sum_squares(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| {
            let mut acc = [0.0f64; 8];
            let it = c.chunks_exact(8);
            let rest = it.remainder();
            for c8 in it {
                for l in 0..8 {
                    acc[l] += (c8[l] as f64) * (c8[l] as f64);
                }
            }
            for (l, &v) in rest.iter().enumerate() {
                acc[l] += (v as f64) * (v as f64);
            }
            acc.iter().sum::<f64>()
        })
        .collect();
    partial.iter().sum()
}
