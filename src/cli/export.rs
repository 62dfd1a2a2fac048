//! `zhllama export --model DIR [--adapter DIR ...] --tokenizer PATH --output FILE.gguf
//! --outtype f32|f16|bf16|q8_0`: a GGUF file for llama.cpp (and the tools built on it).

use anyhow::{Result, bail};
use std::path::PathBuf;
use zhllama::export::{ExportOptions, OutType, export_gguf};

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory, merged as `merge-lora` does; repeat to merge several in order.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// A SentencePiece `.model` file, or a directory holding `tokenizer.model` (embedded in the file).
    #[arg(long)]
    tokenizer: PathBuf,
    /// The GGUF file to write (atomically).
    #[arg(long)]
    output: PathBuf,
    /// Element type of the weight matrices (norms stay f32): f32, f16, bf16 or q8_0.
    #[arg(long, default_value = "f16")]
    outtype: String,
    /// Replace an existing --output file.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: Args) -> Result<()> {
    // Parsed here rather than by clap so a bad value is one error line like every refusal.
    let outtype = match args.outtype.as_str() {
        "f32" => OutType::F32,
        "f16" => OutType::F16,
        "bf16" => OutType::BF16,
        "q8_0" => OutType::Q8_0,
        other => bail!("--outtype {other:?}: expected one of f32, f16, bf16, q8_0"),
    };
    let mut inputs: Vec<(&str, &std::path::Path)> =
        vec![("--model", &args.model), ("--tokenizer", &args.tokenizer)];
    inputs.extend(args.adapter.iter().map(|a| ("--adapter", a.as_path())));
    zhllama::util::output::check_output_file("--output", &args.output, &inputs)?;
    if args.output.exists() && !args.overwrite {
        bail!(
            "--output {} exists; pass --overwrite to replace it",
            args.output.display()
        );
    }
    let s = export_gguf(&ExportOptions {
        model_dir: args.model,
        adapter_dirs: args.adapter,
        tokenizer: args.tokenizer,
        output: args.output.clone(),
        outtype,
    })?;
    for t in &s.q8_0_fallbacks {
        eprintln!("note: {t}: rows are not whole Q8_0 blocks of 32, written as f16");
    }
    eprintln!(
        "{} tensors, vocabulary {}, {} bytes",
        s.tensors, s.vocab, s.bytes
    );
    println!("{}", args.output.display());
    Ok(())
}
