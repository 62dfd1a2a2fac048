//! `zhllama export --model DIR [--adapter DIR ...] --tokenizer PATH --output FILE.gguf
//! --outtype f32|f16|bf16|q8_0`: a GGUF file for llama.cpp (and the tools built on it).

use anyhow::Result;
use std::path::PathBuf;
use zhllama::export::{ExportOptions, OutType, export_gguf};

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutTypeArg {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

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
    /// Element type of the weight matrices (norms stay f32).
    #[arg(long, value_enum, default_value = "f16")]
    outtype: OutTypeArg,
}

pub fn run(args: Args) -> Result<()> {
    let outtype = match args.outtype {
        OutTypeArg::F32 => OutType::F32,
        OutTypeArg::F16 => OutType::F16,
        OutTypeArg::Bf16 => OutType::BF16,
        OutTypeArg::Q8_0 => OutType::Q8_0,
    };
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
