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
//! summation order is fixed). A task gathers its heads into contiguous `[t, d]` matrices and walks
//! blocks of [`BLOCK`] query rows; each block's scores against the keys it may see (`0..r1`) are a
//! small GEMM, so at most `BLOCK × t` scores exist at a time and the masked upper triangle is
//! skipped except inside the diagonal block.

use super::math::{SharedMut, dot, exp_fast, exp_sub_sum, max, simd_fn};
use super::matmul::matmul_serial;
use super::shape::{AttnSaved, AttnShape, GemmShape};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per block.
pub const BLOCK: usize = 64;

/// `1/sqrt(d)` as HF computes `head_dim ** -0.5` (in f64, rounded to f32).
pub fn attention_scale(d: usize) -> f32 {
    (1.0 / (d as f64).sqrt()) as f32
}

/// Asserts `h` is a multiple of `hkv` and that `q`, `k`, `v` elements fit `shape`.
fn check_shapes(what: &str, q: usize, k: usize, v: usize, shape: AttnShape) {
    let AttnShape { b, t, h, hkv, d } = shape;
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
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
) {
    check_shapes("attention_forward", q.len(), k.len(), v.len(), shape);
    let AttnShape { b, t, h, hkv, d } = shape;
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
            let qh = gather(q, bi, t, h, hi, d);
            let kk = gather(k, bi, t, hkv, kh, d);
            let vv = gather(v, bi, t, hkv, kh, d);
            let mut oh = vec![0.0f32; t * d];
            let mut s = vec![0.0f32; BLOCK * t];
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t);
                let (m, s) = (r1 - r0, &mut s[..(r1 - r0) * r1]);
                // s[i, j] = scale · q_i · k_j for the block's rows and keys 0..r1.
                matmul_serial(
                    s,
                    &qh[r0 * d..r1 * d],
                    &kk[..r1 * d],
                    GemmShape::nt(m, r1, d),
                    scale,
                    0.0,
                );
                softmax_rows(s, &mut lse_row[r0..r1], r0, r1);
                // o = p · v
                matmul_serial(
                    &mut oh[r0 * d..r1 * d],
                    s,
                    &vv[..r1 * d],
                    GemmShape::nn(m, d, r1),
                    1.0,
                    0.0,
                );
            }
            // SAFETY: the (bi, ·, hi) rows of `out` belong to this task only.
            unsafe { scatter(&out, &oh, bi, t, h, hi, d) };
        });
}

simd_fn! {
    /// Row `ii` of the `[m, r1]` block `s` (query `i = r0 + ii`) becomes the causal softmax of its
    /// first `i + 1` scores (zeros after); `lse[ii] =` their log-sum-exp.
    fn softmax_rows(s: &mut [f32], lse: &mut [f32], r0: usize, r1: usize) {
        for (ii, row) in s.chunks_mut(r1).enumerate() {
            let (seen, masked) = row.split_at_mut(r0 + ii + 1);
            let mx = max(seen);
            let sum = exp_sub_sum(seen, mx);
            lse[ii] = mx + sum.ln();
            let inv = 1.0 / sum;
            seen.iter_mut().for_each(|e| *e *= inv);
            masked.fill(0.0);
        }
    }
}

simd_fn! {
    /// Backward of one block: on entry `p` holds the scaled scores and `ds` holds `dout · vᵀ`;
    /// on exit `p = exp(score − lse)` and `ds = p ⊙ (dp − dout·out)`, both 0 above the diagonal.
    /// `rows` = `r0..r1`, the block's query rows.
    fn backward_rows(
        p: &mut [f32],
        ds: &mut [f32],
        dout: &[f32],
        out: &[f32],
        lse: &[f32],
        rows: Range<usize>,
        d: usize,
    ) {
        let (r0, r1) = (rows.start, rows.end);
        for (ii, (prow, dsrow)) in p.chunks_mut(r1).zip(ds.chunks_mut(r1)).enumerate() {
            let i = r0 + ii;
            let l = lse[i];
            let di = dot(&dout[i * d..(i + 1) * d], &out[i * d..(i + 1) * d]);
            for (pj, dsj) in prow[..=i].iter_mut().zip(&mut dsrow[..=i]) {
                *pj = exp_fast(*pj - l);
                *dsj = *pj * (*dsj - di);
            }
            prow[i + 1..].fill(0.0);
            dsrow[i + 1..].fill(0.0);
        }
    }
}

