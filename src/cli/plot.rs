//! `zhllama plot RUN_DIR [--output FILE]`: the loss curve of a run to PNG.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Run directory (the `--output` of `zhllama train`; reads its metrics.jsonl).
    pub run_dir: PathBuf,
    /// PNG to write (default RUN_DIR/loss.png).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let png = args.output.unwrap_or_else(|| args.run_dir.join("loss.png"));
    let metrics = args.run_dir.join(zhllama::train::metrics::METRICS_FILE);
    zhllama::util::output::check_output_file("--output", &png, &[("metrics", &metrics)])?;
    zhllama::train::plot::plot_run(&args.run_dir, &png)?;
    println!("{}", png.display());
    Ok(())
}
