//! The self-instruct crawler (docs/RECIPE.md §5): asks an OpenAI-compatible chat API for batches of
//! instruction items, parses and filters them, and appends clean Alpaca records to a JSONL file.
//!
//! Durability model (what makes kill -9 safe):
//! - The output is append-only; a record is one `write` of its whole line including `\n`, made
//!   before the record counts as kept. After a crash the file holds whole lines plus, at worst,
//!   one torn tail without `\n`: a record whose write never finished and so was never counted.
//!   Resume cuts that tail off and rebuilds the duplicate index from the whole lines.
//! - Every reply (and every failed attempt) is appended to `<output>.raw.jsonl`. A successful
//!   reply's raw line is written *after* its records and carries `"done": true`; that line is
//!   the commit marker for request number `req`. Resume re-asks every request without one (prompts
//!   depend only on `--seed` and `req`), so records lost with a torn tail or an unprocessed reply
//!   are asked for again; those already written come back as exact duplicates and are dropped.
//! - The API key is never written: it travels only in the `Authorization` header, and every
//!   text that reaches a file or an error message passes through [`Redactor`].

use crate::instruct::crawl_prompt::{PromptSpec, Template, request_rng, sample_vars};
use crate::instruct::crawl_rate::{Limiter, backoff, estimate_tokens, retry_after};
use crate::instruct::reply_parse::{Item, parse_reply};
use crate::instruct::rouge::{DupCheck, NearDupIndex};
use anyhow::{Context, Result, anyhow, bail};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Phrases that mark an item as a model talking about itself; matched case-insensitively with
/// whitespace removed, in any field.
pub const DEFAULT_BLACKLIST: &[&str] = &[
    "as an AI language model",
    "as a language model",
    "as an AI assistant",
    "I am an AI",
    "I'm an AI",
    "作为一个AI语言模型",
    "作为AI语言模型",
    "作为一个人工智能语言模型",
    "作为人工智能语言模型",
    "作为一个语言模型",
    "作为语言模型",
    "作为一个人工智能助手",
    "作为人工智能助手",
    "作为一个AI助手",
    "作为AI助手",
    "我是一个AI",
    "我只是一个AI",
    "我是一个人工智能",
    "我是一个语言模型",
    "OpenAI",
    "ChatGPT",
];

/// An API key: `Debug` prints `[REDACTED]`, so logging a config cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(key: impl Into<String>) -> Self {
        Secret(key.into())
    }

    /// The key itself, for the `Authorization` header and for redaction.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Item filters.
#[derive(Clone, Debug)]
pub struct FilterConfig {
    pub max_instruction_chars: usize,
    pub max_input_chars: usize,
    pub max_output_chars: usize,
    pub blacklist: Vec<String>,
    /// Instructions with ROUGE-L F ≥ this against a kept one are near duplicates (self-instruct: 0.7).
    pub rouge_threshold: f64,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            max_instruction_chars: 500,
            max_input_chars: 1000,
            max_output_chars: 2000,
            blacklist: DEFAULT_BLACKLIST.iter().map(|s| s.to_string()).collect(),
            rouge_threshold: 0.7,
        }
    }
}

/// Retry policy for one request.
#[derive(Clone, Debug)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Longest `Retry-After` honoured as given; longer ones are cut to this.
    pub max_retry_after: Duration,
    /// Stop the crawl after this many requests in a row failed all their retries.
    pub max_failed_in_a_row: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 8,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(600),
            max_failed_in_a_row: 10,
        }
    }
}

/// Everything a crawl needs; the binary fills it from flags, the environment and files.
#[derive(Clone, Debug)]
pub struct CrawlConfig {
    /// API root as OpenAI SDKs take it (`http://host:8000/v1`); `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer …`; never written anywhere.
    pub api_key: Option<Secret>,
    pub output: PathBuf,
    /// Audit log of every raw reply; also holds the resume markers.
    pub raw_log: PathBuf,
    pub target: u64,
    pub concurrency: usize,
    pub rpm: Option<f64>,
    pub tpm: Option<f64>,
    pub seed: u64,
    pub temperature: f64,
    pub max_tokens: Option<u32>,
    /// Whole-request timeout (connect to last body byte).
    pub timeout: Duration,
    pub template: Template,
    pub topics: Vec<String>,
    pub task_types: Vec<String>,
    pub prompt: PromptSpec,
    pub filters: FilterConfig,
    pub retry: RetryConfig,
    /// Stop after this many requests (first attempts) in this run.
    pub max_requests: Option<u64>,
    /// Stop after this many successful replies in a row added no record (the model repeats itself).
    pub max_stalled_replies: u32,
}

