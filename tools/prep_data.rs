//! `prep-data`: build the instruction-tuning mixture (docs/RECIPE.md §4) as one Alpaca JSON file plus
//! a stats report. Thin main; the work is `zhllama::instruct::{convert, filter, mix}`.
//!
//! The recipe's mixture in one command: `prep-data --config tools/prep_data_recipe.toml`.
//! Flags override the config: a source flag replaces that source's files, a count flag its count.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use zhllama::instruct::mix::{self, MixConfig, RecipeFile, SourceKind, SourceSpec};

#[derive(Parser)]
#[command(
    name = "prep-data",
    about = "Convert, filter, sample and mix instruction data into one Alpaca JSON file"
)]
struct Args {
    /// A TOML recipe: seed, output, filters and [[source]] entries (name, kind, files, count).
    #[arg(long)]
    config: Option<PathBuf>,
    /// translation2019zh JSON lines {english, chinese}; converted in both directions.
    #[arg(long, num_args = 1..)]
    translation2019zh: Vec<PathBuf>,
    #[arg(long)]
    translation2019zh_count: Option<usize>,
    /// pCLUE JSON lines {input, target, ...}.
    #[arg(long, num_args = 1..)]
    pclue: Vec<PathBuf>,
    #[arg(long)]
    pclue_count: Option<usize>,
    /// Stanford Alpaca (English) records, JSON array or JSON lines.
    #[arg(long, num_args = 1..)]
    alpaca: Vec<PathBuf>,
    #[arg(long)]
    alpaca_count: Option<usize>,
    /// Chinese Alpaca records, JSON array or JSON lines.
    #[arg(long, num_args = 1..)]
    alpaca_zh: Vec<PathBuf>,
    #[arg(long)]
    alpaca_zh_count: Option<usize>,
    /// Crawler output (Alpaca JSON lines), taken as is.
    #[arg(long, num_args = 1..)]
    self_instruct: Vec<PathBuf>,
    #[arg(long)]
    self_instruct_count: Option<usize>,
    /// The mixed records (a JSON array).
    #[arg(long)]
    output: Option<PathBuf>,
    /// The stats report (default: OUTPUT with `.stats.json`).
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Skip and count malformed input instead of failing on the first problem.
    #[arg(long)]
    skip_bad: bool,
    #[arg(long)]
    seed: Option<u64>,
}

fn run(a: Args) -> Result<()> {
    let mut recipe = match &a.config {
        Some(p) => RecipeFile::parse(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{}", p.display()))?,
        None => RecipeFile::default(),
    };
    let flags = [
        ("alpaca", SourceKind::Alpaca, a.alpaca, a.alpaca_count),
        (
            "alpaca_zh",
            SourceKind::Alpaca,
            a.alpaca_zh,
            a.alpaca_zh_count,
        ),
        (
            "self_instruct",
            SourceKind::Alpaca,
            a.self_instruct,
            a.self_instruct_count,
        ),
        ("pclue", SourceKind::Pclue, a.pclue, a.pclue_count),
        (
            "translation2019zh",
            SourceKind::Translation2019zh,
            a.translation2019zh,
            a.translation2019zh_count,
        ),
    ];
    for (name, kind, files, count) in flags {
        let existing = recipe.sources.iter_mut().find(|s| s.name == name);
        match existing {
            Some(s) => {
                if !files.is_empty() {
                    s.files = files;
                }
                if count.is_some() {
                    s.count = count;
                }
            }
            None if !files.is_empty() => recipe.sources.push(SourceSpec {
                name: name.into(),
                kind,
                files,
                count,
            }),
            None => {}
        }
    }
    recipe.sources.retain(|s| !s.files.is_empty());
    anyhow::ensure!(
        !recipe.sources.is_empty(),
        "no input: give --config or at least one source flag (--alpaca, --pclue, ...)"
    );
    let output = a
        .output
        .or(recipe.output.clone())
        .context("no output: give --output or `output` in the config")?;
    let stats_path = a
        .stats
        .or(recipe.stats.clone())
        .unwrap_or_else(|| output.with_extension("stats.json"));
    let mut inputs: Vec<(&str, &std::path::Path)> = recipe
        .sources
        .iter()
        .flat_map(|s| s.files.iter().map(|f| (s.name.as_str(), f.as_path())))
        .collect();
    if let Some(c) = &a.config {
        inputs.push(("--config", c));
    }
    zhllama::util::output::check_output_file("--output", &output, &inputs)?;
    zhllama::util::output::check_output_file("--stats", &stats_path, &inputs)?;
    anyhow::ensure!(
        zhllama::util::output::resolve(&stats_path) != zhllama::util::output::resolve(&output),
        "--stats {} is the same file as --output; give two paths",
        stats_path.display()
    );
    let cfg = MixConfig {
        seed: a.seed.or(recipe.seed).unwrap_or(42),
        skip_bad: a.skip_bad || recipe.skip_bad.unwrap_or(false),
        filters: recipe.filters.clone(),
        sources: recipe.sources.clone(),
    };
    let (records, stats) = mix::mix(&cfg)?;
    anyhow::ensure!(!records.is_empty(), "every record was filtered out");
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    mix::write_records(&output, &records)?;
    zhllama::util::write_atomic(&stats_path, &serde_json::to_vec_pretty(&stats)?)?;
    for (name, s) in &stats.sources {
        let dropped: u64 = s.dropped.values().sum();
        eprintln!(
            "{name}: read {}, kept {}, dropped {dropped} {:?}{}",
            s.read,
            s.kept,
            s.dropped,
            if s.short_of_target > 0 {
                format!(
                    " — WARNING: {} short of the target {:?}",
                    s.short_of_target, s.target
                )
            } else {
                String::new()
            }
        );
    }
    eprintln!(
        "{}: {} records; report {}",
        output.display(),
        stats.total,
        stats_path.display()
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