/// Head `hi` of batch `bi` of `x[b,t,heads,d]` as a contiguous `[t, d]` matrix.
fn gather(x: &[f32], bi: usize, t: usize, heads: usize, hi: usize, d: usize) -> Vec<f32> {
    let mut m = Vec::with_capacity(t * d);
    for i in 0..t {
        m.extend_from_slice(&x[((bi * t + i) * heads + hi) * d..][..d]);
    }
    m
}

/// Writes a `[t, d]` matrix back as head `hi` of batch `bi` of `x[b,t,heads,d]`.
///
/// # Safety
/// No other task may touch those rows of `x` meanwhile.
unsafe fn scatter(
    x: &SharedMut,
    m: &[f32],
    bi: usize,
    t: usize,
    heads: usize,
    hi: usize,
    d: usize,
) {
    for (i, row) in m.chunks(d).enumerate() {
        // SAFETY: the caller's promise.
        unsafe { x.slice(((bi * t + i) * heads + hi) * d, d) }.copy_from_slice(row);
    }
}

/// `dq =`, `dk =`, `dv =` of [`attention_forward`], from `dout`, the inputs and the saved
/// `out` and `lse`.
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    saved: AttnSaved<&[f32]>,
    shape: AttnShape,
) {
    let AttnSaved { q, k, v, out, lse } = saved;
    check_shapes("attention_backward", q.len(), k.len(), v.len(), shape);
    let AttnShape { b, t, h, hkv, d } = shape;
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
        let kk = gather(k, bi, t, hkv, kh, d);
        let vv = gather(v, bi, t, hkv, kh, d);
        let (mut dkh, mut dvh) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
        let mut p = vec![0.0f32; BLOCK * t];
        let mut ds = vec![0.0f32; BLOCK * t];
        for hi in kh * group..(kh + 1) * group {
            let qh = gather(q, bi, t, h, hi, d);
            let doh = gather(dout, bi, t, h, hi, d);
            let oh = gather(out, bi, t, h, hi, d);
            let lse_row = &lse[(bi * h + hi) * t..][..t];
            let mut dqh = vec![0.0f32; t * d];
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t);
                let m = r1 - r0;
                let (p, ds) = (&mut p[..m * r1], &mut ds[..m * r1]);
                let (q_blk, do_blk) = (&qh[r0 * d..r1 * d], &doh[r0 * d..r1 * d]);
                // p = exp(scale · q kᵀ − lse), 0 above the diagonal.
                matmul_serial(p, q_blk, &kk[..r1 * d], GemmShape::nt(m, r1, d), scale, 0.0);
                // dp = dout · vᵀ
                matmul_serial(ds, do_blk, &vv[..r1 * d], GemmShape::nt(m, r1, d), 1.0, 0.0);
                backward_rows(p, ds, &doh, &oh, lse_row, r0..r1, d);
                // dq = scale · ds · k;  dk += scale · dsᵀ · q;  dv += pᵀ · dout
                let dq_blk = &mut dqh[r0 * d..r1 * d];
                matmul_serial(
                    dq_blk,
                    ds,
                    &kk[..r1 * d],
                    GemmShape::nn(m, d, r1),
                    scale,
                    0.0,
                );
                matmul_serial(
                    &mut dkh[..r1 * d],
                    ds,
                    q_blk,
                    GemmShape::tn(r1, d, m),
                    scale,
                    1.0,
                );
                matmul_serial(
                    &mut dvh[..r1 * d],
                    p,
                    do_blk,
                    GemmShape::tn(r1, d, m),
                    1.0,
                    1.0,
                );
            }
            // SAFETY: the dq rows of query head (bi, hi) belong to this task only.
            unsafe { scatter(&dq, &dqh, bi, t, h, hi, d) };
        }
        // SAFETY: the dk/dv rows of kv head (bi, kh) belong to this task only.
        unsafe {
            scatter(&dk, &dkh, bi, t, hkv, kh, d);
            scatter(&dv, &dvh, bi, t, hkv, kh, d);
        }
    });
}
