//! `zhllama plot RUN_DIR [RUN_DIR...] [--output FILE]`: the loss and learning-rate curves of one
//! run, or of several overlaid (legend by run name), to PNG.

use anyhow::{Result, bail};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Run directories (the `--output` of `zhllama train`; each read from its metrics.jsonl).
    #[arg(required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// PNG to write (default RUN_DIR/loss.png for one run; required for several).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let png = match (args.output, args.run_dirs.as_slice()) {
        (Some(p), _) => p,
        (None, [one]) => one.join("loss.png"),
        (None, _) => bail!("--output is required when overlaying several runs"),
    };
    let metrics: Vec<PathBuf> = args
        .run_dirs
        .iter()
        .map(|d| d.join(zhllama::train::metrics::METRICS_FILE))
        .collect();
    let inputs: Vec<(&str, &std::path::Path)> =
        metrics.iter().map(|m| ("metrics", m.as_path())).collect();
    zhllama::util::output::check_output_file("--output", &png, &inputs)?;
    zhllama::train::plot::plot_runs(&args.run_dirs, &png)?;
    println!("{}", png.display());
    Ok(())
}
