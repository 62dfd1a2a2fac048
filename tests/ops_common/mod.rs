//! Shared helpers of the `ops_*` tests: a seeded generator, the one `check` comparison, and central
//! finite differences in f64.
#![allow(dead_code)]

/// Unit roundoff of f32 (2⁻²⁴): the relative error of one correctly rounded f32 operation.
pub const U32: f64 = 5.960_464_477_539_063e-8;

/// SplitMix64: a tiny deterministic generator, so the tests need no seeding policy.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// `len` values uniform in `[-scale, scale)`.
    pub fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform() * scale).collect()
    }
    /// An integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// Asserts `|got[i] − want[i]| ≤ tol[i]` for every `i` (and that NaN appears in neither), naming
/// the case, the tensor and the worst element on failure.
pub fn check_tol(case: &str, what: &str, got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{case}: {what}: length");
    assert_eq!(tol.len(), want.len(), "{case}: {what}: tolerance length");
    let mut worst: Option<(usize, f64)> = None;
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i]).abs();
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else {
            err / tol[i]
        };
        if ratio > 1.0 && worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    // The margin actually used, for setting tolerances (`--nocapture` shows it).
    let used = (0..got.len())
        .map(|i| (got[i] as f64 - want[i]).abs() / tol[i])
        .fold(0.0f64, f64::max);
    eprintln!("{case}: {what}: worst |err|/tol = {used:.3e}");
    if let Some((i, r)) = worst {
        panic!(
            "{case}: {what}[{i}] = {} but the reference is {} (|err| = {:.3e} > tol {:.3e}, {r:.1}x)",
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs(),
            tol[i]
        );
    }
}

/// [`check_tol`] with `tol = atol + rtol·|want|`.
pub fn check(case: &str, what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    let tol: Vec<f64> = want.iter().map(|w| atol + rtol * w.abs()).collect();
    check_tol(case, what, got, want, &tol);
}

/// Central-difference gradient of `f` at `x`, in f64, step `h` (truncation error `O(h²)`, roundoff
/// `O(ε₆₄/h)`: with `h = 1e-5` and O(1) inputs both are ≈ 1e-10, far below any f32 tolerance).
pub fn fd_grad(f: &dyn Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// `Σ r·y`: the scalar whose gradient a backward computes when given `dout = r`.
pub fn weighted_sum(r: &[f32], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(&a, &b)| a as f64 * b).sum()
}
