//! Cross-entropy over the vocabulary with ignore index `-100` (torch's `cross_entropy` on f32
//! logits, per row; the caller reduces, e.g. HF's mean over non-ignored rows).
//!
//! - forward:  `losses[n] =` `logsumexp(logits_row) − logits_row[target]`, `0` on ignored rows.
//!   Evaluated as torch's `log_softmax`: `−((x_t − max) − ln Σ exp(x − max))`.
//! - backward: `dlogits[n,v] = scale · (softmax(logits_row) − onehot(target))`, `0` on ignored rows
//!   (`=`; HF's mean is `scale = 1 / count`).

use super::math::max;
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
fn row_stats(x: &[f32]) -> (f32, f32) {
    let m = max(x);
    let mut acc = [0.0f32; 16];
    let it = x.chunks_exact(16);
    let rest = it.remainder();
    for c in it {
        for l in 0..16 {
            acc[l] += (c[l] - m).exp();
        }
    }
    for (l, &xv) in rest.iter().enumerate() {
        acc[l] += (xv - m).exp();
    }
    (m, super::math::reduce_lanes(acc).ln())
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
                Some(t) => {
                    let x = &logits[i * v..(i + 1) * v];
                    let (m, log_sum) = row_stats(x);
                    -((x[t] - m) - log_sum)
                }
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
            Some(t) => {
                let (m, log_sum) = row_stats(x);
                for (d, &xv) in dl.iter_mut().zip(x) {
                    // torch: exp(log_softmax) = exp((x − max) − ln Σ).
                    *d = ((xv - m) - log_sum).exp() * scale;
                }
                dl[t] -= scale;
            }
        });
}
