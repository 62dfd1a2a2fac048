//! RMSNorm, RoPE, SwiGLU and embedding: forwards against naive f64 references, backwards against
//! central finite differences of those references (f64).
//!
//! Tolerances. These ops chain a handful of f32 roundings (u = 6e-8) over sums of at most a few
//! dozen terms, so the f32 result is within ~20u·max|ref| ≈ 1.2e-6·max|ref| of the exact value; we
//! allow `atol = 1e-5·max|ref|` (≈ 8× that) plus `rtol = 1e-5`. The FD gradients carry an error of
//! ~1e-10 (see `fd_grad`). A wrong index, sign or missing term errs by O(max|ref|), i.e. 1e5 times
//! more.

mod ops_common;
use ops_common::*;
use zhllama::backend::{RmsNormSaved, RopeShape, RowShape};
use zhllama::ops;

const RTOL: f64 = 1e-5;
const ATOL_REL: f64 = 1e-5;
const H: f64 = 1e-5;

fn check_scaled(case: &str, what: &str, got: &[f32], want: &[f64]) {
    check(
        case,
        what,
        got,
        want,
        ATOL_REL * max_abs(want).max(1e-30),
        RTOL,
    );
}

// ---- RMSNorm --------------------------------------------------------------------------------------

fn rmsnorm_ref(x: &[f64], w: &[f64], n: usize, c: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; n * c];
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / c as f64;
        let r = 1.0 / (ms + eps).sqrt();
        for j in 0..c {
            y[i * c + j] = row[j] * r * w[j];
        }
    }
    y
}

#[test]
fn rmsnorm_forward_and_backward() {
    // (n, c, eps, input scale): includes tiny inputs where eps matters and a c that is not a
    // multiple of any vector width.
    let cases = [
        (1, 1, 1e-6, 1.0),
        (3, 8, 1e-6, 1.0),
        (5, 33, 1e-5, 3.0),
        (40, 16, 1e-6, 1.0),
        (2, 12, 1e-2, 0.05),
    ];
    let mut rng = Rng::new(10);
    for &(n, c, eps, xs) in &cases {
        let case = format!("rmsnorm n={n} c={c} eps={eps}");
        let x = rng.vec(n * c, xs);
        let w = rng.vec(c, 1.5);
        let mut out = vec![f32::NAN; n * c];
        let mut rstd = vec![f32::NAN; n];
        ops::rmsnorm_forward(&mut out, &mut rstd, &x, &w, RowShape { n, c }, eps as f32);
        let eps64 = eps as f32 as f64;
        check_scaled(
            &case,
            "out",
            &out,
            &rmsnorm_ref(&to64(&x), &to64(&w), n, c, eps64),
        );
        let want_rstd: Vec<f64> = (0..n)
            .map(|i| {
                let ms = x[i * c..(i + 1) * c]
                    .iter()
                    .map(|&v| (v as f64).powi(2))
                    .sum::<f64>();
                1.0 / (ms / c as f64 + eps64).sqrt()
            })
            .collect();
        check(&case, "rstd", &rstd, &want_rstd, 0.0, 4.0 * U32);

        // Backward: dx and dw accumulate (+=) onto random prior values.
        let dout = rng.vec(n * c, 1.0);
        let dx0 = rng.vec(n * c, 1.0);
        let dw0 = rng.vec(c, 1.0);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        ops::rmsnorm_backward(
            &mut dx,
            &mut dw,
            &dout,
            RmsNormSaved {
                x: &x,
                w: &w,
                rstd: &rstd,
            },
            RowShape { n, c },
        );
        let w64 = to64(&w);
        let x64 = to64(&x);
        let gx = fd_grad(
            &|xx| weighted_sum(&dout, &rmsnorm_ref(xx, &w64, n, c, eps64)),
            &x64,
            H,
        );
        let gw = fd_grad(
            &|ww| weighted_sum(&dout, &rmsnorm_ref(&x64, ww, n, c, eps64)),
            &w64,
            H,
        );
        let dx_inc: Vec<f32> = dx.iter().zip(&dx0).map(|(a, b)| a - b).collect();
        let dw_inc: Vec<f32> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
        // Subtracting the prior (|.| ≤ 1) adds ≤ 1 ulp of 1 (1.2e-7) of absolute error.
        check(
            &case,
            "dx",
            &dx_inc,
            &gx,
            ATOL_REL * max_abs(&gx) + 2.4e-7,
            RTOL,
        );
        check(
            &case,
            "dw",
            &dw_inc,
            &gw,
            ATOL_REL * max_abs(&gw) + 2.4e-7,
            RTOL,
        );
    }
}

