//! `train-vocab`: train a SentencePiece-compatible vocabulary from a text corpus (one example per
//! line). Thin main over `zhllama::vocab::train`.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::path::{Path, PathBuf};
use zhllama::vocab::proto::ModelType;
use zhllama::vocab::{TrainOptions, train};

#[derive(Clone, Copy, clap::ValueEnum)]
enum Kind {
    Bpe,
    Unigram,
}

#[derive(Parser)]
#[command(
    name = "train-vocab",
    about = "Train a SentencePiece-compatible vocab (.model)"
)]
struct Args {
    /// Corpus: text files and/or folders (every *.txt inside, sorted), one example per line.
    #[arg(required = true)]
    input: Vec<PathBuf>,
    /// Pieces in the output model (special and byte pieces included).
    #[arg(long, default_value_t = 8000)]
    vocab_size: usize,
    #[arg(long, value_enum, default_value = "bpe")]
    model_type: Kind,
    /// Fraction of character occurrences the kept characters cover.
    #[arg(long, default_value_t = 0.9995)]
    character_coverage: f64,
    /// Add <0x00>..<0xFF> pieces so uncovered characters still encode losslessly.
    #[arg(long)]
    byte_fallback: bool,
    /// Longest piece in characters.
    #[arg(long, default_value_t = 16)]
    max_piece_length: usize,
    /// The .model file to write (atomically).
    #[arg(long)]
    output: PathBuf,
}

fn corpus_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|e| e == "txt"))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!("{}: no *.txt files", p.display());
            }
            files.extend(v);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(files)
}

fn read_text(p: &Path) -> Result<String> {
    let b = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
    String::from_utf8(b).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&c| c == b'\n').count() + 1;
        anyhow::anyhow!("{}: line {line}: not valid UTF-8", p.display())
    })
}

fn run(a: Args) -> Result<()> {
    let inputs: Vec<(&str, &std::path::Path)> =
        a.input.iter().map(|p| ("input", p.as_path())).collect();
    zhllama::util::output::check_output_file("--output", &a.output, &inputs)?;
    anyhow::ensure!(
        a.character_coverage > 0.0 && a.character_coverage <= 1.0,
        "--character-coverage {} is out of range: expected a number in (0, 1]",
        a.character_coverage
    );
    anyhow::ensure!(
        a.max_piece_length >= 1,
        "--max-piece-length 0 is out of range: expected an integer ≥ 1"
    );
    anyhow::ensure!(
        a.vocab_size >= 4,
        "--vocab-size {} is out of range: expected an integer ≥ 4 (3 special pieces and one more)",
        a.vocab_size
    );
    let files = corpus_files(&a.input)?;
    let texts = files
        .iter()
        .map(|f| read_text(f))
        .collect::<Result<Vec<_>>>()?;
    let lines: Vec<&str> = texts
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| !l.is_empty())
        .collect();
    let opt = TrainOptions {
        vocab_size: a.vocab_size,
        model_type: match a.model_type {
            Kind::Bpe => ModelType::Bpe,
            Kind::Unigram => ModelType::Unigram,
        },
        character_coverage: a.character_coverage,
        byte_fallback: a.byte_fallback,
        max_piece_chars: a.max_piece_length,
        input_description: files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
    };
    let (model, rep) = train(&lines, &opt)?;
    zhllama::util::write_atomic(&a.output, &model.to_bytes())?;
    println!(
        "{} sentences, {} distinct characters ({} kept), {} merges -> {} pieces in {}",
        rep.sentences,
        rep.characters,
        rep.kept_characters,
        rep.merges,
        model.pieces.len(),
        a.output.display()
    );
    Ok(())
}

fn main() {
    // SIGINT/SIGTERM remove every temp file still being written, then exit.
    if let Err(e) = zhllama::util::cleanup::install_signal_cleanup() {
        eprintln!("warning: {e:#}");
    }
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {}", zhllama::util::error_line(&e));
        std::process::exit(1);
    }
}
