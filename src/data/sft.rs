//! SFT examples (docs/RECIPE.md §4), as the original `build_dataset.py` builds them:
//! - `instruction += "\n" + input` when `input` is non-empty;
//! - source = [`PROMPT_TEMPLATE`] with the instruction, tokenized with BOS;
//! - target = `output + "</s>"`, tokenized without special tokens — with the slow
//!   `LlamaTokenizer` the literal `</s>` becomes the EOS id ([`HfText`]);
//! - `input_ids = (src + tgt)[:max_len]`, `labels = ([-100]*len(src) + tgt)[:max_len]`;
//! - batches right-padded with the pad id (labels -100), `attention_mask = input_ids != pad`.

use super::shard::{ExampleShard, ShardKind, ShardWriter, token_bytes_for};
use super::{Encoder, HfText, IGNORE_INDEX, write_dir_atomic};
use crate::instruct::convert::{AlpacaRecord, SkipCounts, read_alpaca};
use anyhow::{Context, Result, ensure};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Stanford Alpaca's no-input prompt, with the trailing space after `### Response:`.
pub const PROMPT_TEMPLATE: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ";

/// File names inside an SFT output directory.
pub const EXAMPLES_FILE: &str = "train.sft";
pub const MANIFEST_FILE: &str = "manifest.json";

/// The source text of a record.
pub fn build_prompt(rec: &AlpacaRecord) -> String {
    let instruction = if rec.input.is_empty() {
        rec.instruction.clone()
    } else {
        format!("{}\n{}", rec.instruction, rec.input)
    };
    PROMPT_TEMPLATE.replace("{instruction}", &instruction)
}

/// How a user prompt becomes the model's input text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    /// Stanford Alpaca's instruction prompt, exactly as SFT training built it
    /// ([`build_prompt`] with no `input`).
    Alpaca,
    /// The prompt text as is.
    Raw,
}

/// The prompt ids the model sees: BOS, then `text` (through `template`) tokenized as HF's slow
/// `LlamaTokenizer` does, the same encoding SFT training used for its sources.
pub fn encode_prompt<E: Encoder + ?Sized>(
    hf: &HfText<'_, E>,
    text: &str,
    template: Template,
) -> Vec<u32> {
    match template {
        Template::Alpaca => {
            let rec = AlpacaRecord {
                instruction: text.to_string(),
                input: String::new(),
                output: String::new(),
            };
            hf.encode_with_bos(&build_prompt(&rec))
        }
        Template::Raw => hf.encode_with_bos(text),
    }
}

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    pub input_ids: Vec<u32>,
    /// Leading ids with label -100 (`min(len(src), max_len)`).
    pub source_len: usize,
    /// True when `src + tgt` was longer than `max_len`.
    pub truncated: bool,
}

impl SftExample {
    /// `labels`: -100 on the source, the id on the target.
    pub fn labels(&self) -> Vec<i64> {
        self.input_ids
            .iter()
            .enumerate()
            .map(|(j, &t)| {
                if j < self.source_len {
                    IGNORE_INDEX
                } else {
                    t as i64
                }
            })
            .collect()
    }
}

/// Tokenize one record (the original `tokenization` for one row).
pub fn build_example<E: Encoder + ?Sized>(
    hf: &HfText<'_, E>,
    rec: &AlpacaRecord,
    max_len: usize,
) -> SftExample {
    let mut ids = hf.encode_with_bos(&build_prompt(rec));
    let src_len = ids.len();
    hf.encode_into(&format!("{}</s>", rec.output), &mut ids);
    let truncated = ids.len() > max_len;
    ids.truncate(max_len);
    SftExample {
        source_len: src_len.min(ids.len()),
        input_ids: ids,
        truncated,
    }
}

/// A right-padded batch, row-major `[batch, seq_len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftBatch {
    pub batch: usize,
    /// The longest example in the batch (`pad_sequence` pads to it).
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// `input_ids != pad_id`, as the original collator computes it.
    pub attention_mask: Vec<bool>,
}

/// `DataCollatorForSupervisedDataset`: pad ids with `pad_id`, labels with -100.
pub fn collate(examples: &[&SftExample], pad_id: u32) -> SftBatch {
    let seq_len = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let b = examples.len();
    let mut input_ids = vec![pad_id; b * seq_len];
    let mut labels = vec![IGNORE_INDEX; b * seq_len];
    for (r, e) in examples.iter().enumerate() {
        let row = r * seq_len;
        input_ids[row..row + e.input_ids.len()].copy_from_slice(&e.input_ids);
        labels[row..row + e.input_ids.len()].copy_from_slice(&e.labels());
    }
    let attention_mask = input_ids.iter().map(|&t| t != pad_id).collect();
    SftBatch {
        batch: b,
        seq_len,
        input_ids,
        labels,
        attention_mask,
    }
}

/// How to build SFT shards.
#[derive(Clone, Debug)]
pub struct SftConfig {
    pub max_len: usize,
    pub skip_bad: bool,
    pub progress: bool,
    /// Recorded in the manifest.
    pub tokenizer_sha256: String,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            max_len: 512,
            skip_bad: false,
            progress: false,
            tokenizer_sha256: String::new(),
        }
    }
}

/// Per input file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SftFileStats {
    pub path: String,
    pub examples: u64,
    /// Skipped records by reason (only with `skip_bad`).
    pub skipped: SkipCounts,
}

