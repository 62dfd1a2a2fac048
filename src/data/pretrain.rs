//! Pre-training data (docs/RECIPE.md §2): every line of every text file tokenized with BOS and no EOS,
//! grouped per batch of 1000 lines exactly as the original `group_texts` under
//! `datasets.map(batched=True, batch_size=1000)`, written as fixed-length block shards plus a
//! seeded validation split.
//!
//! Faithful details of the original (`run_clm_pt_with_peft.py`):
//! - each file is its own dataset, so batches never span files; a file's last batch is short;
//! - lines are what `load_dataset("text")` yields: universal newlines (`\n`, `\r\n`, `\r`), the
//!   terminator stripped, empty lines kept (they tokenize to just BOS), no extra line after a
//!   final newline;
//! - per batch: concatenate, keep `floor(total / block_size) * block_size` ids, split into blocks.
//!
//! One deliberate difference: when a batch holds fewer than `block_size` ids, `group_texts`
//! keeps them as one *short* block. Shards hold fixed-length blocks, so such a batch is dropped
//! and counted (`short_batches_dropped`, `short_batch_tokens` in the manifest).
//!
//! Streaming: lines are read sequentially and tokenized in parallel windows of a few batches, so
//! memory is bounded by the window, not the corpus. Blocks are written in corpus order; the
//! validation split then takes `ceil(fraction * blocks)` blocks chosen by a seeded RNG, as HF's
//! `train_test_split(test_size=fraction)` sizes it.

use super::shard::{BlockShard, ShardKind, ShardWriter, token_bytes_for};
use super::{Encoder, HfText, write_dir_atomic};
use anyhow::{Context, Result, bail, ensure};
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Lines per `group_texts` batch (the `datasets.map` default the original used).
pub const GROUP_BATCH_LINES: usize = 1000;

/// File names inside a pre-training output directory.
pub const TRAIN_FILE: &str = "train.tok";
pub const VALIDATION_FILE: &str = "validation.tok";
pub const MANIFEST_FILE: &str = "manifest.json";

/// How to build pre-training shards.
#[derive(Clone, Debug)]
pub struct PretrainConfig {
    pub block_size: usize,
    pub validation_fraction: f64,
    pub seed: u64,
    /// Skip (and count) undecodable lines and empty files instead of failing.
    pub skip_bad: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Recorded in the manifest (sha256 of the tokenizer file).
    pub tokenizer_sha256: String,
    /// Batches tokenized per parallel window (memory bound: window × 1000 lines).
    pub window_batches: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            block_size: 512,
            validation_fraction: 0.001,
            seed: 42,
            skip_bad: false,
            progress: false,
            tokenizer_sha256: String::new(),
            window_batches: 16,
        }
    }
}

/// Per input file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FileStats {
    pub path: String,
    pub bytes: u64,
    pub lines: u64,
    /// Lines skipped because they were not UTF-8 (only with `skip_bad`).
    pub bad_lines: u64,
    /// Ids produced by tokenization (BOS included).
    pub tokenized_tokens: u64,
    /// Ids kept in blocks.
    pub block_tokens: u64,
    pub blocks: u64,
}

/// `manifest.json` of a pre-training directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PretrainManifest {
    pub format: String,
    pub version: u32,
    /// Tokens in all blocks (train + validation).
    pub tokens: u64,
    pub train_blocks: u64,
    pub validation_blocks: u64,
    pub block_size: usize,
    pub vocab_size: usize,
    /// "u16" or "u32".
    pub token_dtype: String,
    pub validation_fraction: f64,
    pub seed: u64,
    pub tokenizer_sha256: String,
    pub lines: u64,
    /// Ids produced by tokenization, before grouping.
    pub tokenized_tokens: u64,
    /// Ids dropped as the per-batch remainder (`group_texts`' drop).
    pub remainder_tokens_dropped: u64,
    /// Batches with fewer than `block_size` ids (kept as a short block by the original).
    pub short_batches_dropped: u64,
    pub short_batch_tokens: u64,
    /// Files skipped as empty (only with `skip_bad`).
    pub empty_files_skipped: u64,
    pub bad_lines_skipped: u64,
    pub files: Vec<FileStats>,
    /// Shard file name → `crc32:<hex>`, the digest of its payload checksums (shard version 2;
    /// absent for older data). It ties this manifest, whose sha256 a run records, to the tokens.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub payload_digests: std::collections::BTreeMap<String, String>,
}

