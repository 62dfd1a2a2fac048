//! Causal GQA attention: the forward against a naive f64 softmax(q·kᵀ/√d + mask)·v, the backward
//! against central finite differences of that reference.
//!
//! Tolerances, each about ten times the worst measured over the cases below (the tests print the
//! fraction of the tolerance used). Each output is a convex combination of `v` rows (|v| ≤ 1)
//! with weights from a softmax over ≤ t scores of size ≤ √d; f32 evaluation adds ≤ d + t
//! roundings of ~6e-8 each, which add like a random walk (~√(d+t)·6e-8 ≈ 8e-7 at d = 64,
//! t = 131) rather than in the worst case ((d+t)·6e-8 ≈ 1.2e-5): measured worst 1.4e-7, so
//! `atol = 1.5e-6`. The log-sum-exp adds the log of that sum: `3e-6 + 1.5e-6·|lse|` (measured
//! worst 0.12 of it). Gradients are sums of the same kind of terms over ≤ t·(h/hkv)
//! contributions: `2.5e-6·max|ref|` plus `rtol = 2.5e-5` (measured worst 0.10 of it; the
//! per-element FD reference is exact to ~1e-10). A wrong head mapping, mask or scale errs by O(1).

mod ops_common;
use ops_common::*;
use zhllama::backend::{AttnSaved, AttnShape};
use zhllama::ops;

fn attention_ref(q: &[f64], k: &[f64], v: &[f64], shape: AttnShape) -> (Vec<f64>, Vec<f64>) {
    let AttnShape { b, t, h, hkv, d } = shape;
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; b * h * t];
    let scale = 1.0 / (d as f64).sqrt();
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi * hkv / h;
            for i in 0..t {
                let qi = ((bi * t + i) * h + hi) * d;
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = ((bi * t + j) * hkv + kh) * d;
                        (0..d).map(|e| q[qi + e] * k[kj + e]).sum::<f64>() * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                lse[(bi * h + hi) * t + i] = m + z.ln();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / z;
                    let vj = ((bi * t + j) * hkv + kh) * d;
                    for e in 0..d {
                        out[qi + e] += p * v[vj + e];
                    }
                }
            }
        }
    }
    (out, lse)
}

struct Case {
    b: usize,
    t: usize,
    h: usize,
    hkv: usize,
    d: usize,
    /// Scale of q and k: large values give peaked softmaxes (stability of max subtraction).
    qk: f32,
}

impl Case {
    fn shape(&self) -> AttnShape {
        let &Case {
            b, t, h, hkv, d, ..
        } = self;
        AttnShape { b, t, h, hkv, d }
    }
}

/// `(q, k, v, out, lse)` of a random case.
type Forward = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn run_forward(c: &Case, rng: &mut Rng) -> Forward {
    let (b, t, h, hkv, d) = (c.b, c.t, c.h, c.hkv, c.d);
    let q = rng.vec(b * t * h * d, c.qk);
    let k = rng.vec(b * t * hkv * d, c.qk);
    let v = rng.vec(b * t * hkv * d, 1.0);
    let mut out = vec![f32::NAN; q.len()];
    let mut lse = vec![f32::NAN; b * h * t];
    ops::attention_forward(
        &mut out,
        &mut lse,
        &q,
        &k,
        &v,
        AttnShape { b, t, h, hkv, d },
    );
    (q, k, v, out, lse)
}

