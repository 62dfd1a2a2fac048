//! One AdamW step, as `torch.optim.AdamW` (single-tensor path, `amsgrad=False`, `maximize=False`):
//!
//! ```text
//! p ← p · (1 − lr·wd)                              (decoupled weight decay)
//! m ← m.lerp(g, 1 − β₁)                            (= β₁·m + (1 − β₁)·g)
//! v ← v·β₂ + (1 − β₂)·g·g
//! denom = sqrt(v) / sqrt(1 − β₂^step) + eps
//! p ← p − (lr / (1 − β₁^step)) · m / denom
//! ```
//!
//! `param =`, `m =`, `v =` updated in place from `grad`. The scalar coefficients are computed in f64
//! as torch does with Python floats, then rounded to f32 where torch's f32 kernels use them; the
//! f32 hyper-parameters are first widened through their shortest decimal form (`0.9f32 → 0.9`), so
//! a config value gives the same f64 as the Python literal would.

use super::math::simd_fn;
use rayon::prelude::*;

/// Hyper-parameters of one AdamW step (as `torch.optim.AdamW`: decoupled decay, bias correction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 13;

/// The f64 a Python literal with the same shortest decimal form as `x` would have.
fn widen(x: f32) -> f64 {
    format!("{x}")
        .parse()
        .expect("a formatted f32 parses as f64")
}

/// torch's `lerp(a, b, w)` in f32 (two formulas, chosen by `|w| < 0.5`, for accuracy).
#[inline(always)]
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// One AdamW step over a flat range (see the module doc for the exact arithmetic).
pub fn adamw_step(param: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], hp: AdamW) {
    let len = param.len();
    assert_eq!(m.len(), len, "adamw_step: m and param differ in length");
    assert_eq!(v.len(), len, "adamw_step: v and param differ in length");
    assert_eq!(
        grad.len(),
        len,
        "adamw_step: grad and param differ in length"
    );
    assert!(hp.step >= 1, "adamw_step: step is 1-based");
    let (lr, b1, b2, eps, wd) = (
        widen(hp.lr),
        widen(hp.beta1),
        widen(hp.beta2),
        widen(hp.eps),
        widen(hp.weight_decay),
    );
    let step = hp.step as f64;
    let decay = (1.0 - lr * wd) as f32;
    let w1 = (1.0 - b1) as f32;
    let beta2 = b2 as f32;
    let w2 = (1.0 - b2) as f32;
    let bias_correction1 = 1.0 - b1.powf(step);
    let bias_correction2 = 1.0 - b2.powf(step);
    let neg_step_size = (-(lr / bias_correction1)) as f32;
    let bc2_sqrt = bias_correction2.sqrt() as f32;
    let eps = eps as f32;
    param
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            let k = Coefs {
                decay,
                w1,
                beta2,
                w2,
                bc2_sqrt,
                eps,
                neg_step_size,
            };
            adamw_chunk(p, m, v, g, k)
        });
}

/// The f32 scalars of one step, as torch's kernels receive them.
#[derive(Clone, Copy)]
struct Coefs {
    decay: f32,
    w1: f32,
    beta2: f32,
    w2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

simd_fn! {
    fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: Coefs) {
        for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
            *p *= k.decay;
            *m = lerp(*m, g, k.w1);
            *v = *v * k.beta2 + k.w2 * g * g;
            let denom = v.sqrt() / k.bc2_sqrt + k.eps;
            *p += k.neg_step_size * *m / denom;
        }
    }
}
