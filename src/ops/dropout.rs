//! Dropout by a stateless mask: `dropout` (`out *=`, in place) keeps element `i` when a uniform drawn
//! from a counter-based hash of (`key`, `i`) is at least `p`, scaling kept values by `1/(1-p)`. The
//! same key gives the same mask, so the backward is the same call on the gradient and a resumed run
//! replays exactly. `kernels/dropout.cu` draws the identical mask on the device (integer logic only).

use crate::util::hash::mix64;
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// The uniform in `[0, 1)` of element `i` under `key`: the top 24 bits of `mix64(key ^ i)`, exact
/// in f32.
#[inline]
pub fn dropout_uniform(key: u64, i: u64) -> f32 {
    (mix64(key ^ i) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// `out[i] = uniform(key, i) >= p ? out[i] / (1 - p) : 0` (`i` counts from the start of `out`);
/// `p = 0` leaves `out` untouched. `key` is the per-tensor key (the caller mixes in layer/projection).
pub fn dropout(out: &mut [f32], p: f32, key: u64) {
    if p == 0.0 {
        return;
    }
    let keep_scale = 1.0 / (1.0 - p);
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let base = (c * CHUNK) as u64;
        for (j, v) in o.iter_mut().enumerate() {
            let u = dropout_uniform(key, base + j as u64);
            *v = if u >= p { *v * keep_scale } else { 0.0 };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_chunks_equal_a_serial_loop() {
        // Longer than several CHUNKs so the chunk offset matters.
        let n = 3 * CHUNK + 17;
        let x: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
        let mut got = x.clone();
        dropout(&mut got, 0.3, 0xabcdef);
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let h = mix64(0xabcdef ^ i as u64) >> 40;
                if (h as f64) / (1u64 << 24) as f64 >= 0.3f32 as f64 {
                    v / 0.7
                } else {
                    0.0
                }
            })
            .collect();
        // Kept values: v·(1/0.7) in f32 vs v/0.7 — within one rounding of each other.
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 2.0 * f32::EPSILON * w.abs(), "{g} vs {w}");
            assert_eq!(*g == 0.0, *w == 0.0);
        }
        let mut same = x.clone();
        dropout(&mut same, 0.0, 1);
        assert_eq!(same, x, "p = 0 is the identity");
    }
}
