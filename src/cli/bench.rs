//! `zhllama bench --preset NAME [--stage full|pt1|pt2|sft] [--backend cpu|cuda]`: time training steps
//! of a named shape on random tokens and print per-step losses, tokens/s, achieved TFLOP/s and MFU.
//!
//! - `--stage full` (default): forward + backward with every weight trainable, no optimizer step (the
//!   shape `tools/oracle/bench_torch.py` times on CPU). FLOPs by `LlamaConfig::train_step_flops`
//!   (weight matmuls ×6 plus causal attention; elementwise ops not counted).
//! - `--stage pt1|pt2|sft`: the recipe stage's trainable set and hyper-parameters (the
//!   `zhllama train` presets of `train::config`, through the same `setup::train_spec`), with
//!   `batch_size = micro_batch_size = --batch` and `max_length = --seq`, run by
//!   `train::trainer::Trainer` on in-memory random blocks: each timed step is
//!   `Trainer::step`, the code `zhllama train` runs (forward, backward, device accumulation,
//!   ZeRO-2 at world 1: norm, clipping, AdamW on the fp32 master writing the bf16 weights on CUDA).
//!   MFU at 4N FLOPs/token with N = the matmul parameters (every layer's projections + lm_head, as
//!   `tools/oracle/bench_torch_gpu.py` counts them): frozen weights need no weight-gradient
//!   GEMMs, so forward 2N + input gradient 2N; attention's T² terms are not counted.
//! - Every stage reports `host_transfer_bytes_per_step`: the backend's count of host↔device
//!   payload bytes (`Backend::host_transfer_bytes`) over the timed steps, divided by their number.
//! - `--random-init`: weights generated on the device (`Llama::random_on_device`); otherwise on the
//!   host (`Llama::random`) and uploaded. Tokens are seeded, so a cpu and a cuda run of the same
//!   preset, stage and seed see the same data and initial weights (bf16-rounded on CUDA).
//! - `--profile` (CUDA): one extra step under the backend's CUDA-event profiler; prints the
//!   per-kernel table and that step's TFLOP/s.
//!
//! Presets (`--batch`, `--seq`, `--layers` override):
//! - `tiny`:     dim 64, 2 layers, 4 heads, ffn 176, vocab 1000, seq 64, batch 2 (CPU smoke test)
//! - `tiny-d64`: dim 128, 2 layers, 2 heads of 64 (1 kv head), ffn 352, vocab 1000, seq 64, batch 2
//!   (the smallest shape the CUDA attention kernels take: head dims 64 and 128; GPU-vs-CPU losses)
//! - `small`:    dim 512, 8 layers, 8 heads, ffn 1376, vocab 49954, seq 256, batch 4
//! - `7b`:       LLaMA-7B dims (dim 4096, 32 layers, 32 heads, ffn 11008, vocab 49954), seq 512,
//!   batch 1; use `--layers 1` for one layer on a small machine.
//!
//! Human-readable lines go to stderr; stdout is one JSON object.

use anyhow::{Result, bail};
use rand::{RngExt, SeedableRng};
use std::sync::Arc;
use std::time::Instant;
use zhllama::backend::GemmShape;
use zhllama::backend::cpu::CpuBackend;
use zhllama::backend::cuda::CudaBackend;
use zhllama::backend::{Backend, Role};
use zhllama::distributed::LocalComm;
use zhllama::model::{Activations, Llama, LlamaConfig, TrainSpec};
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::data::{Data, MemoryBlocks};
use zhllama::train::trainer::Trainer;

use super::backend::{BackendKind, local_rank, open_cuda};

/// Which parameters train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchStage {
    /// Every weight gets a gradient; forward + backward only.
    Full,
    /// Embedding only (recipe pre-training stage 1).
    Pt1,
    /// LoRA on q,k,v,o + embedding + lm_head (pre-training stage 2).
    Pt2,
    /// LoRA on all seven projections + embedding + lm_head (instruction tuning).
    Sft,
}