// ---- RoPE -----------------------------------------------------------------------------------------

/// HF's angle arithmetic, transcribed from `LlamaRotaryEmbedding` (all f32):
/// `inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))`,
/// `freqs = inv_freq[:, None].float() @ position_ids[None, :].float()`.
fn hf_angle(theta: f32, d: usize, i: usize, pos: usize) -> f32 {
    let expo = (2 * i) as f32 / d as f32;
    let inv = 1.0f32 / ((theta as f64).powf(expo as f64) as f32);
    inv * pos as f32
}

/// `q·cos + rotate_half(q)·sin` in f64 on those angles.
fn rope_ref(x: &[f64], shape: RopeShape) -> Vec<f64> {
    let RopeShape {
        b,
        t,
        h,
        d,
        theta,
        pos_offset: off,
    } = shape;
    let mut y = vec![0.0; x.len()];
    let half = d / 2;
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let base = ((bi * t + ti) * h + hi) * d;
                for j in 0..d {
                    let i = j % half;
                    let ang = hf_angle(theta, d, i, off + ti) as f64;
                    let rot = if j < half {
                        -x[base + j + half]
                    } else {
                        x[base + j - half]
                    };
                    y[base + j] = x[base + j] * ang.cos() + rot * ang.sin();
                }
            }
        }
    }
    y
}

#[test]
fn rope_forward_and_backward() {
    // (b, t, h, d, theta, pos_offset): default and LLaMA-3-style theta, odd t, an offset (KV-cache
    // generation), positions up to ~2k where the f32 angle rounding matters.
    let cases = [
        (1, 1, 1, 2, 10000.0, 0),
        (2, 5, 3, 8, 10000.0, 0),
        (1, 7, 2, 16, 500000.0, 3),
        (1, 3, 2, 64, 10000.0, 2040),
        (2, 4, 1, 4, 10.0, 1),
    ];
    let mut rng = Rng::new(20);
    for &(b, t, h, d, theta, off) in &cases {
        let case = format!("rope b={b} t={t} h={h} d={d} theta={theta} off={off}");
        let x = rng.vec(b * t * h * d, 1.0);
        let shape = RopeShape {
            b,
            t,
            h,
            d,
            theta,
            pos_offset: off,
        };
        let mut y = x.clone();
        ops::rope_forward(&mut y, shape);
        // Each output is a·cos + b·sin with |a|,|b| ≤ 1: ≤ 3 roundings of O(1) values plus the
        // 1-ulp cos/sin: 4u·2 absolute.
        let want = rope_ref(&to64(&x), shape);
        check(&case, "forward", &y, &want, 8.0 * U32, 0.0);
        // Backward is the transpose: FD of Σ dout·rope(x) w.r.t. x.
        let dout = rng.vec(x.len(), 1.0);
        let mut dx = dout.clone();
        ops::rope_backward(&mut dx, shape);
        let g = fd_grad(
            &|xx| weighted_sum(&dout, &rope_ref(xx, shape)),
            &to64(&x),
            H,
        );
        check(&case, "backward", &dx, &g, 8.0 * U32 + 1e-9, 0.0);
    }
}