/// The text files of `inputs`: a directory contributes its `*.txt` files (sorted by name, not
/// recursive), a file is taken as is.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        if meta.is_dir() {
            let mut txt: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "txt"))
                .collect();
            txt.sort();
            ensure!(!txt.is_empty(), "{}: no *.txt files", p.display());
            files.extend(txt);
        } else {
            files.push(p.clone());
        }
    }
    ensure!(!files.is_empty(), "no input files");
    Ok(files)
}

/// Reads lines the way Python's text mode + `load_dataset("text")` splits them.
pub struct LineReader<R: Read> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    /// Lines split off a physical chunk by lone `\r`, waiting to be returned (reversed).
    pending: Vec<Vec<u8>>,
    /// 1-based number of the last line returned.
    pub line_no: u64,
}

impl<R: Read> LineReader<R> {
    pub fn new(r: R) -> Self {
        LineReader {
            inner: BufReader::with_capacity(1 << 20, r),
            buf: Vec::new(),
            pending: Vec::new(),
            line_no: 0,
        }
    }

    /// The next line's raw bytes (terminator stripped), or None at the end.
    pub fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(l) = self.pending.pop() {
            self.line_no += 1;
            return Ok(Some(l));
        }
        self.buf.clear();
        let n = self.inner.read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if self.buf.contains(&b'\r') {
            let mut parts: Vec<Vec<u8>> = self
                .buf
                .split(|&b| b == b'\r')
                .map(|s| s.to_vec())
                .collect();
            parts.reverse();
            let first = parts.pop().unwrap();
            self.pending = parts;
            self.line_no += 1;
            return Ok(Some(first));
        }
        self.line_no += 1;
        Ok(Some(std::mem::take(&mut self.buf)))
    }
}

/// `group_texts` on one batch: `blocks` receives every full block; returns the ids kept.
/// A batch shorter than one block yields nothing here (see the module note).
pub fn group_batch(batch: &[Vec<u32>], block_size: usize, blocks: &mut Vec<Vec<u32>>) -> usize {
    let total: usize = batch.iter().map(|v| v.len()).sum();
    let keep = (total / block_size) * block_size;
    let mut cur = Vec::with_capacity(block_size);
    let mut kept = 0;
    for ids in batch {
        for &t in ids {
            if kept == keep {
                return kept;
            }
            cur.push(t);
            kept += 1;
            if cur.len() == block_size {
                blocks.push(std::mem::replace(&mut cur, Vec::with_capacity(block_size)));
            }
        }
    }
    kept
}

/// Build `output` (which must not exist) from the text files `files`.
pub fn build_pretrain<E: Encoder + ?Sized>(
    enc: &E,
    files: &[PathBuf],
    output: &Path,
    cfg: &PretrainConfig,
) -> Result<PretrainManifest> {
    ensure!(cfg.block_size > 0, "block size must be positive");
    ensure!(
        (0.0..1.0).contains(&cfg.validation_fraction),
        "validation fraction {} not in [0, 1)",
        cfg.validation_fraction
    );
    let mut manifest = None;
    write_dir_atomic(output, |tmp| {
        manifest = Some(build_into(enc, files, tmp, cfg)?);
        Ok(())
    })?;
    Ok(manifest.unwrap())
}

