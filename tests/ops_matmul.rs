//! `ops::matmul` against a naive f64 triple loop: every transpose combination, alpha/beta blends,
//! ragged and degenerate sizes.

mod ops_common;
use ops_common::*;
use zhllama::backend::GemmShape;
use zhllama::ops;

/// Naive `alpha·op(a)·op(b) + beta·out` in f64, and the per-element error bound of any f32
/// evaluation order: `2·(k+2)·u·(|alpha|·Σ_p |a_ip·b_pj| + |beta·out_ij|)` — the classic worst-case
/// bound `γ_k` for a length-k dot product (k roundings of products and sums, any order or FMA),
/// doubled, plus the two roundings of the blend. A wrong index or transpose errs by O(|a||b|),
/// i.e. ~1/(k·u) times more.
fn reference(
    out: &[f32],
    a: &[f32],
    b: &[f32],
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> (Vec<f64>, Vec<f64>) {
    let GemmShape {
        m,
        n,
        k,
        trans_a: ta,
        trans_b: tb,
    } = shape;
    let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] } as f64;
    let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] } as f64;
    let mut want = vec![0.0; m * n];
    let mut tol = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut sabs) = (0.0, 0.0);
            for p in 0..k {
                s += at(i, p) * bt(p, j);
                sabs += (at(i, p) * bt(p, j)).abs();
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                out[i * n + j] as f64
            };
            want[i * n + j] = alpha as f64 * s + beta as f64 * old;
            tol[i * n + j] = 2.0
                * (k + 2) as f64
                * U32
                * ((alpha as f64).abs() * sabs + (beta as f64 * old).abs())
                + 1e-30;
        }
    }
    (want, tol)
}

#[test]
fn matmul_matches_naive_reference() {
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (17, 13, 9),
        (64, 33, 130),
        (130, 70, 65),
        (1, 300, 40),
        (100, 1, 100),
        (0, 3, 4),
        (3, 0, 4),
        (3, 4, 0),
    ];
    let blends = [(1.0f32, 0.0f32), (0.5, 1.0), (-2.0, 0.25)];
    let mut rng = Rng::new(1);
    for &(m, n, k) in &shapes {
        for ta in [false, true] {
            for tb in [false, true] {
                for &(alpha, beta) in &blends {
                    let case =
                        format!("m={m} n={n} k={k} ta={ta} tb={tb} alpha={alpha} beta={beta}");
                    let a = rng.vec(m * k, 1.0);
                    let b = rng.vec(k * n, 1.0);
                    // With beta = 0 the old content must be ignored, even NaN.
                    let mut out = if beta == 0.0 {
                        vec![f32::NAN; m * n]
                    } else {
                        rng.vec(m * n, 1.0)
                    };
                    let shape = GemmShape::new(m, n, k, ta, tb);
                    let (want, tol) = reference(&out, &a, &b, shape, alpha, beta);
                    ops::matmul(&mut out, &a, &b, shape, alpha, beta);
                    check_tol(&case, "out", &out, &want, &tol);
                }
            }
        }
    }
}

#[test]
fn matmul_large_threaded_matches_reference() {
    // Big enough for the threaded path and several cache blocks of the packed kernel.
    let (m, n, k) = (257, 300, 513);
    let mut rng = Rng::new(2);
    for (ta, tb) in [(false, true), (true, false)] {
        let a = rng.vec(m * k, 1.0);
        let b = rng.vec(k * n, 1.0);
        let mut out = rng.vec(m * n, 1.0);
        let shape = GemmShape::new(m, n, k, ta, tb);
        let (want, tol) = reference(&out, &a, &b, shape, 1.0, 1.0);
        ops::matmul(&mut out, &a, &b, shape, 1.0, 1.0);
        check_tol(&format!("large ta={ta} tb={tb}"), "out", &out, &want, &tol);
    }
}
