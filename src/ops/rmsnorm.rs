//! RMSNorm as HF `LlamaRMSNorm` in f32: `y = (x · rstd) · w`, `rstd = 1/sqrt(mean(x²) + eps)`.
//!
//! - forward:  `out[n,c] =`, `rstd[n] =` (saved for the backward).
//! - backward: `dx[n,c] +=` (the residual stream's gradient accumulates), `dw[c] +=`.
//!
//! Backward, with `x̂ = x·rstd` and `g = dout ⊙ w`:
//! `dx = rstd · (g − x̂ · mean(g ⊙ x̂))`, `dw = Σ_rows dout ⊙ x̂`.

use rayon::prelude::*;

/// Rows per rayon task; also the fixed blocking of the `dw` reduction, so `dw` does not depend on
/// the number of threads.
const ROWS_PER_TASK: usize = 16;

/// `out[n,c] = x / sqrt(mean(x²) + eps) * w`, `rstd[n] = 1 / sqrt(mean(x²) + eps)`.
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
    eps: f32,
) {
    assert_eq!(
        out.len(),
        n * c,
        "rmsnorm_forward: out is not [n={n}, c={c}]"
    );
    assert_eq!(rstd.len(), n, "rmsnorm_forward: rstd is not [n={n}]");
    assert_eq!(x.len(), n * c, "rmsnorm_forward: x is not [n={n}, c={c}]");
    assert_eq!(w.len(), c, "rmsnorm_forward: w is not [c={c}]");
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, r), x)| {
            // HF: variance = x.pow(2).mean(-1) in f32; we sum the f32 squares in f64, which is at
            // least as accurate as torch's f32 cascade sum, then round the mean to f32.
            let ss: f64 = x.iter().map(|&v| (v * v) as f64).sum();
            let var = (ss / c as f64) as f32;
            let rs = 1.0 / (var + eps).sqrt();
            *r = rs;
            for ((o, &xv), &wv) in o.iter_mut().zip(x).zip(w) {
                *o = (xv * rs) * wv;
            }
        });
}

/// `dx[n,c] += rstd·(g − x̂·mean(g⊙x̂))` with `g = dout⊙w`, `x̂ = x·rstd`; `dw[c] += Σ dout⊙x̂`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    assert_eq!(
        dx.len(),
        n * c,
        "rmsnorm_backward: dx is not [n={n}, c={c}]"
    );
    assert_eq!(dw.len(), c, "rmsnorm_backward: dw is not [c={c}]");
    assert_eq!(
        dout.len(),
        n * c,
        "rmsnorm_backward: dout is not [n={n}, c={c}]"
    );
    assert_eq!(x.len(), n * c, "rmsnorm_backward: x is not [n={n}, c={c}]");
    assert_eq!(w.len(), c, "rmsnorm_backward: w is not [c={c}]");
    assert_eq!(rstd.len(), n, "rmsnorm_backward: rstd is not [n={n}]");
    if c == 0 || n == 0 {
        return;
    }
    let block = ROWS_PER_TASK * c;
    // One partial dw per block of rows, summed afterwards in block order (deterministic).
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(block)
        .zip(dout.par_chunks(block))
        .zip(x.par_chunks(block))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, dout), x), rstd)| {
            let mut dwp = vec![0.0f32; c];
            for (((dx, dout), x), &rs) in dx
                .chunks_mut(c)
                .zip(dout.chunks(c))
                .zip(x.chunks(c))
                .zip(rstd)
            {
                // mean(g ⊙ x̂) over the row, in f64 for accuracy.
                let mut s = 0.0f64;
                for ((&go, &xv), &wv) in dout.iter().zip(x).zip(w) {
                    s += ((go * wv) * (xv * rs)) as f64;
                }
                let mean = (s / c as f64) as f32;
                for ((((d, &go), &xv), &wv), dwv) in
                    dx.iter_mut().zip(dout).zip(x).zip(w).zip(dwp.iter_mut())
                {
                    let xh = xv * rs;
                    *d += rs * (go * wv - xh * mean);
                    *dwv += go * xh;
                }
            }
            dwp
        })
        .collect();
    for p in &partials {
        for (d, &v) in dw.iter_mut().zip(p) {
            *d += v;
        }
    }
}