impl CrawlConfig {
    /// Defaults for everything but the endpoint and the files.
    pub fn new(base_url: &str, model: &str, output: &Path) -> Self {
        CrawlConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            output: output.into(),
            raw_log: raw_log_path(output),
            target: 1000,
            concurrency: 4,
            rpm: None,
            tpm: None,
            seed: 0,
            temperature: 1.0,
            max_tokens: None,
            timeout: Duration::from_secs(300),
            template: Template::default_template(),
            topics: crate::instruct::crawl_prompt::TOPICS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            task_types: crate::instruct::crawl_prompt::TASK_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            prompt: PromptSpec::default(),
            filters: FilterConfig::default(),
            retry: RetryConfig::default(),
            max_requests: None,
            max_stalled_replies: 100,
        }
    }
}

/// `<output>.raw.jsonl`.
pub fn raw_log_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".raw.jsonl");
    PathBuf::from(s)
}

/// Why a parsed item was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    EmptyField,
    TooLong,
    Blacklisted,
    ExactDup,
    NearDup,
}

impl Reject {
    pub fn name(self) -> &'static str {
        match self {
            Reject::EmptyField => "empty_field",
            Reject::TooLong => "too_long",
            Reject::Blacklisted => "blacklisted",
            Reject::ExactDup => "exact_dup",
            Reject::NearDup => "near_dup",
        }
    }
}

fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Field checks that need no history: empty, too long, blacklisted.
pub fn check_fields(
    item: &Item,
    f: &FilterConfig,
    blacklist_squashed: &[String],
) -> Result<(), Reject> {
    if item.instruction.trim().is_empty() || item.output.trim().is_empty() {
        return Err(Reject::EmptyField);
    }
    if item.instruction.chars().count() > f.max_instruction_chars
        || item.input.chars().count() > f.max_input_chars
        || item.output.chars().count() > f.max_output_chars
    {
        return Err(Reject::TooLong);
    }
    for field in [&item.instruction, &item.input, &item.output] {
        let s = squash(field);
        if blacklist_squashed.iter().any(|b| s.contains(b.as_str())) {
            return Err(Reject::Blacklisted);
        }
    }
    Ok(())
}

/// Replaces the API key in any text bound for a file or a message.
#[derive(Clone, Debug)]
pub struct Redactor {
    key: Option<String>,
}

impl Redactor {
    pub fn new(key: Option<&str>) -> Self {
        Redactor {
            key: key.filter(|k| !k.is_empty()).map(str::to_string),
        }
    }

    pub fn apply(&self, s: &str) -> String {
        match &self.key {
            Some(k) if s.contains(k.as_str()) => s.replace(k.as_str(), "[REDACTED]"),
            _ => s.to_string(),
        }
    }
}

/// Counters shown by the progress bar and the final summary.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub target: u64,
    /// Records in the output (including those found at start).
    pub kept: u64,
    pub kept_at_start: u64,
    /// Bytes of a torn last line cut from the output / the raw log at start.
    pub torn_output_bytes: u64,
    pub torn_raw_bytes: u64,
    /// HTTP attempts, including retries.
    pub attempts: u64,
    /// Requests (first attempts) this run.
    pub requests: u64,
    pub replies: u64,
    pub retries: u64,
    pub failed_requests: u64,
    pub http_429: u64,
    pub http_5xx: u64,
    pub timeouts: u64,
    pub conn_errors: u64,
    pub bad_body: u64,
    /// Replies that stopped on the token limit (`finish_reason = "length"`).
    pub cut_replies: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Replies whose tokens were estimated because the server sent no `usage`.
    pub estimated_usage: u64,
    pub items_parsed: u64,
    pub invalid: BTreeMap<&'static str, u64>,
    pub rejected: BTreeMap<&'static str, u64>,
    pub elapsed: Duration,
}

