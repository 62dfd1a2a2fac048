//! Causal scaled-dot-product attention with grouped-query heads (GQA).
//!
//! Shapes: `q[b,t,h,d]`, `k`/`v[b,t,hkv,d]`, `out[b,t,h,d]`, `lse[b,h,t]`. Query head `hi` reads
//! key/value head `hi / (h / hkv)`; query `i` attends to keys `0..=i`; scale `1/sqrt(d)`.
//!
//! - forward:  `out =`, `lse =` (log-sum-exp of each query's scaled scores, saved).
//! - backward: `dq =`, `dk =`, `dv =`; the probabilities are recomputed from `q`, `k` and `lse`:
//!   `p_j = exp(s_j − lse)`, `dp_j = dout·v_j`, `ds_j = p_j (dp_j − dout·out)`,
//!   `dq = scale Σ_j ds_j k_j`, `dk_j += scale ds_j q`, `dv_j += p_j dout`.
//!
//! Work is split per (batch, head) in the forward and per (batch, kv head) in the backward (that
//! task owns the dk/dv rows it accumulates, so no two tasks write the same element and the
//! summation order is fixed). Nothing of size `t × t` is materialised.

use super::math::{SharedMut, axpy_slice, dot};
use rayon::prelude::*;

/// `1/sqrt(d)` as HF computes `head_dim ** -0.5` (in f64, rounded to f32).
pub fn attention_scale(d: usize) -> f32 {
    (1.0 / (d as f64).sqrt()) as f32
}

#[allow(clippy::too_many_arguments)]
fn check_shapes(
    what: &str,
    q: usize,
    k: usize,
    v: usize,
    b: usize,
    t: usize,
    h: usize,
    hkv: usize,
    d: usize,
) {
    assert!(
        hkv > 0 && h.is_multiple_of(hkv),
        "{what}: {h} query heads are not a multiple of {hkv} kv heads"
    );
    assert_eq!(
        q,
        b * t * h * d,
        "{what}: q is not [b={b}, t={t}, h={h}, d={d}]"
    );
    assert_eq!(
        k,
        b * t * hkv * d,
        "{what}: k is not [b={b}, t={t}, hkv={hkv}, d={d}]"
    );
    assert_eq!(
        v,
        b * t * hkv * d,
        "{what}: v is not [b={b}, t={t}, hkv={hkv}, d={d}]"
    );
}

/// `out[b,t,h,d] = softmax(q·kᵀ·scale + causal mask)·v`, `lse[b,h,t] =` the log-sum-exp of the
/// scaled, masked scores.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    t: usize,
    h: usize,
    hkv: usize,
    d: usize,
) {
    check_shapes(
        "attention_forward",
        q.len(),
        k.len(),
        v.len(),
        b,
        t,
        h,
        hkv,
        d,
    );
    assert_eq!(
        out.len(),
        q.len(),
        "attention_forward: out is not shaped like q"
    );
    assert_eq!(
        lse.len(),
        b * h * t,
        "attention_forward: lse is not [b={b}, h={h}, t={t}]"
    );
    let group = h / hkv;
    let scale = attention_scale(d);
    let out = SharedMut::new(out);
    // lse[b,h,:] is contiguous: one chunk per (batch, head) task.
    lse.par_chunks_mut(t.max(1))
        .enumerate()
        .for_each(|(bh, lse_row)| {
            let (bi, hi) = (bh / h, bh % h);
            let kh = hi / group;
            let q_at = |i: usize| &q[((bi * t + i) * h + hi) * d..][..d];
            let k_at = |j: usize| &k[((bi * t + j) * hkv + kh) * d..][..d];
            let v_at = |j: usize| &v[((bi * t + j) * hkv + kh) * d..][..d];
            let mut s = vec![0.0f32; t];
            for i in 0..t {
                let qi = q_at(i);
                let mut m = f32::NEG_INFINITY;
                for (j, sj) in s[..=i].iter_mut().enumerate() {
                    *sj = dot(qi, k_at(j)) * scale;
                    m = m.max(*sj);
                }
                let mut sum = 0.0f32;
                for sj in &mut s[..=i] {
                    *sj = (*sj - m).exp();
                    sum += *sj;
                }
                lse_row[i] = m + sum.ln();
                let inv = 1.0 / sum;
                // SAFETY: row (bi, i, hi) of `out` belongs to this task only.
                let o = unsafe { out.slice(((bi * t + i) * h + hi) * d, d) };
                o.fill(0.0);
                for (j, &e) in s[..=i].iter().enumerate() {
                    axpy_slice(o, e * inv, v_at(j));
                }
            }
        });
}

/// `dq =`, `dk =`, `dv =` of [`attention_forward`], from `dout`, the inputs and the saved
/// `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    h: usize,
    hkv: usize,
    d: usize,
) {
    check_shapes(
        "attention_backward",
        q.len(),
        k.len(),
        v.len(),
        b,
        t,
        h,
        hkv,
        d,
    );
    assert_eq!(
        dq.len(),
        q.len(),
        "attention_backward: dq is not shaped like q"
    );
    assert_eq!(
        dk.len(),
        k.len(),
        "attention_backward: dk is not shaped like k"
    );
    assert_eq!(
        dv.len(),
        v.len(),
        "attention_backward: dv is not shaped like v"
    );
    assert_eq!(
        dout.len(),
        q.len(),
        "attention_backward: dout is not shaped like q"
    );
    assert_eq!(
        out.len(),
        q.len(),
        "attention_backward: out is not shaped like q"
    );
    assert_eq!(
        lse.len(),
        b * h * t,
        "attention_backward: lse is not [b={b}, h={h}, t={t}]"
    );
    let group = h / hkv;
    let scale = attention_scale(d);
    let (dq, dk, dv) = (SharedMut::new(dq), SharedMut::new(dk), SharedMut::new(dv));
    (0..b * hkv).into_par_iter().for_each(|bk| {
        let (bi, kh) = (bk / hkv, bk % hkv);
        let kv_off = |j: usize| ((bi * t + j) * hkv + kh) * d;
        let k_at = |j: usize| &k[kv_off(j)..][..d];
        let v_at = |j: usize| &v[kv_off(j)..][..d];
        // SAFETY (all `slice` calls below): the dk/dv rows of kv head (bi, kh) and the dq rows of
        // its query heads belong to this task only, and each is borrowed once at a time.
        for j in 0..t {
            unsafe {
                dk.slice(kv_off(j), d).fill(0.0);
                dv.slice(kv_off(j), d).fill(0.0);
            }
        }
        let mut p = vec![0.0f32; t];
        for hi in kh * group..(kh + 1) * group {
            let q_off = |i: usize| ((bi * t + i) * h + hi) * d;
            for i in 0..t {
                let qi = &q[q_off(i)..][..d];
                let doi = &dout[q_off(i)..][..d];
                let di = dot(doi, &out[q_off(i)..][..d]);
                let l = lse[(bi * h + hi) * t + i];
                for (j, pj) in p[..=i].iter_mut().enumerate() {
                    *pj = (dot(qi, k_at(j)) * scale - l).exp();
                }
                let dqi = unsafe { dq.slice(q_off(i), d) };
                dqi.fill(0.0);
                for (j, &pj) in p[..=i].iter().enumerate() {
                    let ds = pj * (dot(doi, v_at(j)) - di);
                    axpy_slice(dqi, ds * scale, k_at(j));
                    axpy_slice(unsafe { dk.slice(kv_off(j), d) }, ds * scale, qi);
                    axpy_slice(unsafe { dv.slice(kv_off(j), d) }, pj, doi);
                }
            }
        }
    });
}
