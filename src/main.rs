//! The zhllama trainer CLI. Only binaries read arguments and environment variables; each
//! subcommand's arguments and glue live in `src/cli/<name>.rs`, the work in the library.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "zhllama",
    version,
    about = "Chinese-LLaMA-Alpaca recipe trainer: vocab merge, pre-training, LoRA SFT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole recipe end to end on built-in data (the default main job).
    Demo(cli::demo::Args),
    /// Train a stage of the recipe: pt1, pt2 or sft.
    Train(cli::train::Args),
    /// Mean token cross-entropy of a model on token sequences.
    Eval(cli::eval::Args),
    /// Generate text from a model (optionally with LoRA adapters).
    Generate(cli::generate::Args),
    /// Merge LoRA adapters into a base model.
    MergeLora(cli::merge_lora::Args),
    /// Write a model (optionally with LoRA adapters merged) as GGUF for llama.cpp.
    Export(cli::export::Args),
    /// Time forward+backward steps of a named shape.
    Bench(cli::bench::Args),
    /// Encode text lines to token ids with a SentencePiece model.
    Tokenize(cli::tokenize::Args),
    /// Build pre-training or SFT token shards.
    Data(cli::data::Args),
    /// Draw the loss curves of one or more run directories (overlaid) to PNG.
    Plot(cli::plot::Args),
}

fn main() {
    let cli = Cli::parse();
    // SIGINT/SIGTERM remove every temp file and directory still being written, then exit.
    if let Err(e) = zhllama::util::cleanup::install_signal_cleanup() {
        eprintln!("warning: {e:#}");
    }
    let result = match cli.command {
        Command::Demo(a) => cli::demo::run(a),
        Command::Train(a) => cli::train::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::MergeLora(a) => cli::merge_lora::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Tokenize(a) => cli::tokenize::run(a),
        Command::Data(a) => cli::data::run(a),
        Command::Plot(a) => cli::plot::run(a),
    };
    if let Err(e) = result {
        // One line: the context chain joined by ": ", naming the file/line/tensor at fault.
        eprintln!("error: {}", zhllama::util::error_line(&e));
        std::process::exit(1);
    }
}
