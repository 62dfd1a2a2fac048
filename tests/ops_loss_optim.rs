//! Cross-entropy (with ignore index -100), AdamW and the elementwise helpers against independent
//! f64 references.

mod ops_common;
use ops_common::*;
use zhllama::backend::AdamW;
use zhllama::ops;

// ---- cross-entropy --------------------------------------------------------------------------------

fn ce_ref(logits: &[f64], targets: &[i32], n: usize, v: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            if targets[i] == -100 {
                return 0.0;
            }
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            lse - row[targets[i] as usize]
        })
        .collect()
}

#[test]
fn cross_entropy_forward_and_backward() {
    // (n, v, logit scale, targets): ignored rows, a large vocabulary, large logits (max
    // subtraction), all rows ignored.
    let cases: [(usize, usize, f32, Vec<i32>); 5] = [
        (1, 1, 1.0, vec![0]),
        (4, 10, 2.0, vec![3, -100, 9, 0]),
        (3, 5000, 5.0, vec![4999, 17, -100]),
        (2, 37, 60.0, vec![36, 1]),
        (2, 8, 1.0, vec![-100, -100]),
    ];
    let mut rng = Rng::new(60);
    for (n, v, ls, targets) in &cases {
        let (n, v) = (*n, *v);
        let case = format!("cross_entropy n={n} v={v} scale={ls} targets={targets:?}");
        let logits = rng.vec(n * v, *ls);
        let mut losses = vec![f32::NAN; n];
        ops::cross_entropy_forward(&mut losses, &logits, targets, n, v);
        let l64 = to64(&logits);
        // loss = (max + ln Σ) − x_t: the f32 sum of ≤ v exps errs by ≤ ~v·u/16 relative (16 lanes)
        // → ≤ 2e-5 in ln Σ at v = 5000; the max-subtractions are exact-ish (1 ulp of |x| ≤ 60).
        let want = ce_ref(&l64, targets, n, v);
        check(
            &case,
            "losses",
            &losses,
            &want,
            2e-5 + 2.0 * 60.0 * U32,
            1e-6,
        );

        let scale = 1.0 / targets.iter().filter(|&&t| t != -100).count().max(1) as f32;
        let mut dl = vec![f32::NAN; n * v];
        ops::cross_entropy_backward(&mut dl, &logits, targets, n, v, scale);
        // Gradient of scale·Σ losses by FD, one row at a time (rows are independent).
        let mut g = vec![0.0; n * v];
        for i in 0..n {
            let row = &l64[i * v..(i + 1) * v];
            let t = [targets[i]];
            let gi = fd_grad(&|x| scale as f64 * ce_ref(x, &t, 1, v)[0], row, 1e-6);
            g[i * v..(i + 1) * v].copy_from_slice(&gi);
        }
        // Entries are scale·(p − onehot) with p ≤ 1; p carries the loss's ~2e-5 relative error,
        // so atol = 2e-5·scale·... we allow 3e-5·scale absolute (and FD error ~1e-9).
        check(&case, "dlogits", &dl, &g, 3e-5 * scale as f64 + 1e-9, 1e-5);
    }
}

// ---- AdamW ----------------------------------------------------------------------------------------

/// torch's documented AdamW algorithm (Loshchilov & Hutter, as in the `torch.optim.AdamW` docs),
/// written in f64 with the bias-corrected moments spelled out (a different but algebraically equal
/// arrangement of the update torch's kernel performs).
///
/// It also propagates a per-element error budget for an f32 evaluation: `m_abs` is the running
/// average of `|g|` (the size of the terms whose sum is `m`, which can cancel), each f32 step adds
/// ≤ 8 roundings to `m` and `v` relative to their term sizes (`mtol`, `vtol`), and the parameter's
/// budget grows by 8u·|p| plus the update's error: 8u of the update itself, the error of `m` scaled
/// like `m`, and half the relative error of `v` (through the square root).
struct AdamRef {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    m_abs: Vec<f64>,
    ptol: Vec<f64>,
    mtol: Vec<f64>,
    vtol: Vec<f64>,
}

