//! crawl-prompts: self-instruct data from any OpenAI-compatible chat API (docs/RECIPE.md §5).
//! Thin main: flags, environment and files in; the crawl lives in `zhllama::instruct::crawl`.
//!
//! The API key comes from `OPENAI_API_KEY` or `--api-key-file`, never from a flag value (flags end
//! up in shell history and `ps`), and is never printed or written.

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use zhllama::instruct::crawl::{CrawlConfig, Secret, Stats, crawl, raw_log_path};
use zhllama::instruct::crawl_prompt::Template;

#[derive(Parser, Debug)]
#[command(
    name = "crawl-prompts",
    args_override_self = true,
    about = "Crawl self-instruct records (instruction/input/output JSONL) from an OpenAI-compatible chat API",
    after_help = "The API key is read from OPENAI_API_KEY or --api-key-file. Rerunning with the same \
                  --output resumes toward --target (also after kill -9). Exit status: 0 target \
                  reached, 1 error, 2 bad arguments, 3 stopped by --max-requests first."
)]
struct Args {
    /// API root as OpenAI SDKs take it, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    #[arg(long)]
    base_url: String,
    /// Model name sent in each request.
    #[arg(long, default_value = "gpt-3.5-turbo")]
    model: String,
    /// File whose first line is the API key (overrides OPENAI_API_KEY).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Output JSONL (append-only; resumed if it exists).
    #[arg(long)]
    output: PathBuf,
    /// Raw reply log [default: <output>.raw.jsonl].
    #[arg(long)]
    raw_log: Option<PathBuf>,
    /// Records wanted in the output.
    #[arg(long, default_value_t = 1000)]
    target: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Requests per minute (client-side limit, counts retries).
    #[arg(long)]
    rpm: Option<f64>,
    /// Tokens per minute, prompt + completion (client-side limit).
    #[arg(long)]
    tpm: Option<f64>,
    /// Seed for the per-request topic / task-type / length draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// max_tokens sent with each request (none by default).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Whole-request timeout in seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Prompt template file with {{n_items}} {{topics}} {{task_types}} {{input_max_chars}}
    /// {{output_max_chars}} {{language}} placeholders [default: tools/crawl/prompt_template.txt, built in].
    #[arg(long)]
    prompt_template: Option<PathBuf>,
    /// Topics file, one per line [default: the built-in ~80].
    #[arg(long)]
    topics_file: Option<PathBuf>,
    /// Extra blacklisted phrases, one per line (added to the built-in list).
    #[arg(long)]
    blacklist_file: Option<PathBuf>,
    /// Language the items should be in.
    #[arg(long, default_value = "中文")]
    language: String,
    /// Items asked for per request.
    #[arg(long, default_value_t = 20)]
    items_per_request: usize,
    /// Near-duplicate threshold on instruction ROUGE-L F (1.0 keeps only exact-duplicate removal).
    #[arg(long, default_value_t = 0.7)]
    rouge_threshold: f64,
    #[arg(long, default_value_t = 500)]
    max_instruction_chars: usize,
    #[arg(long, default_value_t = 1000)]
    max_input_chars: usize,
    #[arg(long, default_value_t = 2000)]
    max_output_chars: usize,
    /// Retries per request after the first attempt.
    #[arg(long, default_value_t = 8)]
    max_retries: u32,
    /// First back-off in seconds (doubles per retry, with jitter).
    #[arg(long, default_value_t = 1.0)]
    backoff_base: f64,
    /// Longest back-off in seconds.
    #[arg(long, default_value_t = 60.0)]
    backoff_cap: f64,
    /// Stop after this many requests in this run.
    #[arg(long)]
    max_requests: Option<u64>,
    /// Stop when this many replies in a row add no record.
    #[arg(long, default_value_t = 100)]
    max_stalled_replies: u32,
    /// Seconds between log lines when stderr is not a terminal (0: none).
    #[arg(long, default_value_t = 30.0)]
    log_every: f64,
}

fn read_lines(path: &PathBuf) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if v.is_empty() {
        bail!("{}: no entries", path.display());
    }
    Ok(v)
}

fn secs(name: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("--{name} must be a non-negative number of seconds, got {v}"))
}

