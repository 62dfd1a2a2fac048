//! The KV-cache forward and the decode loop against the plain full forward (no cache), and the
//! sampler against hand-computed cases and its defining properties.

use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::generate::{Sampler, SamplingConfig, argmax, generate};
use zhllama::model::{Activations, KvCache, Llama, LlamaConfig, TrainSpec};

const V: usize = 97;

/// A tiny GQA model (4 query heads over 2 kv heads, head dim 16). Init std 0.35 instead of
/// HF's 0.02 so the logits are spread out (an untrained 0.02 model's logits are nearly flat and
/// its greedy choices near-ties, which would say nothing about the cache).
fn model() -> Llama<CpuBackend> {
    let mut cfg = LlamaConfig::new(V, 64, 96, 2, 4, 2);
    cfg.initializer_range = 0.35;
    Llama::random(Arc::new(CpuBackend::new()), cfg, TrainSpec::frozen(), 7).unwrap()
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + salt * 17 + 5) % V as u32)
        .collect()
}

fn full_logits(m: &Llama<CpuBackend>, ids: &[u32], b: usize) -> Vec<f32> {
    let t = ids.len() / b;
    let mut acts = Activations::new_inference(m, b, t).unwrap();
    let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    m.forward_logits(&mut acts, &ids).unwrap();
    let mut out = vec![0.0; b * t * V];
    m.backend().download(acts.logits(), &mut out).unwrap();
    out
}

/// Tolerance of a cached step against the full forward: `|Δ| ≤ 1e-5 · max|ref|`. The two paths
/// do the same arithmetic except the attention's summation order (the cached op: one f32
/// max-subtracted softmax per query row; the training op: blocked, online softmax), so they
/// differ by f32 rounding: a few ulps (eps = 1.2e-7) per attention output, carried through two
/// layers and the 64-wide lm_head GEMM. Measured worst here: 2.4e-6 of the logit scale (about
/// 20 ulps). 1e-5 leaves 4× headroom and is still far below what a real cache bug (a wrong RoPE
/// position, a missing or shifted key) does, which moves logits by O(1) of their scale.
const REL_TOL: f32 = 1e-5;

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("{what}: max |Δ| = {worst:e}, scale {scale}");
    assert!(
        worst <= REL_TOL * scale,
        "{what}: max |Δ| = {worst:e} > {REL_TOL:e} · {scale}"
    );
}

#[test]
fn first_step_equals_plain_forward_bitwise() {
    let m = model();
    for (b, t) in [(1, 9), (2, 6)] {
        let ids = prompt(b * t, 1);
        let want = full_logits(&m, &ids, b);
        let mut cache = KvCache::new(&m, b, t + 4).unwrap();
        let mut acts = Activations::new_inference(&m, b, t).unwrap();
        let ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        m.forward_logits_cached(&mut acts, &ids_i, Some(&mut cache))
            .unwrap();
        let mut got = vec![0.0; b * t * V];
        m.backend().download(acts.logits(), &mut got).unwrap();
        assert_eq!(cache.len(), t);
        // Exact: bit for bit the same as eval's forward.
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "b={b}: first cached step differs from forward_logits"
        );
    }
}

/// Every later step (one token, and a chunk of several) against a fresh full forward over the
/// whole prefix, batch 1 and 2.
#[test]
fn later_steps_match_full_forward() {
    let m = model();
    for b in [1usize, 2] {
        let t0 = 5;
        // The whole sequence per batch row, fed as t0, then 1, 1, 3, 1 tokens.
        let total = t0 + 6;
        let seqs: Vec<Vec<u32>> = (0..b).map(|bi| prompt(total, 3 + bi as u32)).collect();
        let mut cache = KvCache::new(&m, b, total).unwrap();
        let mut past = 0;
        for chunk in [t0, 1, 1, 3, 1] {
            let mut acts = Activations::new_inference(&m, b, chunk).unwrap();
            let ids: Vec<i32> = seqs
                .iter()
                .flat_map(|s| s[past..past + chunk].iter().map(|&i| i as i32))
                .collect();
            m.forward_logits_cached(&mut acts, &ids, Some(&mut cache))
                .unwrap();
            let mut got = vec![0.0; b * chunk * V];
            m.backend().download(acts.logits(), &mut got).unwrap();
            let prefix: Vec<u32> = seqs
                .iter()
                .flat_map(|s| s[..past + chunk].iter().copied())
                .collect();
            let full = full_logits(&m, &prefix, b);
            // The rows of the new positions in the full forward.
            let want: Vec<f32> = (0..b)
                .flat_map(|bi| {
                    let row0 = bi * (past + chunk) + past;
                    full[row0 * V..(row0 + chunk) * V].to_vec()
                })
                .collect();
            assert_close(&format!("b={b} past={past} chunk={chunk}"), &got, &want);
            past += chunk;
            assert_eq!(cache.len(), past);
        }
        // The cache is full now: one more position is a clear error, not a panic.
        let mut acts = Activations::new_inference(&m, b, 1).unwrap();
        let e = m
            .forward_logits_cached(&mut acts, &vec![0; b], Some(&mut cache))
            .unwrap_err();
        assert!(format!("{e}").contains("KV cache full"), "{e}");
    }
}