#[test]
fn attention_forward_matches_reference() {
    // GQA ratios 1, 2, 4; odd and single-token t; head dims 8, 16, 64; peaked scores.
    let cases = [
        Case {
            b: 1,
            t: 1,
            h: 1,
            hkv: 1,
            d: 8,
            qk: 1.0,
        },
        Case {
            b: 2,
            t: 7,
            h: 4,
            hkv: 4,
            d: 8,
            qk: 1.0,
        },
        Case {
            b: 1,
            t: 33,
            h: 4,
            hkv: 2,
            d: 16,
            qk: 1.0,
        },
        Case {
            b: 2,
            t: 17,
            h: 8,
            hkv: 2,
            d: 64,
            qk: 1.0,
        },
        Case {
            b: 1,
            t: 9,
            h: 2,
            hkv: 1,
            d: 16,
            qk: 4.0,
        },
        Case {
            b: 3,
            t: 5,
            h: 6,
            hkv: 3,
            d: 8,
            qk: 2.0,
        },
        // Several query blocks (ops::attention::BLOCK = 64), the last one ragged.
        Case {
            b: 1,
            t: 131,
            h: 4,
            hkv: 2,
            d: 16,
            qk: 1.0,
        },
    ];
    let mut rng = Rng::new(50);
    for c in &cases {
        let name = format!(
            "attention b={} t={} h={} hkv={} d={} qk={}",
            c.b, c.t, c.h, c.hkv, c.d, c.qk
        );
        let (q, k, v, out, lse) = run_forward(c, &mut rng);
        let (want_out, want_lse) = attention_ref(&to64(&q), &to64(&k), &to64(&v), c.shape());
        check(&name, "out", &out, &want_out, 1.5e-6, 0.0);
        // lse: a log of a sum of ≤ t exps of scores up to |q||k|·√d·qk² (see the header).
        check(&name, "lse", &lse, &want_lse, 3e-6, 1.5e-6);
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let cases = [
        Case {
            b: 1,
            t: 1,
            h: 1,
            hkv: 1,
            d: 4,
            qk: 1.0,
        },
        Case {
            b: 2,
            t: 5,
            h: 2,
            hkv: 2,
            d: 4,
            qk: 1.0,
        },
        Case {
            b: 1,
            t: 6,
            h: 4,
            hkv: 2,
            d: 8,
            qk: 1.5,
        },
        Case {
            b: 1,
            t: 7,
            h: 4,
            hkv: 1,
            d: 6,
            qk: 1.0,
        },
        Case {
            b: 2,
            t: 3,
            h: 2,
            hkv: 1,
            d: 16,
            qk: 2.0,
        },
        // Several query blocks (ops::attention::BLOCK = 64), the last one ragged.
        Case {
            b: 1,
            t: 70,
            h: 2,
            hkv: 1,
            d: 4,
            qk: 1.0,
        },
    ];
    let mut rng = Rng::new(51);
    for c in &cases {
        let (b, t, h, hkv, d) = (c.b, c.t, c.h, c.hkv, c.d);
        let name = format!("attention b={b} t={t} h={h} hkv={hkv} d={d}");
        let (q, k, v, out, lse) = run_forward(c, &mut rng);
        let dout = rng.vec(q.len(), 1.0);
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; q.len()],
            vec![f32::NAN; k.len()],
            vec![f32::NAN; v.len()],
        );
        ops::attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &dout,
            AttnSaved {
                q: &q,
                k: &k,
                v: &v,
                out: &out,
                lse: &lse,
            },
            AttnShape { b, t, h, hkv, d },
        );
        let (q64, k64, v64) = (to64(&q), to64(&k), to64(&v));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            weighted_sum(
                &dout,
                &attention_ref(q, k, v, AttnShape { b, t, h, hkv, d }).0,
            )
        };
        let gq = fd_grad(&|x| loss(x, &k64, &v64), &q64, 1e-5);
        let gk = fd_grad(&|x| loss(&q64, x, &v64), &k64, 1e-5);
        let gv = fd_grad(&|x| loss(&q64, &k64, x), &v64, 1e-5);
        for (what, got, want) in [("dq", &dq, &gq), ("dk", &dk, &gk), ("dv", &dv, &gv)] {
            check(
                &name,
                what,
                got,
                want,
                2.5e-6 * max_abs(want).max(1e-3),
                2.5e-5,
            );
        }
    }
}