/// Every numeric flag against its range, and the output against the inputs, before any request.
fn validate(a: &Args) -> Result<()> {
    let count = |name: &str, v: u64| -> Result<()> {
        if v == 0 {
            bail!("--{name} 0 is out of range: expected an integer ≥ 1");
        }
        Ok(())
    };
    let real = |name: &str, v: f64, lo: f64, lo_open: bool, hi: f64| -> Result<()> {
        let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
        if !ok {
            bail!(
                "--{name} {v} is out of range: expected a finite number in {}{lo}, {hi}]",
                if lo_open { "(" } else { "[" }
            );
        }
        Ok(())
    };
    count("target", a.target)?;
    count("concurrency", a.concurrency as u64)?;
    count("items-per-request", a.items_per_request as u64)?;
    if let Some(m) = a.max_tokens {
        count("max-tokens", m as u64)?;
    }
    if let Some(r) = a.rpm {
        real("rpm", r, 0.0, true, f64::MAX)?;
    }
    if let Some(t) = a.tpm {
        real("tpm", t, 0.0, true, f64::MAX)?;
    }
    real("temperature", a.temperature, 0.0, false, 2.0)?;
    real("rouge-threshold", a.rouge_threshold, 0.0, true, 1.0)?;
    let mut inputs: Vec<(&str, &std::path::Path)> = Vec::new();
    for (flag, p) in [
        ("--api-key-file", &a.api_key_file),
        ("--prompt-template", &a.prompt_template),
        ("--topics-file", &a.topics_file),
        ("--blacklist-file", &a.blacklist_file),
    ] {
        if let Some(p) = p {
            inputs.push((flag, p.as_path()));
        }
    }
    zhllama::util::output::check_output_file("--output", &a.output, &inputs)?;
    if let Some(r) = &a.raw_log {
        zhllama::util::output::check_output_file("--raw-log", r, &inputs)?;
        anyhow::ensure!(
            zhllama::util::output::resolve(r) != zhllama::util::output::resolve(&a.output),
            "--raw-log {} is the same file as --output; give two paths",
            r.display()
        );
    }
    Ok(())
}

fn config(a: &Args) -> Result<CrawlConfig> {
    validate(a)?;
    let mut c = CrawlConfig::new(&a.base_url, &a.model, &a.output);
    c.api_key = match &a.api_key_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            let key = text.lines().next().unwrap_or("").trim().to_string();
            if key.is_empty() {
                bail!("{}: first line is empty, expected the API key", p.display());
            }
            Some(Secret::new(key))
        }
        None => std::env::var("OPENAI_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty())
            .map(|k| Secret::new(k.trim())),
    };
    if let Some(p) = &a.raw_log {
        c.raw_log = p.clone();
    } else {
        c.raw_log = raw_log_path(&a.output);
    }
    c.target = a.target;
    c.concurrency = a.concurrency;
    c.rpm = a.rpm;
    c.tpm = a.tpm;
    c.seed = a.seed;
    c.temperature = a.temperature;
    c.max_tokens = a.max_tokens;
    c.timeout = secs("timeout", a.timeout)?;
    if let Some(p) = &a.prompt_template {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        c.template = Template::parse(&text, &p.display().to_string())?;
    }
    if let Some(p) = &a.topics_file {
        c.topics = read_lines(p)?;
    }
    if let Some(p) = &a.blacklist_file {
        c.filters.blacklist.extend(read_lines(p)?);
    }
    c.prompt.language = a.language.clone();
    c.prompt.n_items = a.items_per_request;
    c.filters.rouge_threshold = a.rouge_threshold;
    c.filters.max_instruction_chars = a.max_instruction_chars;
    c.filters.max_input_chars = a.max_input_chars;
    c.filters.max_output_chars = a.max_output_chars;
    c.retry.max_retries = a.max_retries;
    c.retry.backoff_base = secs("backoff-base", a.backoff_base)?;
    c.retry.backoff_cap = secs("backoff-cap", a.backoff_cap)?;
    c.max_requests = a.max_requests;
    c.max_stalled_replies = a.max_stalled_replies.max(1);
    Ok(c)
}

fn main() {
    let args = Args::parse();
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", zhllama::util::error_line(&e));
            std::process::exit(2);
        }
    };
    if cfg.api_key.is_none() {
        eprintln!(
            "note: no API key (OPENAI_API_KEY / --api-key-file): sending no Authorization header"
        );
    }
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(
        Some(cfg.target),
        if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} kept  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let last_log = Mutex::new(Instant::now());
    let log_every = Duration::try_from_secs_f64(args.log_every).unwrap_or(Duration::ZERO);
    let last_stats = Mutex::new(Stats::default());
    let progress = |s: &Stats| {
        bar.set_position(s.kept);
        bar.set_message(s.brief());
        if !tty && !log_every.is_zero() {
            let mut t = last_log.lock().unwrap();
            if t.elapsed() >= log_every {
                *t = Instant::now();
                eprintln!("kept {}/{} | {}", s.kept, s.target, s.brief());
            }
        }
        *last_stats.lock().unwrap() = s.clone();
    };
    let result = crawl(&cfg, &progress);
    bar.finish_and_clear();
    match result {
        Ok(stats) => {
            eprintln!("{}", stats.summary());
            eprintln!(
                "records: {}\nraw log: {}",
                cfg.output.display(),
                cfg.raw_log.display()
            );
            if stats.kept < stats.target {
                eprintln!("target not reached (stopped by --max-requests); rerun to continue");
                std::process::exit(3);
            }
        }
        Err(e) => {
            eprintln!("{}", last_stats.lock().unwrap().summary());
            eprintln!("error: {}", zhllama::util::error_line(&e));
            std::process::exit(1);
        }
    }
}
