//! Greedy generation speed, KV cache vs recomputing the whole prefix each step (the reference),
//! on a random 8-layer, 512-wide LLaMA with a 32000 vocab, CPU backend. Both must give the same
//! tokens (asserted). Run: `cargo run --release --example generate_speed`.

use std::sync::Arc;
use std::time::Instant;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::generate::{SamplingConfig, generate};
use zhllama::model::{Activations, Llama, LlamaConfig, TrainSpec};
fn main() {
    let v = 32000;
    let cfg = LlamaConfig::new(v, 512, 1376, 8, 8, 8);
    let m = Llama::random(Arc::new(CpuBackend::new()), cfg, TrainSpec::frozen(), 1).unwrap();
    let prompt: Vec<u32> = (0..64u32).map(|i| i * 97 % 32000).collect();
    let n = 64;
    let t = Instant::now();
    let a = generate(&m, &prompt, &SamplingConfig::greedy(n), None, |_| {}).unwrap();
    let cached = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut seq = prompt.clone();
    for _ in 0..n {
        let mut acts = Activations::new_inference(&m, 1, seq.len()).unwrap();
        let ids: Vec<i32> = seq.iter().map(|&i| i as i32).collect();
        m.forward_logits(&mut acts, &ids).unwrap();
        let mut l = vec![0.0; seq.len() * v];
        m.backend().download(acts.logits(), &mut l).unwrap();
        let last = &l[(seq.len() - 1) * v..];
        seq.push(zhllama::model::generate::argmax(last));
    }
    let full = t.elapsed().as_secs_f64();
    assert_eq!(a, seq[prompt.len()..]);
    println!(
        "prompt 64, {n} new tokens, 8x512 model, vocab 32000: cached {cached:.2}s ({:.1} tok/s), recompute {full:.2}s ({:.1} tok/s), speedup {:.1}x",
        n as f64 / cached,
        n as f64 / full,
        full / cached
    );
}