impl BenchStage {
    fn recipe(self) -> Option<Stage> {
        match self {
            BenchStage::Full => None,
            BenchStage::Pt1 => Some(Stage::Pt1),
            BenchStage::Pt2 => Some(Stage::Pt2),
            BenchStage::Sft => Some(Stage::Sft),
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Shape preset: tiny, tiny-d64, small, 7b.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Trainable set and step kind (see the module docs).
    #[arg(long, value_enum, default_value = "full")]
    stage: BenchStage,
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
    /// Seed of the weights (tokens use seed + 1).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generate the weights on the device (`fill_uniform`) instead of on the host.
    #[arg(long)]
    random_init: bool,
    /// The GEMM rate (TFLOP/s) MFU is computed against (e.g. the cuBLAS bf16 rate gpu-check measures).
    #[arg(long)]
    gemm_tflops: Option<f64>,
    /// CUDA: profile one extra step per kernel (CUDA events) and print the table.
    #[arg(long)]
    profile: bool,
    /// Instead of a model step, time the backend's matmul at `N×N×N` (the GEMM ceiling the step's
    /// rate is compared against).
    #[arg(long, value_name = "N")]
    sgemm: Option<usize>,
    /// Backend that runs the steps.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

/// What only a device backend can tell: memory in use and the per-kernel profile.
trait DeviceInfo {
    /// Bytes of device memory in use (total − free), or `None` on the host.
    fn mem_used(&self) -> Result<Option<usize>>;
    /// Start timing every launch, forgetting earlier ones; `false` when not supported.
    fn profile_start(&self) -> bool;
    /// Stop timing; (kernel name, calls, total ms) largest first.
    fn profile_stop(&self) -> Result<Vec<(String, usize, f64)>>;
}

impl DeviceInfo for CpuBackend {
    fn mem_used(&self) -> Result<Option<usize>> {
        Ok(None)
    }
    fn profile_start(&self) -> bool {
        false
    }
    fn profile_stop(&self) -> Result<Vec<(String, usize, f64)>> {
        Ok(Vec::new())
    }
}

impl DeviceInfo for CudaBackend {
    fn mem_used(&self) -> Result<Option<usize>> {
        let (free, total) = self.mem_info()?;
        Ok(Some(total - free))
    }
    fn profile_start(&self) -> bool {
        self.profile_reset();
        self.set_profiling(true);
        true
    }
    fn profile_stop(&self) -> Result<Vec<(String, usize, f64)>> {
        let rows = self.profile_report()?;
        self.set_profiling(false);
        Ok(rows
            .into_iter()
            .map(|k| (k.name, k.calls, k.total_ms))
            .collect())
    }
}

/// CPU seconds used so far by this process, all threads (Linux: `/proc/self/stat` utime + stime,
/// in USER_HZ = 100 ticks per second); `None` elsewhere. On a machine shared with other jobs the
/// CPU time of a step is steadier than its wall time.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// `(config, batch, seq, default steps)` of a preset.
fn preset(name: &str) -> Result<(LlamaConfig, usize, usize, usize)> {
    Ok(match name {
        "tiny" => (LlamaConfig::new(1000, 64, 176, 2, 4, 4), 2, 64, 20),
        "tiny-d64" => (LlamaConfig::new(1000, 128, 352, 2, 2, 1), 2, 64, 5),
        "small" => (LlamaConfig::new(49954, 512, 1376, 8, 8, 8), 4, 256, 5),
        "7b" => (LlamaConfig::new(49954, 4096, 11008, 32, 32, 32), 1, 512, 3),
        _ => bail!("unknown preset {name:?} (expected tiny, tiny-d64, small or 7b)"),
    })
}

/// GFLOP/s of `out[n,n] = a[n,n] · b[n,n]ᵀ` (the `y = x·Wᵀ` layout the model uses most).
fn sgemm<B: Backend>(backend: &B, n: usize, reps: usize) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let host: Vec<f32> = (0..n * n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut a = backend.alloc(n * n, Role::Activation)?;
    let mut b = backend.alloc(n * n, Role::Weight)?;
    let mut out = backend.alloc(n * n, Role::Activation)?;
    backend.upload(&mut a, &host)?;
    backend.upload(&mut b, &host)?;
    let mm = |out: &mut B::Buf| {
        backend.matmul(
            backend.view_mut(out, 0..n * n),
            backend.view(&a, 0..n * n),
            backend.view(&b, 0..n * n),
            GemmShape::nt(n, n, n),
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

/// Weights of every matmul: each layer's seven projections and the lm_head (the `N` of 4N).
fn matmul_params(cfg: &LlamaConfig) -> f64 {
    let (c, f, kv) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.kv_dim() as f64,
    );
    cfg.num_hidden_layers as f64 * (2.0 * c * c + 2.0 * c * kv + 3.0 * c * f)
        + cfg.vocab_size as f64 * c
}

fn run_on<B: Backend + DeviceInfo>(backend: Arc<B>, args: &Args) -> Result<()> {
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
    let stage_cfg = args.stage.recipe().map(TrainConfig::preset);
    let spec = match &stage_cfg {
        Some(c) => zhllama::train::setup::train_spec(c)?,
        None => TrainSpec::full(),
    };
    let t0 = Instant::now();
    let model = if args.random_init {
        Llama::random_on_device(backend.clone(), cfg.clone(), spec, args.seed)?
    } else {
        Llama::random(backend.clone(), cfg.clone(), spec, args.seed)?
    };
    let init_s = t0.elapsed().as_secs_f64();
    let (n_train, n_all) = (model.layout().num_trainable(), model.layout().num_params());
    eprintln!(
        "{} {:?} on {name}: {n_train} trainable of {n_all} parameters, init {init_s:.1} s{}",
        args.preset,
        args.stage,
        if args.random_init { " (on device)" } else { "" }
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed.wrapping_add(1));
    let mut random_ids = |n: usize| -> Vec<i32> {
        (0..n)
            .map(|_| rng.random_range(0..cfg.vocab_size as i32))
            .collect()
    };
    // `--stage full`: forward + backward of one fixed batch. A recipe stage: `Trainer::step` on
    // in-memory random blocks (enough for every step, so no block repeats within a run).
    let comm = LocalComm;
    let total_steps = args.warmup + steps + usize::from(args.profile);
    let data = match stage_cfg {
        Some(_) => Some(Data::Memory(MemoryBlocks::new(
            cfg.vocab_size,
            t,
            (0..b * total_steps).map(|_| random_ids(t)).collect(),
        )?)),
        None => None,
    };
    let mut step: Box<dyn FnMut() -> Result<f32> + '_> = match (&stage_cfg, &data) {
        (Some(c), Some(data)) => {
            let mut c = c.clone();
            c.batch_size = b;
            c.micro_batch_size = b;
            c.max_length = t;
            c.max_steps = total_steps as u64;
            let stage = args.stage.recipe().expect("a recipe stage");
            let unused = std::env::temp_dir().join("zhllama-bench-no-output");
            let mut trainer = Trainer::new(model, data, c, stage, &comm, &unused, None)?;
            let be = backend.clone();
            Box::new(move || {
                let rec = trainer.step(false)?;
                be.synchronize()?;
                Ok(rec.loss.unwrap_or(f64::NAN) as f32)
            })
        }
        _ => {
            let mut acts = Activations::new(&model, b, t)?;
            let mut grads = model.alloc_grads()?;
            let ids = random_ids(b * t);
            let be = backend.clone();
            Box::new(move || {
                let n = be.buf_len(&grads);
                be.zero(be.view_mut(&mut grads, 0..n));
                let loss = model.forward(&mut acts, &ids, &ids)?;
                model.backward(&mut acts, &mut grads, 1.0)?;
                be.synchronize()?;
                Ok(loss)
            })
        }
    };
    let mut losses = Vec::new();
    for i in 0..args.warmup {
        let l = step()?;
        eprintln!("step {i} loss {l:.6} (warm-up)");
        losses.push(l);
    }
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    let bytes0 = backend.host_transfer_bytes();
    for i in 0..steps {
        let l = step()?;
        eprintln!("step {} loss {l:.6}", args.warmup + i);
        losses.push(l);
    }
    let secs = start.elapsed().as_secs_f64() / steps as f64;
    let host_bytes = (backend.host_transfer_bytes() - bytes0) as f64 / steps as f64;
    let cpu_s = cpu0.zip(cpu_seconds()).map(|(a, b)| (b - a) / steps as f64);
    let tokens = (b * t) as f64;
    let n_mm = matmul_params(&cfg);
    let flops = match args.stage {
        BenchStage::Full => cfg.train_step_flops(b, t),
        _ => 4.0 * n_mm * tokens,
    };
    let tok_s = tokens / secs;
    let tflops = flops / secs / 1e12;
    let mfu = args.gemm_tflops.filter(|&g| g > 0.0).map(|g| tflops / g);
    let mem = backend.mem_used()?;
    eprintln!(
        "{} {:?} on {name}: {b}×{t} tokens, {:.1} ms/step ({:.2} CPU-s/step), {tok_s:.0} tokens/s, {:.3} TFLOP/s{}{}, {host_bytes:.0} host-transfer bytes/step (loss {:.4})",
        args.preset,
        args.stage,
        secs * 1e3,
        cpu_s.unwrap_or(f64::NAN),
        tflops,
        mfu.map(|m| format!(", MFU {:.1}%", 100.0 * m))
            .unwrap_or_default(),
        mem.map(|m| format!(", {:.2} GiB in use", m as f64 / (1u64 << 30) as f64))
            .unwrap_or_default(),
        losses.last().copied().unwrap_or(f32::NAN)
    );
    let mut profile = serde_json::Value::Null;
    let mut profile_tflops = None;
    if args.profile {
        if backend.profile_start() {
            let p0 = Instant::now();
            let l = step()?;
            let ps = p0.elapsed().as_secs_f64();
            let rows = backend.profile_stop()?;
            let total: f64 = rows.iter().map(|r| r.2).sum();
            eprintln!(
                "profile: one step {:.1} ms wall ({:.3} TFLOP/s under the profiler), {:.1} ms in kernels (loss {l:.4})",
                ps * 1e3,
                flops / ps / 1e12,
                total
            );
            eprintln!("{:<44} {:>6} {:>10} {:>6}", "kernel", "calls", "ms", "%");
            for (k, c, ms) in &rows {
                eprintln!(
                    "{k:<44} {c:>6} {ms:>10.3} {:>5.1}%",
                    100.0 * ms / total.max(1e-9)
                );
            }
            profile_tflops = Some(flops / ps / 1e12);
            profile = serde_json::json!({
                "step_ms": ps * 1e3, "kernel_ms": total, "tflops": flops / ps / 1e12,
                "kernels": rows.iter().map(|(k, c, ms)| serde_json::json!({"name": k, "calls": c, "ms": ms})).collect::<Vec<_>>(),
            });
        } else {
            eprintln!(
                "note: --profile is CUDA-only (per-kernel CUDA events); nothing profiled on {name}"
            );
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "zhllama", "backend": name, "preset": args.preset,
            "stage": format!("{:?}", args.stage).to_lowercase(), "batch": b, "seq": t,
            "layers": cfg.num_hidden_layers, "steps": steps, "warmup": args.warmup,
            "seed": args.seed, "random_init": args.random_init,
            "trainable_params": n_train, "total_params": n_all, "matmul_params": n_mm,
            "step_ms": secs * 1e3, "tokens_per_s": tok_s, "gflop_per_step": flops / 1e9,
            "gflops": flops / secs / 1e9, "tflops": tflops, "mfu": mfu,
            "flops_rule": if args.stage == BenchStage::Full { "6N+attention" } else { "4N" },
            "loss": losses.last(), "losses": losses, "cpu_s_per_step": cpu_s,
            "mem_used_bytes": mem, "init_s": init_s, "profile": profile,
            "profile_tflops": profile_tflops,
            "host_transfer_bytes_per_step": host_bytes,
        })
    );
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    match args.backend {
        BackendKind::Cpu => run_on(Arc::new(CpuBackend::new()), &args),
        BackendKind::Cuda => run_on(Arc::new(open_cuda(local_rank()?, false, false)?), &args),
    }
}