fn build_into<E: Encoder + ?Sized>(
    enc: &E,
    files: &[PathBuf],
    dir: &Path,
    cfg: &PretrainConfig,
) -> Result<PretrainManifest> {
    let hf = HfText::new(enc);
    let vocab_size = hf.vocab_size();
    let total_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::new(total_bytes);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {msg} [{elapsed_precise}, eta {eta}]",
            )
            .unwrap(),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = std::time::Instant::now();

    let all_path = dir.join("all.tok");
    let mut all = ShardWriter::create(&all_path, ShardKind::Blocks, vocab_size, cfg.block_size)?;
    let mut m = PretrainManifest {
        format: "zhllama-pretrain".into(),
        version: super::shard::VERSION,
        tokens: 0,
        train_blocks: 0,
        validation_blocks: 0,
        block_size: cfg.block_size,
        vocab_size,
        token_dtype: if token_bytes_for(vocab_size) == 2 {
            "u16"
        } else {
            "u32"
        }
        .into(),
        validation_fraction: cfg.validation_fraction,
        seed: cfg.seed,
        tokenizer_sha256: cfg.tokenizer_sha256.clone(),
        lines: 0,
        tokenized_tokens: 0,
        remainder_tokens_dropped: 0,
        short_batches_dropped: 0,
        short_batch_tokens: 0,
        empty_files_skipped: 0,
        bad_lines_skipped: 0,
        files: Vec::new(),
        payload_digests: Default::default(),
    };
    let window_lines = cfg.window_batches.max(1) * GROUP_BATCH_LINES;
    let mut bytes_done = 0u64;

    for path in files {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut st = FileStats {
            path: path.display().to_string(),
            bytes: file.metadata().map(|m| m.len()).unwrap_or(0),
            ..Default::default()
        };
        if st.bytes == 0 {
            if cfg.skip_bad {
                m.empty_files_skipped += 1;
                m.files.push(st);
                continue;
            }
            bail!("{}: empty file", path.display());
        }
        let mut reader = LineReader::new(file);
        let mut eof = false;
        while !eof {
            // One window: up to `window_lines` lines (whole batches except at the file's end).
            let mut lines: Vec<String> = Vec::with_capacity(window_lines);
            let mut raw_bytes = 0u64;
            while lines.len() < window_lines {
                let Some(raw) = reader
                    .next_line()
                    .with_context(|| format!("cannot read {}", path.display()))?
                else {
                    eof = true;
                    break;
                };
                raw_bytes += raw.len() as u64 + 1;
                match String::from_utf8(raw) {
                    Ok(s) => lines.push(s),
                    Err(e) => {
                        if cfg.skip_bad {
                            st.bad_lines += 1;
                            continue;
                        }
                        bail!(
                            "{}:{}: not valid UTF-8 (byte {} of the line)",
                            path.display(),
                            reader.line_no,
                            e.utf8_error().valid_up_to()
                        );
                    }
                }
            }
            let ids: Vec<Vec<u32>> = lines.par_iter().map(|l| hf.encode_with_bos(l)).collect();
            st.lines += ids.len() as u64;
            let mut blocks = Vec::new();
            let mut window_tokens = 0u64;
            for batch in ids.chunks(GROUP_BATCH_LINES) {
                let total: usize = batch.iter().map(|v| v.len()).sum();
                window_tokens += total as u64;
                if total > 0 && total < cfg.block_size {
                    m.short_batches_dropped += 1;
                    m.short_batch_tokens += total as u64;
                    continue;
                }
                let kept = group_batch(batch, cfg.block_size, &mut blocks);
                m.remainder_tokens_dropped += (total - kept) as u64;
                st.block_tokens += kept as u64;
            }
            for b in &blocks {
                all.push_block(b)
                    .with_context(|| format!("while grouping {}", path.display()))?;
            }
            st.blocks += blocks.len() as u64;
            st.tokenized_tokens += window_tokens;
            m.tokenized_tokens += window_tokens;
            bytes_done += raw_bytes;
            bar.set_position(bytes_done.min(total_bytes));
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{:.2} M tokens, {:.0} tokens/s",
                m.tokenized_tokens as f64 / 1e6,
                m.tokenized_tokens as f64 / secs
            ));
        }
        m.lines += st.lines;
        m.bad_lines_skipped += st.bad_lines;
        m.files.push(st);
    }
    bar.finish_and_clear();
    let all_header = all.finish()?;
    let n = all_header.records;
    ensure!(
        n > 0,
        "no complete {}-token block: every 1000-line batch of the input is shorter than a block",
        cfg.block_size
    );

    // Validation split: ceil(fraction * n) blocks, chosen by a seeded RNG.
    let n_val = (cfg.validation_fraction * n as f64).ceil() as u64;
    ensure!(
        n_val < n,
        "validation fraction {} of {n} blocks leaves no training block",
        cfg.validation_fraction
    );
    let mut is_val = vec![false; n as usize];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    for i in rand::seq::index::sample(&mut rng, n as usize, n_val as usize).iter() {
        is_val[i] = true;
    }
    let src = BlockShard::open(&all_path)?;
    let mut train = ShardWriter::create(
        &dir.join(TRAIN_FILE),
        ShardKind::Blocks,
        vocab_size,
        cfg.block_size,
    )?;
    let mut val = ShardWriter::create(
        &dir.join(VALIDATION_FILE),
        ShardKind::Blocks,
        vocab_size,
        cfg.block_size,
    )?;
    let mut buf = vec![0u32; cfg.block_size];
    for (i, &v) in is_val.iter().enumerate() {
        src.read_block(i, &mut buf);
        if v {
            val.push_block(&buf)?
        } else {
            train.push_block(&buf)?
        }
    }
    drop(src);
    let (th, vh) = (train.finish()?, val.finish()?);
    m.train_blocks = th.records;
    m.validation_blocks = vh.records;
    for (name, h) in [(TRAIN_FILE, th), (VALIDATION_FILE, vh)] {
        if let Some(d) = h.payload_digest {
            m.payload_digests
                .insert(name.to_string(), super::shard::digest_string(d));
        }
    }
    std::fs::remove_file(&all_path)
        .with_context(|| format!("cannot remove {}", all_path.display()))?;
    m.tokens = (m.train_blocks + m.validation_blocks) * cfg.block_size as u64;
    let json = serde_json::to_vec_pretty(&m)?;
    crate::util::write_atomic(&dir.join(MANIFEST_FILE), &json)?;
    Ok(m)
}