/// Greedy decoding by recomputing the whole prefix each step, no cache: the reference.
fn greedy_recompute(m: &Llama<CpuBackend>, prompt: &[u32], n: usize) -> (Vec<u32>, f32) {
    let mut seq = prompt.to_vec();
    let mut min_margin = f32::INFINITY;
    for _ in 0..n {
        let l = full_logits(m, &seq, 1);
        let last = &l[(seq.len() - 1) * V..];
        let mut sorted = last.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        min_margin = min_margin.min(sorted[0] - sorted[1]);
        let best = (0..V).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
        seq.push(best as u32);
    }
    (seq[prompt.len()..].to_vec(), min_margin)
}

#[test]
fn greedy_with_cache_equals_recompute() {
    let m = model();
    for salt in 0..3 {
        let p = prompt(4 + salt as usize, salt);
        let n = 12;
        let (want, margin) = greedy_recompute(&m, &p, n);
        // Precondition: every step's top-1 margin is far above the cache's rounding tolerance,
        // so equal token streams are what a correct cache must give.
        let scale = 10.0; // logits of this model stay well below 10 in magnitude (checked)
        let l = full_logits(&m, &p, 1);
        assert!(l.iter().all(|x| x.abs() < scale));
        eprintln!("salt {salt}: smallest top-1 margin {margin}");
        assert!(
            margin > 100.0 * REL_TOL * scale,
            "test model too flat: margin {margin}"
        );
        let mut streamed = Vec::new();
        let got = generate(&m, &p, &SamplingConfig::greedy(n), None, |id| {
            streamed.push(id)
        })
        .unwrap();
        assert_eq!(got, want, "prompt salt {salt}");
        assert_eq!(streamed, got);
        // EOS: stop before the first occurrence of the token greedy emits at step 3.
        let eos = want[3];
        let first = want.iter().position(|&x| x == eos).unwrap();
        let got = generate(&m, &p, &SamplingConfig::greedy(n), Some(eos), |_| {}).unwrap();
        assert_eq!(got, want[..first]);
    }
    // max_new_tokens bounds the output; 0 gives nothing.
    let p = prompt(3, 9);
    assert_eq!(
        generate(&m, &p, &SamplingConfig::greedy(5), None, |_| {})
            .unwrap()
            .len(),
        5
    );
    assert!(
        generate(&m, &p, &SamplingConfig::greedy(0), None, |_| {})
            .unwrap()
            .is_empty()
    );
    // Bad input is an error, not a panic.
    assert!(generate(&m, &[], &SamplingConfig::greedy(3), None, |_| {}).is_err());
    assert!(generate(&m, &[V as u32], &SamplingConfig::greedy(3), None, |_| {}).is_err());
}

/// Greedy with a repetition penalty: the reference applies the penalty by hand to the full
/// forward's logits (HF: divide positive, multiply negative logits of every seen id).
#[test]
fn greedy_with_repetition_penalty_equals_recompute() {
    let m = model();
    let p = prompt(6, 4);
    let pen = 1.8f32;
    let mut seq = p.clone();
    for _ in 0..10 {
        let l = full_logits(&m, &seq, 1);
        let mut last = l[(seq.len() - 1) * V..].to_vec();
        for (id, x) in last.iter_mut().enumerate() {
            if seq.contains(&(id as u32)) {
                *x = if *x > 0.0 { *x / pen } else { *x * pen };
            }
        }
        let best = (0..V).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
        seq.push(best as u32);
    }
    let cfg = SamplingConfig {
        repetition_penalty: pen,
        ..SamplingConfig::greedy(10)
    };
    let got = generate(&m, &p, &cfg, None, |_| {}).unwrap();
    assert_eq!(got, seq[p.len()..]);
}

fn logits(n: usize, seed: u32) -> Vec<f32> {
    // Deterministic, spread-out values without ties.
    (0..n as u32)
        .map(|i| (((i * 2654435761u32) ^ seed.wrapping_mul(40503)) % 10007) as f32 / 1000.0 - 5.0)
        .collect()
}

fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
    Sampler::new(&SamplingConfig {
        temperature,
        top_k,
        top_p,
        repetition_penalty: 1.0,
        max_new_tokens: 1,
        seed,
    })
    .unwrap()
}