/// `manifest.json` of an SFT directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SftManifest {
    pub format: String,
    pub version: u32,
    pub examples: u64,
    pub tokens: u64,
    /// Tokens with a label (not -100).
    pub target_tokens: u64,
    pub truncated_examples: u64,
    /// Examples with no target token left after truncation (the prompt fills `max_len`): they
    /// would train nothing, so they are counted here and dropped.
    #[serde(default)]
    pub no_target_dropped: u64,
    pub max_len: usize,
    /// `len(tokenizer)`, the pad included.
    pub vocab_size: usize,
    pub token_dtype: String,
    pub pad_id: u32,
    pub bos_id: u32,
    pub eos_id: u32,
    pub tokenizer_sha256: String,
    pub files: Vec<SftFileStats>,
    /// Shard file name → `crc32:<hex>`, the digest of its payload checksums (shard version 2;
    /// absent for older data). It ties this manifest, whose sha256 a run records, to the tokens.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub payload_digests: std::collections::BTreeMap<String, String>,
}

/// Tokenize the Alpaca files `inputs` (in order) into `output` (which must not exist).
pub fn build_sft<E: Encoder + ?Sized>(
    enc: &E,
    inputs: &[PathBuf],
    output: &Path,
    cfg: &SftConfig,
) -> Result<SftManifest> {
    ensure!(cfg.max_len > 0, "max length must be positive");
    ensure!(!inputs.is_empty(), "no input files");
    let hf = HfText::with_pad(enc);
    let pad_id = hf.pad_id().unwrap();
    let mut manifest = None;
    write_dir_atomic(output, |dir| {
        let vocab_size = hf.vocab_size();
        let mut w = ShardWriter::create(
            &dir.join(EXAMPLES_FILE),
            ShardKind::Examples,
            vocab_size,
            cfg.max_len,
        )?;
        let mut m = SftManifest {
            format: "zhllama-sft".into(),
            version: super::shard::VERSION,
            examples: 0,
            tokens: 0,
            target_tokens: 0,
            truncated_examples: 0,
            no_target_dropped: 0,
            max_len: cfg.max_len,
            vocab_size,
            token_dtype: if token_bytes_for(vocab_size) == 2 {
                "u16"
            } else {
                "u32"
            }
            .into(),
            pad_id,
            bos_id: enc.bos_id(),
            eos_id: enc.eos_id(),
            tokenizer_sha256: cfg.tokenizer_sha256.clone(),
            files: Vec::new(),
            payload_digests: Default::default(),
        };
        let bar = if cfg.progress {
            indicatif::ProgressBar::new(inputs.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        for path in inputs {
            let mut st = SftFileStats {
                path: path.display().to_string(),
                ..Default::default()
            };
            let records = read_alpaca(path, cfg.skip_bad, &mut st.skipped)?;
            let examples: Vec<SftExample> = records
                .par_iter()
                .map(|r| build_example(&hf, &r.value, cfg.max_len))
                .collect();
            let mut kept = 0u64;
            for (e, r) in examples.iter().zip(&records) {
                if e.input_ids.len() <= e.source_len {
                    m.no_target_dropped += 1;
                    continue;
                }
                kept += 1;
                w.push_example(&e.input_ids, e.source_len)
                    .with_context(|| format!("{}:{}", path.display(), r.line))?;
                m.tokens += e.input_ids.len() as u64;
                m.target_tokens += (e.input_ids.len() - e.source_len) as u64;
                m.truncated_examples += e.truncated as u64;
            }
            st.examples = kept;
            m.examples += st.examples;
            m.files.push(st);
            bar.inc(1);
        }
        bar.finish_and_clear();
        ensure!(
            m.examples + m.no_target_dropped > 0,
            "no examples in the input files"
        );
        ensure!(
            m.examples > 0,
            "{}: no trainable example: {} examples have no target token left after truncation to --max-len {}",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            m.no_target_dropped,
            cfg.max_len
        );
        if let Some(d) = w.finish()?.payload_digest {
            m.payload_digests
                .insert(EXAMPLES_FILE.to_string(), super::shard::digest_string(d));
        }
        crate::util::write_atomic(&dir.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&m)?)?;
        manifest = Some(m);
        Ok(())
    })?;
    Ok(manifest.unwrap())
}

/// An SFT directory opened for reading: examples by index, batches by index lists.
pub struct SftShards {
    pub manifest: SftManifest,
    pub examples: ExampleShard,
}

impl SftShards {
    /// Open `dir` (written by `zhllama data sft`), checked against its manifest.
    pub fn open(dir: &Path) -> Result<SftShards> {
        let mpath = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&mpath)
            .with_context(|| format!("cannot read {}", mpath.display()))?;
        let manifest: SftManifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an SFT manifest", mpath.display()))?;
        let examples = ExampleShard::open(&dir.join(EXAMPLES_FILE))?;
        super::shard::check_digest(
            examples.header(),
            &manifest.payload_digests,
            dir,
            EXAMPLES_FILE,
        )?;
        ensure!(
            examples.len() as u64 == manifest.examples
                && examples.header().tokens == manifest.tokens
                && examples.vocab_size() == manifest.vocab_size,
            "{}: {} examples / {} tokens (vocab {}), manifest says {} / {} (vocab {})",
            dir.join(EXAMPLES_FILE).display(),
            examples.len(),
            examples.header().tokens,
            examples.vocab_size(),
            manifest.examples,
            manifest.tokens,
            manifest.vocab_size
        );
        Ok(SftShards { manifest, examples })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Example `i` as owned ids.
    pub fn example(&self, i: usize) -> SftExample {
        let e = self.examples.example(i);
        SftExample {
            input_ids: e.input_ids.to_vec(),
            source_len: e.source_len,
            truncated: false,
        }
    }

    /// The padded batch of examples `indices`.
    pub fn batch(&self, indices: &[usize]) -> SftBatch {
        let ex: Vec<SftExample> = indices.iter().map(|&i| self.example(i)).collect();
        let refs: Vec<&SftExample> = ex.iter().collect();
        collate(&refs, self.manifest.pad_id)
    }
}