/// A pre-training directory opened for reading: train and validation blocks, random access.
pub struct PretrainShards {
    pub manifest: PretrainManifest,
    pub train: BlockShard,
    pub validation: BlockShard,
}

impl PretrainShards {
    /// Open `dir` (written by `zhllama data pretrain`); checks both shards against the manifest.
    pub fn open(dir: &Path) -> Result<PretrainShards> {
        let mpath = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&mpath)
            .with_context(|| format!("cannot read {}", mpath.display()))?;
        let manifest: PretrainManifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a pre-training manifest", mpath.display()))?;
        let train = BlockShard::open(&dir.join(TRAIN_FILE))?;
        let validation = BlockShard::open(&dir.join(VALIDATION_FILE))?;
        for (s, name) in [(&train, TRAIN_FILE), (&validation, VALIDATION_FILE)] {
            super::shard::check_digest(s.header(), &manifest.payload_digests, dir, name)?;
        }
        for (s, want, name) in [
            (&train, manifest.train_blocks, TRAIN_FILE),
            (&validation, manifest.validation_blocks, VALIDATION_FILE),
        ] {
            ensure!(
                s.len() as u64 == want
                    && s.block_size() == manifest.block_size
                    && s.vocab_size() == manifest.vocab_size,
                "{}: {} blocks of {} (vocab {}), manifest says {} of {} (vocab {})",
                dir.join(name).display(),
                s.len(),
                s.block_size(),
                s.vocab_size(),
                want,
                manifest.block_size,
                manifest.vocab_size
            );
        }
        Ok(PretrainShards {
            manifest,
            train,
            validation,
        })
    }
}
