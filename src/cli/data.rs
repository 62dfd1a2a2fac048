//! `zhllama data pretrain|sft`: build token shards (the work is in `zhllama::data`).

use anyhow::Result;
use std::path::PathBuf;
use zhllama::data::{PretrainConfig, SftConfig, TokenizerEncoder, pretrain, sft};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Tokenize every line of every *.txt (BOS, no EOS), group per 1000-line batch into blocks,
    /// split off a seeded validation fraction, write train.tok / validation.tok / manifest.json.
    Pretrain(PretrainArgs),
    /// Tokenize Alpaca JSON / JSONL records into SFT examples (prompt with BOS, output + </s>,
    /// labels -100 on the prompt, right truncation), write train.sft / manifest.json.
    Sft(SftArgs),
}

#[derive(clap::Args)]
struct PretrainArgs {
    /// A SentencePiece .model file, or a directory holding tokenizer.model.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Directories (their *.txt files, sorted) and/or text files.
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// Output directory; must not exist (written to a temp dir, renamed when complete).
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 512)]
    block_size: usize,
    #[arg(long, default_value_t = 0.001)]
    validation_fraction: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip and count undecodable lines and empty files instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct SftArgs {
    /// A SentencePiece .model file, or a directory holding tokenizer.model.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Alpaca-format files (JSON array or JSON lines), in order.
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// Output directory; must not exist.
    #[arg(long)]
    output: PathBuf,
    /// Truncation length of prompt + response.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Skip and count malformed records instead of failing.
    #[arg(long)]
    skip_bad: bool,
    #[arg(long)]
    quiet: bool,
}

/// The output must be a new directory, never one of the inputs.
fn check_io(
    output: &std::path::Path,
    tokenizer: &std::path::Path,
    input: &[PathBuf],
) -> Result<()> {
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--tokenizer", tokenizer)];
    inputs.extend(input.iter().map(|p| ("--input", p.as_path())));
    zhllama::util::output::check_not_input("--output", output, &inputs)?;
    anyhow::ensure!(
        !output.exists(),
        "--output {} already exists; remove it or choose another path",
        output.display()
    );
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Pretrain(a) => {
            anyhow::ensure!(
                a.block_size >= 2,
                "--block-size {} is out of range: expected an integer ≥ 2 (a block trains on next-token pairs)",
                a.block_size
            );
            anyhow::ensure!(
                (0.0..1.0).contains(&a.validation_fraction),
                "--validation-fraction {} is out of range: expected a number in [0, 1)",
                a.validation_fraction
            );
            check_io(&a.output, &a.tokenizer, &a.input)?;
            let enc = TokenizerEncoder::load(&a.tokenizer)?;
            let files = pretrain::collect_inputs(&a.input)?;
            let cfg = PretrainConfig {
                block_size: a.block_size,
                validation_fraction: a.validation_fraction,
                seed: a.seed,
                skip_bad: a.skip_bad,
                progress: !a.quiet,
                tokenizer_sha256: zhllama::data::sha256_file(
                    &zhllama::vocab::encode::resolve_model_path(&a.tokenizer)?,
                )?,
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let m = pretrain::build_pretrain(&enc, &files, &a.output, &cfg)?;
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "{}: {} lines, {} tokens tokenized ({:.0} tokens/s), {} train + {} validation blocks of {}{}{}",
                a.output.display(),
                m.lines,
                m.tokenized_tokens,
                m.tokenized_tokens as f64 / secs.max(1e-9),
                m.train_blocks,
                m.validation_blocks,
                m.block_size,
                if m.short_batches_dropped > 0 {
                    format!(
                        "; {} batches shorter than a block dropped ({} tokens)",
                        m.short_batches_dropped, m.short_batch_tokens
                    )
                } else {
                    String::new()
                },
                if m.bad_lines_skipped + m.empty_files_skipped > 0 {
                    format!(
                        "; skipped {} bad lines, {} empty files",
                        m.bad_lines_skipped, m.empty_files_skipped
                    )
                } else {
                    String::new()
                }
            );
        }
        Command::Sft(a) => {
            anyhow::ensure!(
                a.max_len >= 2,
                "--max-len {} is out of range: expected an integer ≥ 2 (a prompt token and a target)",
                a.max_len
            );
            check_io(&a.output, &a.tokenizer, &a.input)?;
            let enc = TokenizerEncoder::load(&a.tokenizer)?;
            let cfg = SftConfig {
                max_len: a.max_len,
                skip_bad: a.skip_bad,
                progress: !a.quiet,
                tokenizer_sha256: zhllama::data::sha256_file(
                    &zhllama::vocab::encode::resolve_model_path(&a.tokenizer)?,
                )?,
            };
            let m = sft::build_sft(&enc, &a.input, &a.output, &cfg)?;
            let skipped: u64 = m.files.iter().flat_map(|f| f.skipped.values()).sum();
            eprintln!(
                "{}: {} examples, {} tokens ({} with labels), {} truncated to {}, pad id {}{}{}",
                a.output.display(),
                m.examples,
                m.tokens,
                m.target_tokens,
                m.truncated_examples,
                m.max_len,
                m.pad_id,
                if m.no_target_dropped > 0 {
                    format!(
                        "; dropped {} examples with no target token left after truncation",
                        m.no_target_dropped
                    )
                } else {
                    String::new()
                },
                if skipped > 0 {
                    format!("; skipped {skipped} malformed records (see manifest.json)")
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}
