//! `merge-tokenizers`: the Chinese-LLaMA vocabulary merge (docs/RECIPE.md §1), mirroring the original
//! `merge_tokenizers.py` interface. Thin main; the work is `zhllama::vocab::merge_tokenizers`.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "merge-tokenizers",
    about = "Append a Chinese SentencePiece vocab to the LLaMA one"
)]
struct Args {
    /// Directory holding the LLaMA `tokenizer.model` (or the file itself).
    #[arg(long)]
    llama_tokenizer_dir: PathBuf,
    /// The Chinese SentencePiece model (e.g. chinese_sp.model).
    #[arg(long)]
    chinese_sp_model_file: PathBuf,
    /// Output directory: tokenizer.model + HF files; written whole or not at all.
    #[arg(long, default_value = "merged_tokenizer")]
    output_dir: PathBuf,
    /// Append a `[PAD]` piece (the Chinese-Alpaca tokenizer, 49954 pieces).
    #[arg(long)]
    add_pad: bool,
    /// Replace an existing --output-dir that does not hold a tokenizer.
    #[arg(long)]
    overwrite: bool,
}

fn main() {
    let a = Args::parse();
    let result = zhllama::util::cleanup::install_signal_cleanup()
        .and_then(|()| {
            zhllama::util::check_output(
                "--output-dir",
                &a.output_dir,
                zhllama::util::OutputKind::Tokenizer,
                &[
                    ("--llama-tokenizer-dir", &a.llama_tokenizer_dir),
                    ("--chinese-sp-model-file", &a.chinese_sp_model_file),
                ],
                a.overwrite,
            )
        })
        .and_then(|()| {
            zhllama::vocab::merge_tokenizers(
                &a.llama_tokenizer_dir,
                &a.chinese_sp_model_file,
                &a.output_dir,
                a.add_pad,
            )
        });
    match result {
        Ok(st) => {
            println!(
                "appended {} pieces, skipped {} already present; final size {} -> {}",
                st.appended,
                st.skipped,
                st.total,
                a.output_dir.display()
            );
        }
        Err(e) => {
            eprintln!("error: {}", zhllama::util::error_line(&e));
            std::process::exit(1);
        }
    }
}
