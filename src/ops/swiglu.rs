//! SwiGLU gate of the LLaMA MLP: `out = silu(gate) · up`, `silu(g) = g / (1 + exp(−g))`.
//!
//! - forward:  `out[len] =`.
//! - backward: `dgate =`, `dup =`: with `σ = sigmoid(g)`, `dup = dout · silu(g)`,
//!   `dgate = dout · up · σ · (1 + g·(1 − σ))` (torch's `silu_backward` applied to `dout · up`).

use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 4096;

/// `silu(g) = g / (1 + exp(-g))` as torch evaluates it in f32.
#[inline]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
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
        .for_each(|((o, g), u)| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = silu(g) * u;
            }
        });
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
        .for_each(|((((dg, du), d), g), u)| {
            for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du).zip(d).zip(g).zip(u) {
                let sig = 1.0 / (1.0 + (-g).exp());
                *du = d * (g * sig);
                *dg = (d * u) * sig * (1.0 + g * (1.0 - sig));
            }
        });
}
