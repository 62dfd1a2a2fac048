//! Elementwise helpers on flat ranges: `zero` (`out =`), `copy` (`out =`), `axpy` (`out +=`),
//! `scale` (`out *=`), the f64 `sum_squares` used for NaN checks, and `sum_squares_tree`, the
//! f64 sum of squares in the canonical pairwise order the distributed gradient norm is built from.

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

/// `Σ x` accumulated in f64, left to right (the per-token losses of a forward: their sum is the
/// one number the loss needs on the host).
pub fn sum(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum()
}

/// `Σ x²` in f64 over the canonical pairwise tree of `x`'s indices: split `n` leaves at the
/// largest power of two strictly below `n`, sum both sides the same way, add. Squares of f32 are
/// exact in f64, so the value depends only on the tree, which depends only on `x.len()`; a tree
/// node's value is therefore the same whichever rank (or world size) computes it, which is what
/// makes the ZeRO-2 gradient norm bit-identical across world sizes.
pub fn sum_squares_tree(x: &[f32]) -> f64 {
    const LEAF: usize = 1024;
    let n = x.len();
    if n == 0 {
        return 0.0;
    }
    if n.is_power_of_two() && n <= LEAF {
        // Level by level: buf[i] = node(2i) + node(2i+1), which is the tree's pairing.
        let mut buf = [0f64; LEAF];
        for (b, &v) in buf.iter_mut().zip(x) {
            *b = v as f64 * v as f64;
        }
        let mut m = n;
        while m > 1 {
            m /= 2;
            for i in 0..m {
                buf[i] = buf[2 * i] + buf[2 * i + 1];
            }
        }
        return buf[0];
    }
    let p = n.next_power_of_two();
    let h = if p == n { n / 2 } else { p / 2 };
    sum_squares_tree(&x[..h]) + sum_squares_tree(&x[h..])
}
