//! `fill_uniform` (`out =`): pseudo-random uniform values from a counter-based hash, so any backend
//! produces the same values for the same `(seed, index)` without sharing generator state (the CUDA
//! kernel `fill_uniform_v1_*` in `kernels/fill.cu` computes exactly this). Used to initialise large
//! models on the device (`Llama::random_on_device`) without generating them on the host.

use crate::util::hash::mix64;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// The value at index `i` of the stream `seed` in `[lo, hi)`: the top 24 bits of
/// `mix64(mix64(seed) ^ i)` as `u ∈ [0, 1)` (multiples of 2⁻²⁴, exact in f32), then
/// `fma(u, hi - lo, lo)` in f32, moved to the largest float below `hi` if rounding reached it.
/// `lo == hi` gives `lo`.
pub fn uniform_at(key: u64, i: u64, lo: f32, hi: f32) -> f32 {
    let bits = mix64(key ^ i) >> 40;
    let u = bits as f32 * (1.0 / (1u64 << 24) as f32);
    let v = u.mul_add(hi - lo, lo);
    if hi > lo && v >= hi {
        hi.next_down()
    } else {
        v
    }
}

/// The per-stream key (the CUDA launcher passes the same `mix64(seed)` to the kernel).
pub fn uniform_key(seed: u64) -> u64 {
    mix64(seed)
}

/// `out[i] = uniform_at(uniform_key(seed), i, lo, hi)` for every `i` (index relative to `out`).
pub fn fill_uniform(out: &mut [f32], seed: u64, lo: f32, hi: f32) {
    let key = uniform_key(seed);
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
        let base = (ci * CHUNK) as u64;
        for (j, x) in o.iter_mut().enumerate() {
            *x = uniform_at(key, base + j as u64, lo, hi);
        }
    });
}
