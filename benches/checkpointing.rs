//! Cost of gradient checkpointing: one training step (forward + backward) with per-layer
//! checkpointing vs without (the reference), same model and batch, CPU backend, random 8-layer
//! 256-wide LLaMA (ffn 688, vocab 4096), batch 2 × 256 tokens; two trainable sets: everything
//! (full fine-tune) and LoRA r=8 on all seven projections, dropout 0.05 (base frozen). Both
//! variants must give the same loss bits (asserted once before timing); the activation bytes of
//! each are printed. `cargo bench --bench checkpointing`; docs/PERF.md ("Gradient
//! checkpointing") has the numbers.

use criterion::{Criterion, criterion_group, criterion_main};
use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::{Activations, Llama, LlamaConfig, LoraConfig, Proj, TrainSpec};

fn checkpointing(c: &mut Criterion) {
    let (b, t) = (2, 256);
    let cfg = LlamaConfig::new(4096, 256, 688, 8, 8, 8);
    let lora = TrainSpec {
        lora: Some(LoraConfig::new(8, 16.0, 0.05, &Proj::ALL, 1).unwrap()),
        ..TrainSpec::frozen()
    };
    let ids: Vec<i32> = (0..b * t).map(|i| (i * 7919 % 4096) as i32).collect();
    let mut g = c.benchmark_group("train_step_8x256_b2_t256");
    g.sample_size(10);
    for (name, spec) in [("full", TrainSpec::full()), ("lora", lora)] {
        let model = Llama::random(Arc::new(CpuBackend::new()), cfg.clone(), spec, 1).unwrap();
        let mut grads = model.alloc_grads().unwrap();
        let mut sets = [
            ("plain", Activations::new(&model, b, t).unwrap()),
            (
                "checkpointed",
                Activations::new_checkpointed(&model, b, t).unwrap(),
            ),
        ];
        let mut step = |acts: &mut Activations<CpuBackend>, key: u64| {
            acts.training = true;
            acts.rng_key = key;
            let loss = model.forward(acts, &ids, &ids).unwrap();
            model.backward(acts, &mut grads, 1.0).unwrap();
            loss
        };
        let l0 = step(&mut sets[0].1, 0);
        let l1 = step(&mut sets[1].1, 0);
        assert_eq!(l0.to_bits(), l1.to_bits(), "{name}: losses differ");
        println!(
            "{name}: activation bytes plain {} vs checkpointed {}",
            sets[0].1.bytes(),
            sets[1].1.bytes()
        );
        for (variant, acts) in sets.iter_mut() {
            let mut key = 0;
            g.bench_function(format!("{name}_{variant}"), |bench| {
                bench.iter(|| {
                    key += 1;
                    step(acts, key)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, checkpointing);
criterion_main!(benches);
