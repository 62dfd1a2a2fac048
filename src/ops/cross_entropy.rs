//! Cross-entropy over the vocabulary with ignore index `-100` (torch's `cross_entropy` on f32
//! logits, per row; the caller reduces, e.g. HF's mean over non-ignored rows).
//!
//! - forward:  `losses[n] =` `logsumexp(logits_row) − logits_row[target]`, `0` on ignored rows.
//!   Evaluated as torch's `log_softmax`: `−((x_t − max) − ln Σ exp(x − max))`.
//! - backward: `dlogits[n,v] = scale · (softmax(logits_row) − onehot(target))`, `0` on ignored rows
//!   (`=`; HF's mean is `scale = 1 / count`).
//!
//! `exp` is [`exp_fast`] (≤ 2 ulp, vectorised); a row's sum runs in 16 fixed lanes. The backward
//! evaluates one `exp` per logit: `exp(x − max) · (scale / Σ)`.

use super::math::{exp_fast, exp_sub_sum_into, max, reduce_lanes, simd_fn};
use rayon::prelude::*;

/// The label that marks a row as not predicted.
pub const IGNORE_INDEX: i32 = -100;

/// `Some(target)` for a predicted row, `None` for an ignored one; panics on any other label.
fn target_of(t: i32, v: usize) -> Option<usize> {
    if t == IGNORE_INDEX {
        return None;
    }
    assert!(
        t >= 0 && (t as usize) < v,
        "cross_entropy: target {t} is neither -100 nor in 0..{v}"
    );
    Some(t as usize)
}

/// `(max, ln Σ exp(x − max))` of one row.
#[inline(always)]
fn row_stats(x: &[f32]) -> (f32, f32) {
    let m = max(x);
    let mut acc = [0.0f32; 16];
    let it = x.chunks_exact(16);
    let rest = it.remainder();
    for c in it {
        for l in 0..16 {
            acc[l] += exp_fast(c[l] - m);
        }
    }
    for (l, &xv) in rest.iter().enumerate() {
        acc[l] += exp_fast(xv - m);
    }
    (m, reduce_lanes(acc).ln())
}

simd_fn! {
    /// One row's loss, as torch's `log_softmax` + `nll_loss`.
    fn row_loss(x: &[f32], t: usize) -> f32 {
        let (m, log_sum) = row_stats(x);
        -((x[t] - m) - log_sum)
    }
}

simd_fn! {
    /// One row's `scale · (softmax − onehot(t))`: one `exp` per logit, stored, then scaled by
    /// `scale / Σ` (torch's `exp(log_softmax)·scale` up to an ulp).
    fn row_grad(dl: &mut [f32], x: &[f32], t: usize, scale: f32) {
        let m = max(x);
        let sum = exp_sub_sum_into(dl, x, m);
        let f = scale / sum;
        dl.iter_mut().for_each(|d| *d *= f);
        dl[t] -= scale;
    }
}

/// `losses[i] = logsumexp(logits[i,:]) − logits[i, targets[i]]`, `0` where `targets[i] == -100`.
pub fn cross_entropy_forward(
    losses: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    n: usize,
    v: usize,
) {
    assert_eq!(
        losses.len(),
        n,
        "cross_entropy_forward: losses is not [n={n}]"
    );
    assert_eq!(
        logits.len(),
        n * v,
        "cross_entropy_forward: logits is not [n={n}, v={v}]"
    );
    assert_eq!(
        targets.len(),
        n,
        "cross_entropy_forward: targets is not [n={n}]"
    );
    losses
        .par_iter_mut()
        .zip(targets.par_iter())
        .enumerate()
        .for_each(|(i, (loss, &t))| {
            *loss = match target_of(t, v) {
                None => 0.0,
                Some(t) => row_loss(&logits[i * v..(i + 1) * v], t),
            };
        });
}

/// `dlogits[i,:] = scale · (softmax(logits[i,:]) − onehot(targets[i]))`, `0` on ignored rows.
pub fn cross_entropy_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    n: usize,
    v: usize,
    scale: f32,
) {
    assert_eq!(
        dlogits.len(),
        n * v,
        "cross_entropy_backward: dlogits is not [n={n}, v={v}]"
    );
    assert_eq!(
        logits.len(),
        n * v,
        "cross_entropy_backward: logits is not [n={n}, v={v}]"
    );
    assert_eq!(
        targets.len(),
        n,
        "cross_entropy_backward: targets is not [n={n}]"
    );
    if v == 0 {
        return;
    }
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .for_each(|((dl, x), &t)| match target_of(t, v) {
            None => dl.fill(0.0),
            Some(t) => row_grad(dl, x, t, scale),
        });
}
