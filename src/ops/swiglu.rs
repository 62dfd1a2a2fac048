//! SwiGLU gate of the LLaMA MLP: `out = silu(gate) · up`, `silu(g) = g / (1 + exp(−g))`.
//!
//! - forward:  `out[len] =`.
//! - backward: `dgate =`, `dup =`: with `σ = sigmoid(g)`, `dup = dout · silu(g)`,
//!   `dgate = dout · up · σ · (1 + g·(1 − σ))` (torch's `silu_backward` applied to `dout · up`).

use super::math::{exp_fast, simd_fn};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 4096;

/// `silu(g) = g / (1 + exp(-g))` as torch evaluates it in f32 (with the ≤ 2 ulp [`exp_fast`]).
#[inline(always)]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + exp_fast(-g))
}

simd_fn! {
    fn forward_chunk(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }
}

simd_fn! {
    fn backward_chunk(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
        for ((((dg, du), &d), &g), &u) in dgate.iter_mut().zip(dup).zip(dout).zip(gate).zip(up) {
            let sig = 1.0 / (1.0 + exp_fast(-g));
            *du = d * (g * sig);
            *dg = (d * u) * sig * (1.0 + g * (1.0 - sig));
        }
    }
}

/// `out = silu(gate) * up`.
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        out.len(),
        "swiglu_forward: gate and out differ in length"
    );
    assert_eq!(
        up.len(),
        out.len(),
        "swiglu_forward: up and out differ in length"
    );
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| forward_chunk(o, g, u));
}

/// `dgate = dout·up·σ(g)·(1 + g·(1−σ(g)))`, `dup = dout·silu(g)`.
pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    let len = dout.len();
    assert_eq!(
        dgate.len(),
        len,
        "swiglu_backward: dgate and dout differ in length"
    );
    assert_eq!(
        dup.len(),
        len,
        "swiglu_backward: dup and dout differ in length"
    );
    assert_eq!(
        gate.len(),
        len,
        "swiglu_backward: gate and dout differ in length"
    );
    assert_eq!(
        up.len(),
        len,
        "swiglu_backward: up and dout differ in length"
    );
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((((dg, du), d), g), u)| backward_chunk(dg, du, d, g, u));
}