impl Stats {
    /// Records kept per minute in this run.
    pub fn rate_per_min(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            (self.kept - self.kept_at_start) as f64 * 60.0 / s
        } else {
            0.0
        }
    }

    fn counts(m: &BTreeMap<&'static str, u64>) -> String {
        if m.is_empty() {
            return "0".into();
        }
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One line for a progress bar.
    pub fn brief(&self) -> String {
        format!(
            "rejected [{}] invalid [{}] | req {} (retries {}, failed {}) | tok {}+{} | {:.1}/min",
            Self::counts(&self.rejected),
            Self::counts(&self.invalid),
            self.requests,
            self.retries,
            self.failed_requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.rate_per_min()
        )
    }

    /// The final report.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let new = self.kept - self.kept_at_start;
        s += &format!(
            "kept {} / target {} ({} new this run, {} found at start)\n",
            self.kept, self.target, new, self.kept_at_start
        );
        if self.torn_output_bytes + self.torn_raw_bytes > 0 {
            s += &format!(
                "cut a torn last line at start: output {} bytes, raw log {} bytes\n",
                self.torn_output_bytes, self.torn_raw_bytes
            );
        }
        s += &format!(
            "requests {} (attempts {}, retries {}, failed {}), replies {}, cut by token limit {}\n",
            self.requests,
            self.attempts,
            self.retries,
            self.failed_requests,
            self.replies,
            self.cut_replies
        );
        s += &format!(
            "errors: 429 {}, 5xx {}, timeouts {}, connection {}, bad body {}\n",
            self.http_429, self.http_5xx, self.timeouts, self.conn_errors, self.bad_body
        );
        s += &format!(
            "items parsed {}, invalid [{}], rejected [{}]\n",
            self.items_parsed,
            Self::counts(&self.invalid),
            Self::counts(&self.rejected)
        );
        s += &format!(
            "tokens: prompt {}, completion {} ({} replies estimated)\n",
            self.prompt_tokens, self.completion_tokens, self.estimated_usage
        );
        s += &format!(
            "time {:.1} s, {:.1} records/min",
            self.elapsed.as_secs_f64(),
            self.rate_per_min()
        );
        s
    }
}

/// Open an append-only JSONL file (creating it), take an exclusive lock, cut a torn last line,
/// and hand every whole line to `each(line_no, bytes)`. Returns the file and the bytes cut.
fn open_jsonl(
    path: &Path,
    mut each: impl FnMut(usize, &[u8]) -> Result<()>,
) -> Result<(File, u64)> {
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!(
                "{} is being written by another crawl-prompts process",
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    let mut whole = 0u64;
    let mut torn = 0u64;
    {
        f.seek(SeekFrom::Start(0))?;
        let mut r = BufReader::with_capacity(1 << 20, &f);
        let mut line = Vec::new();
        let mut no = 0;
        loop {
            line.clear();
            let n = r
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                torn = n as u64;
                break;
            }
            no += 1;
            whole += n as u64;
            if line.iter().any(|b| !b.is_ascii_whitespace()) {
                each(no, &line[..n - 1])?;
            }
        }
    }
    if torn > 0 {
        f.set_len(whole)
            .with_context(|| format!("cannot truncate torn last line of {}", path.display()))?;
    }
    Ok((f, torn))
}

/// What one HTTP attempt came to.
enum Attempt {
    Reply {
        content: String,
        usage: Option<(u64, u64)>,
        cut: bool,
    },
    Retry {
        kind: ErrKind,
        status: Option<u16>,
        wait: Option<Duration>,
        note: String,
    },
    Fatal(String),
}

#[derive(Clone, Copy, Debug)]
enum ErrKind {
    Http429,
    Http5xx,
    Timeout,
    Connection,
    BadBody,
}