#[test]
fn rope_position_zero_is_identity_and_inverse_roundtrips() {
    let (b, t, h, d) = (1, 1, 4, 16);
    let mut rng = Rng::new(21);
    let x = rng.vec(b * t * h * d, 1.0);
    let mut y = x.clone();
    ops::rope_forward(
        &mut y,
        RopeShape {
            b,
            t,
            h,
            d,
            theta: 10000.0,
            pos_offset: 0,
        },
    );
    assert_eq!(x, y, "position 0 must not rotate");
    // backward(forward(x)) = Rᵀ R x = x up to rounding (|x| ≤ 1: a few ulps).
    let (b, t) = (2, 9);
    let x = rng.vec(b * t * h * d, 1.0);
    let mut y = x.clone();
    ops::rope_forward(
        &mut y,
        RopeShape {
            b,
            t,
            h,
            d,
            theta: 10000.0,
            pos_offset: 5,
        },
    );
    ops::rope_backward(
        &mut y,
        RopeShape {
            b,
            t,
            h,
            d,
            theta: 10000.0,
            pos_offset: 5,
        },
    );
    check("roundtrip", "x", &y, &to64(&x), 8.0 * U32, 0.0);
}

// ---- SwiGLU ---------------------------------------------------------------------------------------

fn swiglu_ref(g: &[f64], u: &[f64]) -> Vec<f64> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

#[test]
fn swiglu_forward_and_backward() {
    // Lengths around the task chunk (4096) and gate scales that reach the saturated tails.
    let cases = [(1, 1.0), (37, 3.0), (4099, 8.0), (9000, 20.0)];
    let mut rng = Rng::new(30);
    for &(len, gs) in &cases {
        let case = format!("swiglu len={len} gate scale={gs}");
        let g = rng.vec(len, gs);
        let u = rng.vec(len, 1.0);
        let mut out = vec![f32::NAN; len];
        ops::swiglu_forward(&mut out, &g, &u);
        let (g64, u64_) = (to64(&g), to64(&u));
        // Elementwise: ~6 roundings and an exp (≤ 2 ulp): rtol 16u, tiny atol for underflow.
        check(
            &case,
            "out",
            &out,
            &swiglu_ref(&g64, &u64_),
            1e-30,
            16.0 * U32,
        );
        let dout = rng.vec(len, 1.0);
        let (mut dg, mut du) = (vec![f32::NAN; len], vec![f32::NAN; len]);
        ops::swiglu_backward(&mut dg, &mut du, &dout, &g, &u);
        // Elementwise ops: the gradient of Σ dout·y is elementwise, so FD one coordinate at a
        // time through the reference (cheap even for long vectors).
        let fd = |i: usize, wrt_gate: bool| {
            let f = |z: f64| {
                let (gg, uu) = if wrt_gate { (z, u64_[i]) } else { (g64[i], z) };
                dout[i] as f64 * swiglu_ref(&[gg], &[uu])[0]
            };
            let z = if wrt_gate { g64[i] } else { u64_[i] };
            (f(z + H) - f(z - H)) / (2.0 * H)
        };
        let gg: Vec<f64> = (0..len).map(|i| fd(i, true)).collect();
        let gu: Vec<f64> = (0..len).map(|i| fd(i, false)).collect();
        // dgate = dout·up·σ·(1 + g·(1−σ)) can cancel to ~0 (near g ≈ −1.28), so bound its error
        // absolutely: 16 roundings of |dout·up·σ·(1 + g(1−σ))| ≤ 1.1 (|dout|, |up| ≤ 1 and the
        // SiLU derivative peaks at 1.0998), i.e. 16u·1.1, plus 16u relative.
        check(
            &case,
            "dgate",
            &dg,
            &gg,
            16.0 * U32 * 1.1 + 1e-9,
            16.0 * U32,
        );
        check(&case, "dup", &du, &gu, 1e-9, 16.0 * U32);
    }
}

// ---- embedding ------------------------------------------------------------------------------------

