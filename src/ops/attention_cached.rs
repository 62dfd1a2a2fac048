//! Attention of new queries over a key/value cache (generation with a KV cache).
//!
//! Shapes: `q[b,tq,h,d]`, `kcache`/`vcache[b,tmax,hkv,d]` holding positions `0..past+tq` (the new
//! keys already written at `past..past+tq`), `out[b,tq,h,d]`. Query `i` is at absolute position
//! `past + i` and attends to keys `0..=past+i`; query head `hi` reads kv head `hi / (h / hkv)`;
//! scale `1/sqrt(d)` as in [`super::attention`].
//!
//! - forward: `out =`. There is no backward: this path is for inference only.
//!
//! One task per (batch, query, head) output row; scores are computed with a max-subtracted
//! softmax in f32, exactly the arithmetic a reader expects, rather than the blocked GEMMs of the
//! training path (a decode step has one query per head, so there is nothing to block).

use super::attention::attention_scale;
use super::math::dot;
use super::shape::CachedAttnShape;
use rayon::prelude::*;

/// `out[b,tq,h,d] = softmax(q·kᵀ·scale, causal from position past)·v` over the cache.
pub fn attention_cached_forward(
    out: &mut [f32],
    q: &[f32],
    kcache: &[f32],
    vcache: &[f32],
    shape: CachedAttnShape,
) {
    let CachedAttnShape {
        b,
        tq,
        past,
        tmax,
        h,
        hkv,
        d,
    } = shape;
    assert!(
        hkv > 0 && h.is_multiple_of(hkv),
        "attention_cached_forward: {h} heads not a multiple of {hkv} kv heads"
    );
    assert!(
        past + tq <= tmax,
        "attention_cached_forward: {past}+{tq} positions exceed the cache ({tmax})"
    );
    assert_eq!(
        q.len(),
        b * tq * h * d,
        "attention_cached_forward: q is not [b={b}, tq={tq}, h={h}, d={d}]"
    );
    assert_eq!(
        out.len(),
        q.len(),
        "attention_cached_forward: out is not shaped like q"
    );
    let cache_len = b * tmax * hkv * d;
    assert_eq!(
        kcache.len(),
        cache_len,
        "attention_cached_forward: kcache is not [b={b}, tmax={tmax}, hkv={hkv}, d={d}]"
    );
    assert_eq!(
        vcache.len(),
        cache_len,
        "attention_cached_forward: vcache is not [b={b}, tmax={tmax}, hkv={hkv}, d={d}]"
    );
    if d == 0 {
        return;
    }
    let group = h / hkv;
    let scale = attention_scale(d);
    out.par_chunks_mut(d).enumerate().for_each_init(
        || vec![0.0f32; past + tq],
        |scores, (row, o)| {
            let (bi, i, hi) = (row / (tq * h), row / h % tq, row % h);
            let kh = hi / group;
            let qrow = &q[row * d..(row + 1) * d];
            let keys = past + i + 1;
            let at = |j: usize| ((bi * tmax + j) * hkv + kh) * d;
            let mut m = f32::NEG_INFINITY;
            for (j, s) in scores[..keys].iter_mut().enumerate() {
                *s = dot(qrow, &kcache[at(j)..at(j) + d]) * scale;
                m = m.max(*s);
            }
            let mut sum = 0.0f32;
            for s in scores[..keys].iter_mut() {
                *s = (*s - m).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (j, &p) in scores[..keys].iter().enumerate() {
                let w = p / sum;
                for (oo, &vv) in o.iter_mut().zip(&vcache[at(j)..at(j) + d]) {
                    *oo += w * vv;
                }
            }
        },
    );
}
