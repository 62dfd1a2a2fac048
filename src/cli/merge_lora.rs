//! `zhllama merge-lora --base DIR --adapter DIR [--adapter DIR ...] --output DIR`.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Base HF model directory.
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT LoRA adapter directory; repeat to merge several in order (e.g. pt2 then sft).
    #[arg(long, required = true)]
    pub adapter: Vec<PathBuf>,
    /// Output HF model directory (config + sharded safetensors + index).
    #[arg(long)]
    pub output: PathBuf,
    /// Largest shard, in bytes of tensor data.
    #[arg(long, default_value_t = 2 << 30)]
    pub max_shard_bytes: usize,
    /// Replace an existing --output that does not hold a model.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        args.max_shard_bytes > 0,
        "--max-shard-bytes must be at least 1 (got 0)"
    );
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--base", &args.base)];
    inputs.extend(args.adapter.iter().map(|a| ("--adapter", a.as_path())));
    zhllama::util::check_output(
        "--output",
        &args.output,
        zhllama::util::OutputKind::Model,
        &inputs,
        args.overwrite,
    )?;
    zhllama::model::llama::check_model_dir(&args.base)
        .with_context(|| format!("--base {}", args.base.display()))?;
    super::memory::check_inference(&args.base, "merge-lora")?;
    let adapters = args
        .adapter
        .iter()
        .map(|d| zhllama::model::peft::load_adapter(d))
        .collect::<Result<Vec<_>>>()?;
    zhllama::model::peft::merge_into_dir(
        &args.base,
        &adapters,
        &args.output,
        args.max_shard_bytes,
    )?;
    println!("{}", args.output.display());
    Ok(())
}