impl AdamRef {
    /// One step with the decimal `(lr, beta1, beta2, eps, weight decay)` of a case.
    fn step(&mut self, g: &[f64], (lr, b1, b2, eps, wd): (f64, f64, f64, f64, f64), step: i32) {
        let (bc1, bc2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        #[allow(clippy::needless_range_loop)] // seven parallel arrays: indexing reads best
        for i in 0..self.p.len() {
            self.p[i] -= lr * wd * self.p[i];
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            self.m_abs[i] = b1 * self.m_abs[i] + (1.0 - b1) * g[i].abs();
            let mhat = self.m[i] / bc1;
            let vhat = self.v[i] / bc2;
            let denom = vhat.sqrt() + eps;
            let update = lr * mhat / denom;
            self.p[i] -= update;
            self.mtol[i] = b1 * self.mtol[i] + 8.0 * U32 * self.m_abs[i];
            self.vtol[i] = b2 * self.vtol[i] + 8.0 * U32 * self.v[i];
            let v_rel = self.vtol[i] / self.v[i].max(1e-300);
            self.ptol[i] += 8.0 * U32 * self.p[i].abs()
                + update.abs() * (8.0 * U32 + 0.5 * v_rel)
                + lr * (self.mtol[i] / bc1) / denom;
        }
    }
}

#[test]
fn adamw_matches_torch_algorithm_over_several_steps() {
    // (lr, beta1, beta2, eps, weight decay) as decimal literals, as a Python config gives them;
    // the op gets the f32 values and must act on the decimal ones.
    let cases = [
        (1e-3, 0.9, 0.999, 1e-8, 0.0),
        (2e-4, 0.9, 0.95, 1e-5, 0.1),
        (1e-1, 0.8, 0.99, 1e-6, 0.01),
    ];
    let len = 20_000; // several rayon chunks
    let mut rng = Rng::new(70);
    for &hp64 in &cases {
        let (lr, b1, b2, eps, wd) = hp64;
        let case = format!("adamw lr={lr} b1={b1} b2={b2} eps={eps} wd={wd}");
        let mut p = rng.vec(len, 1.0);
        let (mut m, mut v) = (vec![0.0f32; len], vec![0.0f32; len]);
        let zeros = vec![0.0; len];
        let mut r = AdamRef {
            p: to64(&p),
            m: zeros.clone(),
            v: zeros.clone(),
            m_abs: zeros.clone(),
            ptol: zeros.clone(),
            mtol: zeros.clone(),
            vtol: zeros,
        };
        for step in 1..=6u64 {
            // Gradients of varied magnitude, some tiny (where eps matters).
            let gs = if step % 2 == 0 { 1e-3 } else { 1.0 };
            let g = rng.vec(len, gs);
            let hp = AdamW {
                lr: lr as f32,
                beta1: b1 as f32,
                beta2: b2 as f32,
                eps: eps as f32,
                weight_decay: wd as f32,
                step,
            };
            ops::adamw_step(&mut p, &mut m, &mut v, &g, hp);
            r.step(&to64(&g), hp64, step as i32);
        }
        check_tol(&case, "param", &p, &r.p, &r.ptol);
        check_tol(&case, "m", &m, &r.m, &r.mtol);
        check_tol(&case, "v", &v, &r.v, &r.vtol);
    }
}

// ---- elementwise ----------------------------------------------------------------------------------

#[test]
fn elementwise_ops() {
    let mut rng = Rng::new(80);
    for len in [0, 1, 17, 40_000] {
        let case = format!("len={len}");
        let x = rng.vec(len, 2.0);
        let y0 = rng.vec(len, 1.0);

        let mut y = y0.clone();
        ops::axpy(&mut y, -0.75, &x);
        let want: Vec<f64> = y0
            .iter()
            .zip(&x)
            .map(|(&a, &b)| a as f64 - 0.75 * b as f64)
            .collect();
        check(&case, "axpy", &y, &want, 3.0 * 2.0 * U32, 0.0); // two roundings of values ≤ 2.5

        let mut y = y0.clone();
        ops::scale(&mut y, 3.5);
        let want: Vec<f64> = y0.iter().map(|&a| 3.5 * a as f64).collect();
        check(&case, "scale", &y, &want, 0.0, U32); // one rounding

        let mut y = y0.clone();
        ops::copy(&mut y, &x);
        assert_eq!(y, x, "{case}: copy");
        ops::zero(&mut y);
        assert!(y.iter().all(|&v| v == 0.0), "{case}: zero");

        let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let got = ops::sum_squares(&x);
        // f64 sums of exact f32 squares: relative error ≤ len·ε₆₄ ≈ 1e-11.
        assert!(
            (got - want).abs() <= 1e-11 * want.max(1.0),
            "{case}: sum_squares {got} vs {want}"
        );
    }
    // Non-finite anywhere makes the sum non-finite (the NaN check of the training loop).
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = vec![1.0f32; 50_000];
        x[33_333] = bad;
        assert!(
            !ops::sum_squares(&x).is_finite(),
            "sum_squares must see {bad}"
        );
    }
}