#[test]
fn embedding_forward_and_backward() {
    // (v, c, ids): repeated ids (the scatter-add must sum them), c not a multiple of the column
    // block (64), one row used by every token.
    let cases: [(usize, usize, Vec<i32>); 4] = [
        (1, 1, vec![0]),
        (7, 5, vec![3, 0, 3, 6, 3, 1]),
        (50, 130, vec![49, 2, 2, 2, 0, 17, 49, 5, 2]),
        (4, 64, vec![1; 40]),
    ];
    let mut rng = Rng::new(40);
    for (v, c, ids) in &cases {
        let (v, c, n) = (*v, *c, ids.len());
        let case = format!("embedding v={v} c={c} ids={ids:?}");
        let table = rng.vec(v * c, 1.0);
        let mut out = vec![f32::NAN; n * c];
        ops::embedding_forward(&mut out, ids, &table, n, c);
        let want: Vec<f64> = (0..n * c)
            .map(|e| table[ids[e / c] as usize * c + e % c] as f64)
            .collect();
        check(&case, "out", &out, &want, 0.0, 0.0); // a gather is exact
        let dout = rng.vec(n * c, 1.0);
        let dt0 = rng.vec(v * c, 1.0);
        let mut dt = dt0.clone();
        ops::embedding_backward(&mut dt, &dout, ids, n, c);
        let mut want = to64(&dt0);
        for (i, &id) in ids.iter().enumerate() {
            for j in 0..c {
                want[id as usize * c + j] += dout[i * c + j] as f64;
            }
        }
        // f32 adds of ≤ 41 terms of size ≤ 1: ≤ 41 roundings of values ≤ 41 → 41·41·u.
        check(&case, "dtable", &dt, &want, 41.0 * 41.0 * U32, 0.0);
    }
}

#[test]
fn embedding_backward_is_deterministic() {
    // The same inputs give bit-identical results on every call (fixed summation order).
    let (v, c, n) = (10, 200, 500);
    let mut rng = Rng::new(41);
    let ids: Vec<i32> = (0..n).map(|_| rng.below(v) as i32).collect();
    let dout = rng.vec(n * c, 1.0);
    let first = {
        let mut dt = vec![0.0; v * c];
        ops::embedding_backward(&mut dt, &dout, &ids, n, c);
        dt
    };
    for _ in 0..5 {
        let mut dt = vec![0.0; v * c];
        ops::embedding_backward(&mut dt, &dout, &ids, n, c);
        assert_eq!(dt, first);
    }
}

// ---- the vectorisable exp -------------------------------------------------------------------------

/// Distance in units of the last place between an f32 and the exact value.
fn ulp_error(got: f32, exact: f64) -> f64 {
    let e = exact as f32;
    // One ulp at the exact value (the spacing of f32 around it; subnormal spacing at the bottom).
    let ulp = (f32::from_bits(e.to_bits() + 1) - e)
        .abs()
        .max(f32::from_bits(1)) as f64;
    (got as f64 - exact).abs() / ulp
}

#[test]
fn exp_fast_is_within_two_ulp() {
    use zhllama::ops::math::exp_fast;
    // A dense sweep over the whole finite range (including subnormal results) and every f32 in a
    // window around 0, where the reduction is most delicate.
    let mut worst = (0.0f64, 0.0f32);
    let mut x = -103.9f32;
    while x <= 88.0 {
        let err = ulp_error(exp_fast(x), (x as f64).exp());
        if err > worst.0 {
            worst = (err, x);
        }
        x += 1.3e-3;
    }
    let mut x = -0.5f32;
    while x <= 0.5 {
        let err = ulp_error(exp_fast(x), (x as f64).exp());
        if err > worst.0 {
            worst = (err, x);
        }
        x = f32::from_bits(if x < 0.0 {
            x.to_bits() - 97
        } else {
            x.to_bits() + 97
        })
        .max(x + 1e-9);
    }
    assert!(
        worst.0 <= 2.0,
        "exp_fast({}) is {:.2} ulp off",
        worst.1,
        worst.0
    );
    assert_eq!(exp_fast(0.0), 1.0);
    assert_eq!(exp_fast(-200.0), 0.0);
    assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
    assert!(exp_fast(f32::NAN).is_nan());
    assert!(exp_fast(1000.0).is_finite(), "large inputs clamp to e^88");
}
