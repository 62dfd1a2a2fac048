//! `zhllama eval --model DIR --tokens FILE`: mean token cross-entropy of an HF LLaMA directory on
//! token sequences. FILE is JSON: a list of token-id lists (one sequence each, no padding). Prints
//! one JSON line `{"loss": ..., "tokens": ...}`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::{Llama, TrainSpec, eval_loss};

use super::backend::{BackendKind, local_rank, open_cuda};

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json + model.safetensors or sharded safetensors + index).
    #[arg(long)]
    model: PathBuf,
    /// JSON file: a list of token-id lists.
    #[arg(long)]
    tokens: PathBuf,
    /// Backend that runs the model.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

/// Parse FILE into sequences; every id must be an integer in `0..vocab`.
fn read_tokens(path: &Path, vocab: usize) -> Result<Vec<Vec<i32>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let seqs: Vec<Vec<i64>> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of token-id lists", path.display()))?;
    if seqs.is_empty() {
        bail!("{}: no sequences (empty list)", path.display());
    }
    let mut out = Vec::with_capacity(seqs.len());
    for (si, s) in seqs.iter().enumerate() {
        if s.is_empty() {
            bail!("{}: sequence {si} is empty", path.display());
        }
        let mut ids = Vec::with_capacity(s.len());
        for (pi, &id) in s.iter().enumerate() {
            if id < 0 || id as u64 >= vocab as u64 {
                bail!(
                    "{}: sequence {si}, position {pi}: token id {id} is outside the vocabulary (size {vocab})",
                    path.display()
                );
            }
            ids.push(id as i32);
        }
        out.push(ids);
    }
    Ok(out)
}

pub fn run(args: Args) -> Result<()> {
    match args.backend {
        BackendKind::Cpu => {
            zhllama::model::llama::check_model_dir(&args.model)
                .with_context(|| format!("cannot load model {}", args.model.display()))?;
            super::memory::check_inference(&args.model, "eval")?;
            run_on(Arc::new(CpuBackend::new()), &args)
        }
        BackendKind::Cuda => run_on(Arc::new(open_cuda(local_rank()?, false, false)?), &args),
    }
}

fn run_on<B: Backend>(backend: Arc<B>, args: &Args) -> Result<()> {
    let model = Llama::from_dir(backend, &args.model, TrainSpec::frozen())
        .with_context(|| format!("cannot load model {}", args.model.display()))?;
    let seqs = read_tokens(&args.tokens, model.config().vocab_size)?;
    let (loss, tokens) =
        eval_loss(&model, &seqs).with_context(|| format!("{}", args.tokens.display()))?;
    if !loss.is_finite() {
        bail!(
            "{}: the loss of model {} on these tokens is non-finite ({loss}); its weights are finite, so the activations overflowed",
            args.tokens.display(),
            args.model.display()
        );
    }
    println!("{}", serde_json::json!({"loss": loss, "tokens": tokens}));
    Ok(())
}
