//! Greedy generation, KV cache vs recomputing the whole prefix each step (the reference), on a
//! random 8-layer, 512-wide LLaMA with a 32000 vocab, CPU backend; 64-token prompt, 64 new
//! tokens. Both paths must give the same tokens (asserted once before timing).
//! `cargo bench --bench generate`; docs/PERF.md ("Generate") has the numbers.

use criterion::{Criterion, criterion_group, criterion_main};
use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::generate::{SamplingConfig, argmax, generate};
use zhllama::model::{Activations, Llama, LlamaConfig, TrainSpec};

const VOCAB: usize = 32000;

/// `n` greedy tokens after `prompt`, each from a full forward over the whole sequence so far.
fn recompute(m: &Llama<CpuBackend>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let mut acts = Activations::new_inference(m, 1, seq.len()).unwrap();
        let ids: Vec<i32> = seq.iter().map(|&i| i as i32).collect();
        m.forward_logits(&mut acts, &ids).unwrap();
        let mut l = vec![0.0; seq.len() * VOCAB];
        m.backend().download(acts.logits(), &mut l).unwrap();
        seq.push(argmax(&l[(seq.len() - 1) * VOCAB..]));
    }
    seq.split_off(prompt.len())
}

fn generation(c: &mut Criterion) {
    let cfg = LlamaConfig::new(VOCAB, 512, 1376, 8, 8, 8);
    let m = Llama::random(Arc::new(CpuBackend::new()), cfg, TrainSpec::frozen(), 1).unwrap();
    let prompt: Vec<u32> = (0..64u32).map(|i| i * 97 % VOCAB as u32).collect();
    let n = 64;
    let cached = || generate(&m, &prompt, &SamplingConfig::greedy(n), None, |_| {}).unwrap();
    assert_eq!(
        cached(),
        recompute(&m, &prompt, n),
        "KV cache and recompute differ"
    );
    let mut g = c.benchmark_group("generate_greedy_8x512_prompt64_new64");
    g.sample_size(10);
    g.bench_function("kv_cache", |b| b.iter(cached));
    g.bench_function("recompute", |b| b.iter(|| recompute(&m, &prompt, n)));
    g.finish();
}

criterion_group!(benches, generation);
criterion_main!(benches);
