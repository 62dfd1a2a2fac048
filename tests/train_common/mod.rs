//! Shared fixtures of the `train_*` tests: a tiny random LLaMA saved as an HF directory, and
//! pre-training / SFT shards made with a byte-level test encoder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::data::{Encoder, PretrainConfig, SftConfig};
use zhllama::model::weights::SaveOptions;
use zhllama::model::{Llama, LlamaConfig, TrainSpec};
use zhllama::tensor::DType;

/// Ids 3.. are bytes folded into the vocab; 0 unk, 1 BOS, 2 EOS.
pub struct ByteEncoder {
    pub vocab: usize,
}

impl Encoder for ByteEncoder {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes()
            .map(|b| 3 + (b as u32) % (self.vocab as u32 - 3))
            .collect()
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn bos_id(&self) -> u32 {
        1
    }
    fn eos_id(&self) -> u32 {
        2
    }
    fn unk_id(&self) -> u32 {
        0
    }
    fn pad_id(&self) -> Option<u32> {
        None
    }
}

/// A tiny LLaMA (GQA, 2 layers) with random weights, saved in f32 to `dir`.
pub fn tiny_model(dir: &Path, vocab: usize, seed: u64) -> PathBuf {
    let cfg = LlamaConfig::new(vocab, 32, 48, 2, 4, 2);
    let m = Llama::random(Arc::new(CpuBackend::new()), cfg, TrainSpec::frozen(), seed).unwrap();
    m.save_hf(
        dir,
        SaveOptions {
            dtype: DType::F32,
            max_shard_bytes: None,
        },
    )
    .unwrap();
    dir.to_path_buf()
}

const TEXT: &str = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n\
The quick brown fox jumps over the lazy dog while the cat sleeps.\n\
床前明月光，疑是地上霜。举头望明月，低头思故乡。\n\
Pack my box with five dozen liquor jugs and a few more things.\n";

/// Pre-training shards of `block` tokens from a few lines of text repeated.
pub fn pretrain_data(dir: &Path, vocab: usize, block: usize) -> PathBuf {
    let src = dir.with_extension("txt.d");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), TEXT.repeat(6)).unwrap();
    let cfg = PretrainConfig {
        block_size: block,
        validation_fraction: 0.1,
        seed: 7,
        ..PretrainConfig::default()
    };
    zhllama::data::pretrain::build_pretrain(
        &ByteEncoder { vocab },
        &[src.join("a.txt")],
        dir,
        &cfg,
    )
    .unwrap();
    dir.to_path_buf()
}

/// SFT shards (vocab `vocab` + the added `[PAD]`) from a few Alpaca records.
pub fn sft_data(dir: &Path, vocab: usize, max_len: usize) -> PathBuf {
    let src = dir.with_extension("json");
    let recs: Vec<serde_json::Value> = (0..12)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("把第{i}句翻译成英文"),
                "input": if i % 3 == 0 { format!("句子{i}") } else { String::new() },
                "output": format!("Sentence number {i} says hello{}", "!".repeat(i % 4)),
            })
        })
        .collect();
    std::fs::write(&src, serde_json::to_string(&recs).unwrap()).unwrap();
    let cfg = SftConfig {
        max_len,
        ..SftConfig::default()
    };
    let m = zhllama::data::sft::build_sft(&ByteEncoder { vocab }, &[src], dir, &cfg).unwrap();
    // Every example keeps part of its response: at a too-small max_len the prompt alone fills
    // it, every label is -100, and training runs at loss 0 with unchanged weights.
    let shards = zhllama::data::SftShards::open(dir).unwrap();
    let with_target = (0..shards.len())
        .filter(|&i| {
            let e = shards.example(i);
            e.input_ids.len() > e.source_len
        })
        .count();
    assert_eq!(
        with_target as u64, m.examples,
        "sft_data at max_len {max_len}: {with_target} of {} examples have target tokens \
         ({} target tokens)",
        m.examples, m.target_tokens
    );
    dir.to_path_buf()
}

/// Set `elapsed_s` to -1 (a value no run writes) on every `metrics.jsonl` line of `out` of a
/// step up to `until`. A process that resumes at step `until` keeps exactly these lines and
/// writes the later ones; one that starts over rewrites them all: `marked_steps` tells which.
pub fn mark_metrics(out: &Path, until: u64) {
    let path = out.join("metrics.jsonl");
    let Ok(recs) = zhllama::train::metrics::read(&path) else {
        return; // killed before the file existed: nothing to keep
    };
    let mut text = String::new();
    for mut r in recs {
        if r.step <= until {
            r.elapsed_s = Some(-1.0);
        }
        text.push_str(&serde_json::to_string(&r).unwrap());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
}

/// Steps of the `metrics.jsonl` lines of `out` that `mark_metrics` marked.
pub fn marked_steps(out: &Path) -> Vec<u64> {
    zhllama::train::metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.elapsed_s == Some(-1.0))
        .map(|r| r.step)
        .collect()
}

/// (step, training loss) of every training line of `out`'s `metrics.jsonl`.
pub fn logged_losses(out: &Path) -> Vec<(u64, f64)> {
    zhllama::train::metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| Some((r.step, r.loss?)))
        .collect()
}
