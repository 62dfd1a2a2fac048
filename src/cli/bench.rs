//! `zhllama bench --preset NAME`: time forward+backward training steps (every weight trainable,
//! random init, random tokens) and print tokens/s and achieved GFLOP/s (FLOPs counted by
//! `LlamaConfig::train_step_flops`: weight matmuls ×6 plus causal attention, elementwise ops not
//! counted). `tools/oracle/bench_torch.py` times the same shape in PyTorch; see docs/PERF.md.
//!
//! Presets (`--batch`, `--seq`, `--layers` override):
//! - `tiny`:  dim 64, 2 layers, 4 heads, ffn 176, vocab 1000, seq 64, batch 2 (seconds; smoke test)
//! - `small`: dim 512, 8 layers, 8 heads, ffn 1376, vocab 49954, seq 256, batch 4 (the shape)
//! - `7b`:    LLaMA-7B dims (dim 4096, 32 layers, 32 heads, ffn 11008, vocab 49954), seq 512, batch 1;
//!   use `--layers 1` for one layer on a small machine.

use anyhow::{Result, bail};
use rand::{RngExt, SeedableRng};
use std::sync::Arc;
use std::time::Instant;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::{Activations, Llama, LlamaConfig, TrainSpec};

#[derive(clap::Args)]
pub struct Args {
    /// Shape preset: tiny, small, 7b.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Timed steps (after the warm-up).
    #[arg(long)]
    steps: Option<usize>,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    seq: Option<usize>,
    #[arg(long)]
    layers: Option<usize>,
    /// Instead of a model step, time the backend's f32 matmul at `N×N×N` (the SGEMM ceiling the
    /// step's GFLOP/s is compared against).
    #[arg(long, value_name = "N")]
    sgemm: Option<usize>,
    /// Backend: cpu (cuda once the CUDA backend lands).
    #[arg(long, default_value = "cpu")]
    backend: String,
}

/// `(config, batch, seq, default steps)` of a preset.
fn preset(name: &str) -> Result<(LlamaConfig, usize, usize, usize)> {
    Ok(match name {
        "tiny" => (LlamaConfig::new(1000, 64, 176, 2, 4, 4), 2, 64, 20),
        "small" => (LlamaConfig::new(49954, 512, 1376, 8, 8, 8), 4, 256, 5),
        "7b" => (LlamaConfig::new(49954, 4096, 11008, 32, 32, 32), 1, 512, 3),
        _ => bail!("unknown preset {name:?} (expected tiny, small or 7b)"),
    })
}

/// GFLOP/s of `out[n,n] = a[n,n] · b[n,n]ᵀ` (the `y = x·Wᵀ` layout the model uses most).
fn sgemm<B: Backend>(backend: &B, n: usize, reps: usize) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let host: Vec<f32> = (0..n * n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut a = backend.alloc(n * n, zhllama::backend::Role::Activation)?;
    let mut b = backend.alloc(n * n, zhllama::backend::Role::Weight)?;
    let mut out = backend.alloc(n * n, zhllama::backend::Role::Activation)?;
    backend.upload(&mut a, &host)?;
    backend.upload(&mut b, &host)?;
    let mm = |out: &mut B::Buf| {
        backend.matmul(
            backend.view_mut(out, 0..n * n),
            backend.view(&a, 0..n * n),
            backend.view(&b, 0..n * n),
            n,
            n,
            n,
            false,
            true,
            1.0,
            0.0,
        );
        backend.synchronize()
    };
    mm(&mut out)?;
    let start = Instant::now();
    for _ in 0..reps {
        mm(&mut out)?;
    }
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    let gflops = 2.0 * (n as f64).powi(3) / secs / 1e9;
    eprintln!(
        "sgemm {n}³ on {}: {:.2} ms, {gflops:.1} GFLOP/s",
        backend.name(),
        secs * 1e3
    );
    println!(
        "{}",
        serde_json::json!({"impl": "zhllama", "backend": backend.name(), "sgemm": n, "ms": secs * 1e3, "gflops": gflops})
    );
    Ok(())
}

fn run_on<B: Backend>(backend: Arc<B>, args: &Args) -> Result<()> {
    if let Some(n) = args.sgemm {
        return sgemm(&*backend, n, args.steps.unwrap_or(10).max(1));
    }
    let (mut cfg, mut b, mut t, steps) = preset(&args.preset)?;
    if let Some(l) = args.layers {
        cfg.num_hidden_layers = l;
    }
    b = args.batch.unwrap_or(b);
    t = args.seq.unwrap_or(t);
    let steps = args.steps.unwrap_or(steps).max(1);
    let name = backend.name();
    let model = Llama::random(backend.clone(), cfg.clone(), TrainSpec::full(), 0)?;
    let mut acts = Activations::new(&model, b, t)?;
    let mut grads = model.alloc_grads()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<i32> = (0..b * t)
        .map(|_| rng.random_range(0..cfg.vocab_size as i32))
        .collect();
    let mut step = |grads: &mut B::Buf| -> Result<f32> {
        let n = backend.buf_len(grads);
        backend.zero(backend.view_mut(grads, 0..n));
        let loss = model.forward(&mut acts, &ids, &ids)?;
        model.backward(&mut acts, grads, 1.0)?;
        backend.synchronize()?;
        Ok(loss)
    };
    for _ in 0..args.warmup {
        step(&mut grads)?;
    }
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(&mut grads)?;
    }
    let secs = start.elapsed().as_secs_f64() / steps as f64;
    let flops = cfg.train_step_flops(b, t);
    let tok_s = (b * t) as f64 / secs;
    let gflops = flops / secs / 1e9;
    eprintln!(
        "{} on {name}: {b}×{t} tokens, {:.1} ms/step, {tok_s:.0} tokens/s, {gflops:.1} GFLOP/s (loss {loss:.4})",
        args.preset,
        secs * 1e3
    );
    println!(
        "{}",
        serde_json::json!({
            "impl": "zhllama", "backend": name, "preset": args.preset, "batch": b, "seq": t,
            "layers": cfg.num_hidden_layers, "steps": steps, "step_ms": secs * 1e3,
            "tokens_per_s": tok_s, "gflop_per_step": flops / 1e9, "gflops": gflops, "loss": loss,
        })
    );
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    match args.backend.as_str() {
        "cpu" => run_on(Arc::new(CpuBackend::new()), &args),
        other => bail!("unknown or unavailable backend {other:?} (this build has: cpu)"),
    }
}