impl ErrKind {
    fn name(self) -> &'static str {
        match self {
            ErrKind::Http429 => "http_429",
            ErrKind::Http5xx => "http_5xx",
            ErrKind::Timeout => "timeout",
            ErrKind::Connection => "connection",
            ErrKind::BadBody => "bad_body",
        }
    }
}

/// First `n` characters of `s` (for error notes and logs of error bodies).
fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn call(agent: &ureq::Agent, url: &str, key: Option<&str>, body: &str) -> Attempt {
    let mut req = agent.post(url).header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = match req.send(body) {
        Ok(r) => r,
        Err(e) => return classify(e),
    };
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let wait = retry_after(
        header("retry-after-ms").as_deref(),
        header("retry-after").as_deref(),
    );
    let text = match resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
    {
        Ok(t) => t,
        Err(e) => return classify(e),
    };
    match status {
        200..=299 => {}
        429 => {
            return Attempt::Retry {
                kind: ErrKind::Http429,
                status: Some(status),
                wait,
                note: clip(&text, 500),
            };
        }
        408 | 500..=599 => {
            return Attempt::Retry {
                kind: ErrKind::Http5xx,
                status: Some(status),
                wait,
                note: clip(&text, 500),
            };
        }
        _ => return Attempt::Fatal(format!("HTTP {status} from {url}: {}", clip(&text, 500))),
    }
    let bad = |why: &str| Attempt::Retry {
        kind: ErrKind::BadBody,
        status: Some(status),
        wait: None,
        note: format!("{why}: {}", clip(&text, 500)),
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return bad("response body is not JSON");
    };
    let choice = &v["choices"][0];
    let Some(content) = choice["message"]["content"].as_str() else {
        return bad("no choices[0].message.content");
    };
    let usage = match (
        v["usage"]["prompt_tokens"].as_u64(),
        v["usage"]["completion_tokens"].as_u64(),
    ) {
        (Some(p), Some(c)) => Some((p, c)),
        _ => None,
    };
    Attempt::Reply {
        content: content.to_string(),
        usage,
        cut: choice["finish_reason"].as_str() == Some("length"),
    }
}

