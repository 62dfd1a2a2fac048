//! The KV-cache attention (`attention_cached_forward`) against the training attention
//! (`attention_forward`), an independent implementation: for a sequence of `past + tq` tokens, the
//! last `tq` rows of the full causal attention must equal the cached attention of those `tq`
//! queries over a cache holding all `past + tq` keys (and padding rows beyond, which must be ignored).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zhllama::backend::{AttnShape, CachedAttnShape};
use zhllama::ops::{attention_cached_forward, attention_forward};

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

#[test]
fn cached_attention_equals_the_last_rows_of_full_attention() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // (b, past, tq, extra cache rows, h, hkv, d): prefill, decode, GQA ratios 1/2/4, odd sizes.
    for (b, past, tq, extra, h, hkv, d) in [
        (1, 0, 7, 3, 2, 2, 8),
        (1, 12, 1, 0, 4, 2, 16),
        (2, 9, 3, 5, 4, 1, 8),
        (3, 30, 1, 2, 8, 2, 64),
    ] {
        let t = past + tq;
        let tmax = t + extra;
        let q = rand_vec(&mut rng, b * t * h * d);
        let k = rand_vec(&mut rng, b * t * hkv * d);
        let v = rand_vec(&mut rng, b * t * hkv * d);
        let (mut full, mut lse) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
        attention_forward(
            &mut full,
            &mut lse,
            &q,
            &k,
            &v,
            AttnShape { b, t, h, hkv, d },
        );

        // Cache [b, tmax, hkv, d]: the real keys, then garbage rows that must not be read.
        let row = hkv * d;
        let mut kc = vec![f32::NAN; b * tmax * row];
        let mut vc = vec![f32::NAN; b * tmax * row];
        for bi in 0..b {
            kc[bi * tmax * row..(bi * tmax + t) * row]
                .copy_from_slice(&k[bi * t * row..(bi + 1) * t * row]);
            vc[bi * tmax * row..(bi * tmax + t) * row]
                .copy_from_slice(&v[bi * t * row..(bi + 1) * t * row]);
        }
        let qrow = h * d;
        let mut qn = Vec::new();
        for bi in 0..b {
            qn.extend_from_slice(&q[(bi * t + past) * qrow..(bi * t + t) * qrow]);
        }
        let mut out = vec![0.0; qn.len()];
        attention_cached_forward(
            &mut out,
            &qn,
            &kc,
            &vc,
            CachedAttnShape {
                b,
                tq,
                past,
                tmax,
                h,
                hkv,
                d,
            },
        );
        for bi in 0..b {
            let want = &full[(bi * t + past) * qrow..(bi * t + t) * qrow];
            let got = &out[bi * tq * qrow..(bi + 1) * tq * qrow];
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                // Both are softmax-weighted sums of values in [-1, 1] in f32 with different
                // summation orders (blocked GEMM vs a plain loop): a few ulps of |out| ≤ 1, so
                // 1e-5 absolute + 1e-5 relative is comfortably above rounding and far below any bug.
                assert!(
                    (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                    "b{b} past{past} tq{tq} h{h}/{hkv} d{d}: element {i} of batch {bi}: {g} vs {w}"
                );
            }
        }
    }
}