fn naive_argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for i in 1..x.len() {
        if x[i] > x[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn sampler_degenerate_settings_are_argmax() {
    for seed in 0..20u32 {
        let l = logits(200, seed);
        let want = naive_argmax(&l);
        assert_eq!(argmax(&l), want);
        // temperature 0 = greedy
        assert_eq!(
            sampler(0.0, 0, 1.0, seed as u64).sample(&mut l.clone(), &[]),
            want
        );
        for draw in 0..10 {
            let s = seed as u64 * 100 + draw;
            // top-k = 1, at a high temperature
            assert_eq!(sampler(5.0, 1, 1.0, s).sample(&mut l.clone(), &[]), want);
            // a tiny top-p keeps only the most likely token
            assert_eq!(sampler(5.0, 0, 1e-6, s).sample(&mut l.clone(), &[]), want);
        }
    }
}

#[test]
fn sampler_is_reproducible_per_seed() {
    let l = logits(100, 3);
    let draws = |seed: u64| {
        let mut s = sampler(3.0, 0, 1.0, seed);
        (0..64)
            .map(|_| s.sample(&mut l.clone(), &[]))
            .collect::<Vec<_>>()
    };
    assert_eq!(draws(11), draws(11));
    // At temperature 3 over 100 logits in [-5, 5] no token has probability above ~0.1, so 64
    // identical draws from two seeds would be a (≤ 0.1^64) miracle.
    assert_ne!(draws(11), draws(12));
}

/// Frequencies of 20000 draws match softmax(logits / T) within 5 standard deviations, and the
/// top-k / top-p sets are the hand-computed ones.
#[test]
fn sampler_distribution_and_filters() {
    let t = 0.5f32;
    // probabilities at T = 0.5: logits/T = ln(0.5), ln(0.3), ln(0.2)  →  softmax = 0.5, 0.3, 0.2
    let base = [
        0.5f64.ln() as f32 * t,
        0.3f64.ln() as f32 * t,
        0.2f64.ln() as f32 * t,
    ];
    let p = [0.5, 0.3, 0.2];
    let n = 20000;
    let count = |top_k: usize, top_p: f32| {
        let mut s = sampler(t, top_k, top_p, 5);
        let mut c = [0usize; 3];
        for _ in 0..n {
            c[s.sample(&mut base.to_vec(), &[]) as usize] += 1;
        }
        c
    };
    let check = |c: [usize; 3], want: [f64; 3]| {
        for i in 0..3 {
            let sd = (n as f64 * want[i] * (1.0 - want[i])).sqrt();
            let diff = (c[i] as f64 - n as f64 * want[i]).abs();
            assert!(diff <= 5.0 * sd + 1e-9, "counts {c:?} vs probs {want:?}");
        }
    };
    check(count(0, 1.0), p);
    // top-k 2: {0.5, 0.3} renormalised.
    check(count(2, 1.0), [0.625, 0.375, 0.0]);
    // HF top-p 0.6: ascending cumsum 0.2, 0.5, 1.0; drop where ≤ 0.4 → drop the 0.2 token.
    check(count(0, 0.6), [0.625, 0.375, 0.0]);
    // top-p 0.5: drop where ≤ 0.5 → only the 0.5 token stays.
    check(count(0, 0.5), [1.0, 0.0, 0.0]);
}

#[test]
fn repetition_penalty_hand_computed() {
    // seen = {0, 1} (1 twice: penalised once); 2.0/2 = 1.0, -1.0·2 = -2.0, others unchanged.
    let mut l = vec![2.0f32, -1.0, 0.5, 3.0];
    Sampler::apply_repetition_penalty(&mut l, &[0, 1, 1, 1000], 2.0);
    assert_eq!(l, vec![1.0, -2.0, 0.5, 3.0]);
    // In the sampler: token 0 (3.0 → 1.5) loses to token 1 (2.0) under greedy.
    let cfg = SamplingConfig {
        repetition_penalty: 2.0,
        ..SamplingConfig::greedy(1)
    };
    let mut s = Sampler::new(&cfg).unwrap();
    assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 1);
    assert_eq!(s.sample(&mut [3.0, 2.0], &[1]), 0);
    // Invalid settings are errors.
    for bad in [
        SamplingConfig {
            temperature: -1.0,
            ..SamplingConfig::greedy(1)
        },
        SamplingConfig {
            top_p: 0.0,
            ..SamplingConfig::greedy(1)
        },
        SamplingConfig {
            repetition_penalty: 0.0,
            ..SamplingConfig::greedy(1)
        },
    ] {
        assert!(Sampler::new(&bad).is_err());
    }
}
