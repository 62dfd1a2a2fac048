//! Cost and saving of gradient checkpointing: training-step time (forward + backward) and
//! activation bytes with checkpointing vs without (the reference), same model, same batches,
//! steps interleaved so machine load hits both alike. CPU backend, random 8-layer 256-wide LLaMA
//! (ffn 688, vocab 4096), batch 2 × 256 tokens; two trainable sets: everything (full fine-tune)
//! and LoRA r=8 on all seven projections, dropout 0.05 (the SFT stage's adapters, base frozen).
//! Both runs must give the same loss bits (asserted). Run:
//! `cargo run --release --example checkpointing_speed`.

use std::sync::Arc;
use std::time::Instant;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::{Activations, Llama, LlamaConfig, LoraConfig, Proj, TrainSpec};

/// CPU seconds of this process so far (Linux `/proc/self/stat` utime + stime, 100 ticks/s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return f64::NAN;
    };
    let fields: Vec<f64> = stat[close + 2..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(f64::NAN))
        .collect();
    (fields.get(11).copied().unwrap_or(f64::NAN) + fields.get(12).copied().unwrap_or(f64::NAN))
        / 100.0
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(|a, b| a.total_cmp(b));
    x[x.len() / 2]
}

fn main() {
    let (b, t, rounds) = (2, 256, 9);
    let cfg = LlamaConfig::new(4096, 256, 688, 8, 8, 8);
    let lora = TrainSpec {
        lora: Some(LoraConfig::new(8, 16.0, 0.05, &Proj::ALL, 1).unwrap()),
        ..TrainSpec::frozen()
    };
    for (name, spec) in [("full", TrainSpec::full()), ("lora", lora)] {
        let model = Llama::random(Arc::new(CpuBackend::new()), cfg.clone(), spec, 1).unwrap();
        let mut sets = [
            Activations::new(&model, b, t).unwrap(),
            Activations::new_checkpointed(&model, b, t).unwrap(),
        ];
        let mut grads = model.alloc_grads().unwrap();
        let ids: Vec<i32> = (0..b * t).map(|i| (i * 7919 % 4096) as i32).collect();
        let (mut wall, mut cpu) = ([vec![], vec![]], [vec![], vec![]]);
        let mut losses = [0.0f32; 2];
        for round in 0..=rounds {
            for (k, acts) in sets.iter_mut().enumerate() {
                acts.training = true;
                acts.rng_key = round as u64;
                let (w0, c0) = (Instant::now(), cpu_seconds());
                losses[k] = model.forward(acts, &ids, &ids).unwrap();
                model.backward(acts, &mut grads, 1.0).unwrap();
                if round > 0 {
                    // round 0 warms up
                    wall[k].push(w0.elapsed().as_secs_f64());
                    cpu[k].push(cpu_seconds() - c0);
                }
            }
            assert_eq!(losses[0].to_bits(), losses[1].to_bits(), "losses differ");
        }
        let (w, c) = (
            [median(wall[0].clone()), median(wall[1].clone())],
            [median(cpu[0].clone()), median(cpu[1].clone())],
        );
        let (m0, m1) = (sets[0].bytes(), sets[1].bytes());
        println!(
            "{name}: step without {:.3}s wall {:.3}s cpu, with {:.3}s wall {:.3}s cpu: time ratio \
             {:.3} wall {:.3} cpu (median of {rounds}); activation bytes {m0} vs {m1}: ratio {:.3}",
            w[0],
            c[0],
            w[1],
            c[1],
            w[1] / w[0],
            c[1] / c[0],
            m1 as f64 / m0 as f64
        );
    }
}
