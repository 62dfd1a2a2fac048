//! `zhllama demo`: the whole recipe end to end on built-in data (see `zhllama::demo`).

use anyhow::Result;
use std::path::PathBuf;
use zhllama::demo::run::{DemoOptions, run as run_demo};

#[derive(clap::Args)]
pub struct Args {
    /// Run folder (default: runs/demo-<unix time>); must not exist or be empty.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// A smaller run: under a minute on 2 cores.
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// No progress output, only the final table.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    let out_dir = args.output.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("runs/demo-{secs}"))
    });
    let opts = DemoOptions {
        out_dir: out_dir.clone(),
        quick: args.quick,
        seed: args.seed,
        verbose: !args.quiet,
    };
    let report = run_demo(&opts)?;
    println!("{}", report.table());
    println!(
        "run folder: {} (report.md, report.json, samples.txt, */metrics.jsonl, */loss.png); {:.0} s in all",
        out_dir.display(),
        report.total_seconds
    );
    Ok(())
}