fn classify(e: ureq::Error) -> Attempt {
    let (kind, fatal) = match &e {
        ureq::Error::Timeout(_) => (ErrKind::Timeout, false),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            (ErrKind::Timeout, false)
        }
        ureq::Error::Io(_)
        | ureq::Error::Protocol(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound => (ErrKind::Connection, false),
        ureq::Error::BodyExceedsLimit(_) => (ErrKind::BadBody, false),
        _ => (ErrKind::Connection, true),
    };
    if fatal {
        Attempt::Fatal(format!("request failed: {e}"))
    } else {
        Attempt::Retry {
            kind,
            status: None,
            wait: None,
            note: e.to_string(),
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Mutable crawl state, behind one lock (held for parsing, filtering and appending — short next
/// to a request).
struct State {
    stats: Stats,
    index: NearDupIndex,
    out: File,
    raw: File,
    /// Requests below `next_req` are claimed; `done` holds completed ones above it (from the raw log).
    next_req: u64,
    done: BTreeSet<u64>,
    failed_in_a_row: u32,
    stalled: u32,
    error: Option<anyhow::Error>,
    /// Running mean of completion tokens, for the tpm estimate.
    completion_mean: f64,
}

impl State {
    fn claim(&mut self) -> u64 {
        while self.done.remove(&self.next_req) {
            self.next_req += 1;
        }
        self.next_req += 1;
        self.next_req - 1
    }

    fn raw_line(&mut self, v: &Value, path: &Path) -> Result<()> {
        let mut line = serde_json::to_string(v)?;
        line.push('\n');
        self.raw
            .write_all(line.as_bytes())
            .with_context(|| format!("cannot append to {}", path.display()))
    }
}

struct Shared<'a> {
    cfg: &'a CrawlConfig,
    state: Mutex<State>,
    stop: AtomicBool,
    limiter: Limiter,
    redact: Redactor,
    blacklist: Vec<String>,
    url: String,
    start: Instant,
    progress: &'a (dyn Fn(&Stats) + Sync),
}

impl Shared<'_> {
    fn fail(&self, st: &mut State, e: anyhow::Error) {
        if st.error.is_none() {
            st.error = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Sleep `d`, waking early if the crawl is stopping. Returns false when stopping.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

/// Run the crawl until `cfg.target` records are in `cfg.output` (resuming what is there), or it
/// has to stop. `progress` is called with the counters after every event (under the state lock:
/// keep it quick). Errors name the file or the HTTP status that stopped the run.
pub fn crawl(cfg: &CrawlConfig, progress: &(dyn Fn(&Stats) + Sync)) -> Result<Stats> {
    if cfg.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if !(cfg.filters.rouge_threshold > 0.0 && cfg.filters.rouge_threshold <= 1.0) {
        bail!(
            "ROUGE-L threshold must be in (0, 1], got {}",
            cfg.filters.rouge_threshold
        );
    }
    let start = Instant::now();
    let redact = Redactor::new(cfg.api_key.as_ref().map(Secret::expose));

    // Rebuild the duplicate index from the records already kept.
    let mut index = NearDupIndex::new(cfg.filters.rouge_threshold);
    let mut kept = 0u64;
    let out_path = &cfg.output;
    let (out, torn_output_bytes) = open_jsonl(out_path, |no, line| {
        let item: Item = serde_json::from_slice(line).map_err(|e| {
            anyhow!(
                "{}:{no}: not an instruction record ({e}); fix or move the file before resuming",
                out_path.display()
            )
        })?;
        let t = index.encode(&item.instruction);
        index.insert(t);
        kept += 1;
        Ok(())
    })?;
    // Completed requests, from the raw log's commit markers.
    let mut done = BTreeSet::new();
    let (raw, torn_raw_bytes) = open_jsonl(&cfg.raw_log, |_, line| {
        if let Ok(v) = serde_json::from_slice::<Value>(line)
            && v["done"].as_bool() == Some(true)
            && let Some(r) = v["req"].as_u64()
        {
            done.insert(r);
        }
        Ok(())
    })?;

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(cfg.timeout))
        .http_status_as_error(false)
        .user_agent("zhllama-crawl-prompts")
        .build()
        .into();
    let stats = Stats {
        target: cfg.target,
        kept,
        kept_at_start: kept,
        torn_output_bytes,
        torn_raw_bytes,
        ..Stats::default()
    };
    let shared = Shared {
        cfg,
        state: Mutex::new(State {
            stats,
            index,
            out,
            raw,
            next_req: 0,
            done,
            failed_in_a_row: 0,
            stalled: 0,
            error: None,
            completion_mean: cfg.max_tokens.map_or(4000.0, f64::from),
        }),
        stop: AtomicBool::new(false),
        limiter: Limiter::new(cfg.rpm, cfg.tpm),
        redact,
        blacklist: cfg.filters.blacklist.iter().map(|b| squash(b)).collect(),
        url: format!("{}/chat/completions", cfg.base_url.trim_end_matches('/')),
        start,
        progress,
    };
    {
        let st = shared.state.lock().unwrap();
        progress(&st.stats);
    }
    if kept < cfg.target {
        std::thread::scope(|s| {
            for w in 0..cfg.concurrency {
                let shared = &shared;
                let agent = &agent;
                s.spawn(move || worker(shared, agent, w as u64));
            }
        });
    }
    let mut st = shared.state.into_inner().unwrap();
    st.stats.elapsed = start.elapsed();
    st.out
        .sync_all()
        .with_context(|| format!("cannot sync {}", cfg.output.display()))?;
    st.raw
        .sync_all()
        .with_context(|| format!("cannot sync {}", cfg.raw_log.display()))?;
    progress(&st.stats);
    match st.error {
        Some(e) => Err(e),
        None => Ok(st.stats),
    }
}

fn worker(sh: &Shared, agent: &ureq::Agent, id: u64) {
    let cfg = sh.cfg;
    let mut jitter = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5EED ^ (id << 32));
    let key = cfg.api_key.as_ref().map(Secret::expose);
    loop {
        let req = {
            let mut st = sh.state.lock().unwrap();
            if sh.stop.load(Ordering::SeqCst) || st.stats.kept >= cfg.target {
                sh.stop.store(true, Ordering::SeqCst);
                return;
            }
            if cfg.max_requests.is_some_and(|m| st.stats.requests >= m) {
                // No new request, but no `stop` either: a request another worker has already
                // claimed (and counted) must still be sent, not abandoned in its rate-limit wait.
                return;
            }
            st.stats.requests += 1;
            st.claim()
        };
        let vars = sample_vars(
            &mut request_rng(cfg.seed, req),
            &cfg.topics,
            &cfg.task_types,
            &cfg.prompt,
        );
        let prompt = cfg.template.render(&vars);
        let mut body = json!({
            "model": cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": cfg.temperature,
        });
        if let Some(m) = cfg.max_tokens {
            body["max_tokens"] = json!(m);
        }
        let body = body.to_string();
        // Chat framing adds a few tokens to the prompt text itself.
        let prompt_est = estimate_tokens(&prompt) + 8;

        let mut attempt = 0u32;
        let reply = loop {
            let est = prompt_est + sh.state.lock().unwrap().completion_mean as u64;
            if !sh.sleep(sh.limiter.reserve(est)) {
                break None;
            }
            sh.state.lock().unwrap().stats.attempts += 1;
            match call(agent, &sh.url, key, &body) {
                Attempt::Reply {
                    content,
                    usage,
                    cut,
                } => {
                    break Some(Reply {
                        content,
                        usage,
                        cut,
                        attempt,
                        est,
                    });
                }
                Attempt::Fatal(msg) => {
                    let mut st = sh.state.lock().unwrap();
                    let e = anyhow!("{}", sh.redact.apply(&msg));
                    sh.fail(&mut st, e);
                    break None;
                }
                Attempt::Retry {
                    kind,
                    status,
                    wait,
                    note,
                } => {
                    // A refused request used no tokens; anything else may have been billed.
                    if matches!(kind, ErrKind::Http429) {
                        sh.limiter.settle(-(est as i64));
                    }
                    let give_up = attempt >= cfg.retry.max_retries;
                    let wait = match wait {
                        Some(w) => {
                            let w = w.min(cfg.retry.max_retry_after);
                            // A server-wide pause: hold every worker, not just this one;
                            // then up to 10% (≤ 1 s) more, so they do not all return at once.
                            sh.limiter.pause_for(w);
                            let spread = (w.as_secs_f64() / 10.0).min(1.0);
                            w + Duration::from_secs_f64(jitter.random_range(0.0..=spread))
                        }
                        None => backoff(
                            attempt,
                            cfg.retry.backoff_base,
                            cfg.retry.backoff_cap,
                            &mut jitter,
                        ),
                    };
                    {
                        let mut st = sh.state.lock().unwrap();
                        match kind {
                            ErrKind::Http429 => st.stats.http_429 += 1,
                            ErrKind::Http5xx => st.stats.http_5xx += 1,
                            ErrKind::Timeout => st.stats.timeouts += 1,
                            ErrKind::Connection => st.stats.conn_errors += 1,
                            ErrKind::BadBody => st.stats.bad_body += 1,
                        }
                        let line = json!({
                            "req": req, "attempt": attempt, "time": unix_now(),
                            "status": status, "error": kind.name(),
                            "body": sh.redact.apply(&note),
                        });
                        if let Err(e) = st.raw_line(&line, &cfg.raw_log) {
                            sh.fail(&mut st, e);
                            break None;
                        }
                        if give_up {
                            st.stats.failed_requests += 1;
                            st.failed_in_a_row += 1;
                            if st.failed_in_a_row >= cfg.retry.max_failed_in_a_row {
                                let e = anyhow!(
                                    "{} requests in a row failed after {} retries each; last: {} {}",
                                    st.failed_in_a_row,
                                    cfg.retry.max_retries,
                                    kind.name(),
                                    clip(&sh.redact.apply(&note), 200)
                                );
                                sh.fail(&mut st, e);
                            }
                        } else {
                            st.stats.retries += 1;
                        }
                        (sh.progress)(&st.stats);
                    }
                    if give_up || !sh.sleep(wait) {
                        break None;
                    }
                    attempt += 1;
                }
            }
        };
        let Some(reply) = reply else {
            continue;
        };
        let mut st = sh.state.lock().unwrap();
        if let Err(e) = absorb(sh, &mut st, req, &prompt, &reply) {
            sh.fail(&mut st, e);
        }
        st.stats.elapsed = sh.start.elapsed();
        (sh.progress)(&st.stats);
    }
}

/// A request's successful reply: its text, the usage the API reported, whether it was cut at the
/// token limit, the attempt that got it, and the tokens reserved for it.
struct Reply {
    content: String,
    usage: Option<(u64, u64)>,
    cut: bool,
    attempt: u32,
    est: u64,
}

/// Parse, filter and append the items of request `req`'s reply to `prompt`, then write its raw
/// line (the commit marker).
fn absorb(sh: &Shared, st: &mut State, req: u64, prompt: &str, reply: &Reply) -> Result<()> {
    let Reply {
        ref content,
        usage,
        cut,
        attempt,
        est,
    } = *reply;
    let cfg = sh.cfg;
    st.failed_in_a_row = 0;
    st.stats.replies += 1;
    st.stats.cut_replies += cut as u64;
    let (p, c) = usage.unwrap_or_else(|| {
        st.stats.estimated_usage += 1;
        (estimate_tokens(prompt) + 8, estimate_tokens(content))
    });
    st.stats.prompt_tokens += p;
    st.stats.completion_tokens += c;
    sh.limiter.settle((p + c) as i64 - est as i64);
    st.completion_mean = 0.8 * st.completion_mean + 0.2 * c as f64;

    let parsed = parse_reply(content);
    for r in &parsed.invalid {
        *st.stats.invalid.entry(r.name()).or_insert(0) += 1;
    }
    let mut new = 0u64;
    let mut complete = true;
    for item in parsed.items {
        if st.stats.kept >= cfg.target {
            // Left for a later run with a larger target: this request stays uncommitted.
            complete = false;
            break;
        }
        st.stats.items_parsed += 1;
        let verdict = check_fields(&item, &cfg.filters, &sh.blacklist).and_then(|()| {
            let t = st.index.encode(&item.instruction);
            if t.is_empty() {
                return Err(Reject::EmptyField);
            }
            match st.index.check(&t) {
                DupCheck::Unique => Ok(t),
                DupCheck::Exact => Err(Reject::ExactDup),
                DupCheck::Near => Err(Reject::NearDup),
            }
        });
        match verdict {
            Ok(tokens) => {
                let item = Item {
                    instruction: sh.redact.apply(&item.instruction),
                    input: sh.redact.apply(&item.input),
                    output: sh.redact.apply(&item.output),
                };
                let mut line = serde_json::to_string(&item)?;
                line.push('\n');
                // One write per record: after a kill the file ends in whole lines or one torn tail.
                st.out
                    .write_all(line.as_bytes())
                    .with_context(|| format!("cannot append to {}", cfg.output.display()))?;
                st.index.insert(tokens);
                st.stats.kept += 1;
                new += 1;
            }
            Err(r) => *st.stats.rejected.entry(r.name()).or_insert(0) += 1,
        }
    }
    let line = json!({
        "req": req, "attempt": attempt, "time": unix_now(), "status": 200,
        "done": complete, "kept": new, "cut": cut,
        "usage": usage.map(|(p, c)| json!({"prompt_tokens": p, "completion_tokens": c})),
        "content": sh.redact.apply(content),
    });
    st.raw_line(&line, &cfg.raw_log)?;
    if new == 0 && complete {
        st.stalled += 1;
        if st.stalled >= cfg.max_stalled_replies {
            bail!(
                "the last {} replies added no record (all invalid or duplicates); stopping — \
                 check the raw log {}",
                st.stalled,
                cfg.raw_log.display()
            );
        }
    } else {
        st.stalled = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: &str, inp: &str, o: &str) -> Item {
        Item {
            instruction: i.into(),
            input: inp.into(),
            output: o.into(),
        }
    }

    #[test]
    fn field_checks() {
        let f = FilterConfig {
            max_instruction_chars: 5,
            max_input_chars: 5,
            max_output_chars: 5,
            ..FilterConfig::default()
        };
        let bl: Vec<String> = f.blacklist.iter().map(|b| squash(b)).collect();
        let check = |it: Item, want: Result<(), Reject>| {
            assert_eq!(check_fields(&it, &f, &bl), want, "{it:?}")
        };
        check(item("写诗", "", "好"), Ok(()));
        check(item("  ", "", "好"), Err(Reject::EmptyField));
        check(item("写诗", "x", " "), Err(Reject::EmptyField));
        check(item("写一首长诗吧", "", "好"), Err(Reject::TooLong));
        check(item("写诗", "", "五个字正好"), Ok(()));
        check(item("写诗", "六个字太长了", "好"), Err(Reject::TooLong));
        let long = FilterConfig::default();
        let check2 = |it: Item, want| assert_eq!(check_fields(&it, &long, &bl), want, "{it:?}");
        // "作为AI" alone is not listed: "作为AI工程师，……" is a fine instruction.
        check2(
            item("作为AI工程师，解释梯度下降", "", "梯度下降是……"),
            Ok(()),
        );
        check2(
            item("介绍你自己", "", "As an AI  language model, I ..."),
            Err(Reject::Blacklisted),
        );
        check2(
            item("介绍你自己", "", "作为一个 AI 语言模型，我无法……"),
            Err(Reject::Blacklisted),
        );
        check2(
            item("ChatGPT 是什么", "", "一个聊天机器人"),
            Err(Reject::Blacklisted),
        );
    }

    #[test]
    fn config_debug_hides_the_key() {
        let mut c = CrawlConfig::new("http://127.0.0.1:1/v1", "m", Path::new("o.jsonl"));
        c.api_key = Some(Secret::new("sk-very-secret"));
        let d = format!("{c:?}");
        assert!(
            !d.contains("sk-very-secret") && d.contains("[REDACTED]"),
            "{d}"
        );
    }

    #[test]
    fn redactor() {
        let r = Redactor::new(Some("sk-abc"));
        assert_eq!(
            r.apply("key sk-abc and sk-abc"),
            "key [REDACTED] and [REDACTED]"
        );
        assert_eq!(Redactor::new(Some("")).apply("x"), "x");
        assert_eq!(Redactor::new(None).apply("sk-abc"), "sk-abc");
    }

    #[test]
    fn torn_tail_is_cut_and_whole_lines_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, b"{\"a\":1}\n\n{\"a\":2}\n{\"a\":").unwrap();
        let mut seen = Vec::new();
        let (f, torn) = open_jsonl(&p, |no, l| {
            seen.push((no, String::from_utf8(l.to_vec()).unwrap()));
            Ok(())
        })
        .unwrap();
        assert_eq!(torn, 5);
        assert_eq!(seen, vec![(1, "{\"a\":1}".into()), (3, "{\"a\":2}".into())]);
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\":1}\n\n{\"a\":2}\n");
        // A second opener is refused while the first holds the lock.
        let (_held, _) = open_jsonl(&p, |_, _| Ok(())).unwrap();
        let e = open_jsonl(&p, |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("another crawl-prompts"), "{e}");
    }

    #[test]
    fn claim_skips_committed_requests() {
        let dir = tempfile::tempdir().unwrap();
        let f = || File::create(dir.path().join("x")).unwrap();
        let mut st = State {
            stats: Stats::default(),
            index: NearDupIndex::new(0.7),
            out: f(),
            raw: f(),
            next_req: 0,
            done: [0, 1, 3, 6].into_iter().collect(),
            failed_in_a_row: 0,
            stalled: 0,
            error: None,
            completion_mean: 0.0,
        };
        let got: Vec<u64> = (0..4).map(|_| st.claim()).collect();
        assert_eq!(got, vec![2, 4, 5, 7]);
    }
}
