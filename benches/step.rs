//! One training step (forward + backward, every weight trainable) of a tiny LLaMA on the CPU
//! backend. The `small` shape is timed by `zhllama bench --preset small` (docs/PERF.md).

use criterion::{Criterion, criterion_group, criterion_main};
use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::{Activations, Llama, LlamaConfig, LoraConfig, Proj, TrainSpec};

fn step(c: &mut Criterion) {
    let be = Arc::new(CpuBackend::new());
    // The `tiny` preset of `zhllama bench`.
    let cfg = LlamaConfig::new(1000, 64, 176, 2, 4, 4);
    let (b, t) = (2, 64);
    let ids: Vec<i32> = (0..b * t).map(|i| (i * 7919 % 1000) as i32).collect();
    let lora = LoraConfig::new(8, 32.0, 0.05, &Proj::ALL, 0).unwrap();
    let specs = [
        ("full", TrainSpec::full()),
        ("embeddings_only", TrainSpec::embeddings_only()),
        (
            "lora_all_dropout",
            TrainSpec {
                lora: Some(lora),
                ..TrainSpec::embeddings_only()
            },
        ),
    ];
    let mut g = c.benchmark_group("train_step_tiny");
    for (name, spec) in specs {
        let model = Llama::random(be.clone(), cfg.clone(), spec, 0).unwrap();
        let mut acts = Activations::new(&model, b, t).unwrap();
        acts.training = true;
        let mut grads = model.alloc_grads().unwrap();
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let n = be.buf_len(&grads);
                be.zero(be.view_mut(&mut grads, 0..n));
                acts.rng_key += 1;
                let loss = model.forward(&mut acts, &ids, &ids).unwrap();
                model.backward(&mut acts, &mut grads, 1.0).unwrap();
                loss
            })
        });
    }
    g.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
