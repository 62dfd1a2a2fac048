//! Rotary position embedding, HF layout (`rotate_half`): within each head of `d` channels, channel
//! `i < d/2` pairs with `i + d/2`, both rotated by the angle `pos · inv_freq[i]`.
//!
//! - forward:  in place on `x[b,t,h,d]`: `x ← x·cos + rotate_half(x)·sin`, i.e. for `i < d/2`
//!   `(x₁, x₂) ← (x₁·cos − x₂·sin, x₂·cos + x₁·sin)`.
//! - backward: in place on `dx[b,t,h,d]`: the transpose (rotation by −angle):
//!   `(g₁, g₂) ← (g₁·cos + g₂·sin, g₂·cos − g₁·sin)`.
//!
//! The angles are computed as HF `LlamaRotaryEmbedding` does in f32:
//! `inv_freq = 1.0 / theta ** (arange(0, d, 2).float() / d)`, `freqs = inv_freq · pos` (f32), then
//! `cos`/`sin` of that f32 angle. We evaluate `pow`, `cos` and `sin` in f64 and round to f32 (the
//! correctly rounded value; torch's vectorised f32 versions are within 1 ulp of it).

use super::shape::RopeShape;
use rayon::prelude::*;

/// HF's `inv_freq[i]` for `i < d/2`, in f32.
pub fn inv_freq(theta: f32, d: usize, i: usize) -> f32 {
    let expo = (2 * i) as f32 / d as f32;
    let p = (theta as f64).powf(expo as f64) as f32;
    1.0 / p
}

/// `(cos, sin)` of an f32 angle, correctly rounded to f32 (evaluated in f64).
#[inline]
pub fn cos_sin_of(angle: f32) -> (f32, f32) {
    let (s, c) = (angle as f64).sin_cos();
    (c as f32, s as f32)
}

/// `cos[i]`, `sin[i]` (`i < d/2`) of position `pos`, as HF computes them in f32
/// (`freqs = inv_freq · pos` in f32, then cos/sin).
pub fn cos_sin(cos: &mut [f32], sin: &mut [f32], theta: f32, d: usize, pos: usize) {
    for (i, (c, s)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        (*c, *s) = cos_sin_of(inv_freq(theta, d, i) * pos as f32);
    }
}

/// Shared loop: rotate every head of every token by `sign · angle`.
fn rope_apply(x: &mut [f32], shape: RopeShape, backward: bool) {
    let RopeShape {
        b,
        t,
        h,
        d,
        theta,
        pos_offset,
    } = shape;
    assert_eq!(
        x.len(),
        b * t * h * d,
        "rope: x is not [b={b}, t={t}, h={h}, d={d}]"
    );
    assert!(d.is_multiple_of(2), "rope: head dim {d} is odd");
    if x.is_empty() {
        return;
    }
    let half = d / 2;
    let inv: Vec<f32> = (0..half).map(|i| inv_freq(theta, d, i)).collect();
    x.par_chunks_mut(h * d)
        .enumerate()
        .with_min_len(4)
        .for_each(|(row, xr)| {
            let pos = pos_offset + row % t;
            let mut cos = vec![0.0f32; half];
            let mut sin = vec![0.0f32; half];
            for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&inv) {
                (*c, *s) = cos_sin_of(f * pos as f32);
            }
            for head in xr.chunks_mut(d) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, bb, c, s) = (x1[i], x2[i], cos[i], sin[i]);
                    if backward {
                        x1[i] = a * c + bb * s;
                        x2[i] = bb * c - a * s;
                    } else {
                        // HF: q*cos + rotate_half(q)*sin, rotate_half(q) = cat(-q2, q1).
                        x1[i] = a * c + (-bb) * s;
                        x2[i] = bb * c + a * s;
                    }
                }
            }
        });
}

/// In place on `x[b,t,h,d]`: rotate by the angles of positions `pos_offset + ti`.
pub fn rope_forward(x: &mut [f32], shape: RopeShape) {
    rope_apply(x, shape, false);
}

/// In place on `dx[b,t,h,d]`: the transpose of [`rope_forward`] (rotation by the negative angle).
pub fn rope_backward(dx: &mut [f32], shape: RopeShape) {
    rope_apply(dx, shape, true);
}
