//! Parity with the original Python pipeline (`tools/oracle/data_reference.py`: HF `datasets` +
//! the slow `LlamaTokenizer` of transformers 4.28.1) on the shared samples: the grouped blocks
//! and the SFT `input_ids` / `labels` / padded batches must be equal, id for id.
//!
//! The oracle also records every text chunk it handed to sentencepiece with the ids it got back;
//! the Rust side encodes through that record ([`Recorded`]), so this test checks our line
//! splitting, special-token splitting, prompt building, grouping and truncation against HF with
//! tokenization held fixed. A chunk the oracle never saw means our splitting differs: the test
//! fails and names it. (The tokenizer itself is tested against sentencepiece by the vocab tests;
//! `merged_tokenizer_pipeline_equals_the_oracle` below runs this pipeline end to end with it.)
//!
//! Skips with a message when the shared data or the pinned Python packages are absent
//! (`tools/test.sh` installs them into `.venv/data-oracle`). Oracle outputs are cached under the
//! test's target tmp dir, keyed by the inputs, so only the first run pays for Python.

mod skip_common;

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use zhllama::data::shard::Tokens;
use zhllama::data::{Encoder, PretrainConfig, PretrainShards, SftConfig, SftShards, pretrain, sft};

fn shared() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if d.is_dir() {
        Some(d)
    } else {
        skip_common::skip(&format!("../shared data absent: {} not found", d.display()));
        None
    }
}

/// The oracle's Python: `$ZHLLAMA_DATA_PYTHON`, the venv tools/test.sh makes, or python3 —
/// whichever imports the pinned transformers.
fn python() -> Option<String> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/data-oracle/bin/python");
    let mut cands = Vec::new();
    if let Ok(p) = std::env::var("ZHLLAMA_DATA_PYTHON") {
        cands.push(p);
    }
    cands.push(venv.display().to_string());
    cands.push("python3".into());
    for c in cands {
        let ok = Command::new(&c)
            .args([
                "-c",
                "import sentencepiece, datasets, transformers; assert transformers.__version__ == '4.28.1'",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(c);
        }
    }
    skip_common::skip(
        "no python with transformers==4.28.1, datasets, sentencepiece (run tools/test.sh, \
         or pip install -r tools/oracle/data_requirements.txt)",
    );
    None
}

fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Run the oracle once per distinct (script, args, input contents); returns its output dir.
fn oracle(py: &str, args: &[String], inputs: &[PathBuf]) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/oracle/data_reference.py");
    let mut h = fnv(&std::fs::read(&script).unwrap(), 0xcbf2_9ce4_8422_2325);
    for a in args {
        h = fnv(a.as_bytes(), h);
    }
    for f in inputs {
        if f.is_dir() {
            let mut names: Vec<PathBuf> = std::fs::read_dir(f)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            for n in names {
                h = fnv(&std::fs::read(n).unwrap(), h);
            }
        } else {
            h = fnv(&std::fs::read(f).unwrap(), h);
        }
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-oracle-{h:016x}"));
    if out.join("versions.json").exists() {
        return out;
    }
    let tmp = out.with_extension("partial");
    std::fs::remove_dir_all(&tmp).ok();
    let st = Command::new(py)
        .arg(&script)
        .arg("--out")
        .arg(&tmp)
        .arg("--record-chunks")
        .args(args)
        .status()
        .expect("run the oracle");
    assert!(st.success(), "oracle failed: {args:?}");
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// Write a generated input at a fixed path, so the oracle cache key (which includes the
/// arguments) stays the same from run to run.
fn stable_input(name: &str, bytes: &[u8]) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("data-oracle-inputs")
        .join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    if std::fs::read(&p).ok().as_deref() != Some(bytes) {
        zhllama::util::write_atomic(&p, bytes).unwrap();
    }
    p
}

/// An encoder that answers with the oracle's recorded sentencepiece ids.
struct Recorded {
    chunks: HashMap<String, Vec<u32>>,
    vocab: usize,
    bos: u32,
    eos: u32,
    unk: u32,
    pad: Option<u32>,
    missing: Mutex<Vec<String>>,
}

impl Recorded {
    fn load(dir: &Path) -> Recorded {
        let v: Value =
            serde_json::from_slice(&std::fs::read(dir.join("chunks.json")).unwrap()).unwrap();
        let m = &v["model"];
        let id = |k: &str| m[k].as_u64().unwrap() as u32;
        Recorded {
            chunks: v["chunks"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, ids)| (k.clone(), ids_of(ids)))
                .collect(),
            vocab: m["vocab_size"].as_u64().unwrap() as usize,
            bos: id("bos_id"),
            eos: id("eos_id"),
            unk: id("unk_id"),
            pad: m["pad_id"].as_u64().map(|p| p as u32),
            missing: Mutex::new(Vec::new()),
        }
    }
    fn assert_complete(&self) {
        let m = self.missing.lock().unwrap();
        assert!(
            m.is_empty(),
            "{} chunks were encoded that HF never encoded (splitting differs), e.g. {:?}",
            m.len(),
            &m[..m.len().min(3)]
        );
    }
}

impl Encoder for Recorded {
    fn encode(&self, text: &str) -> Vec<u32> {
        match self.chunks.get(text) {
            Some(v) => v.clone(),
            None => {
                self.missing.lock().unwrap().push(text.to_string());
                Vec::new()
            }
        }
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn bos_id(&self) -> u32 {
        self.bos
    }
    fn eos_id(&self) -> u32 {
        self.eos
    }
    fn unk_id(&self) -> u32 {
        self.unk
    }
    fn pad_id(&self) -> Option<u32> {
        self.pad
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn i64s_of(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Lines that exercise Python's universal newlines, empty lines, special-token text, a BOM,
/// Unicode separators (which `load_dataset("text")` does not split on) and no final newline.
const EDGE_TEXT: &[u8] = b"hello world\r\nline two\rline three\n\n  spaced  \n</s>literal eos<s>and bos [PAD] pad <unk>\na\xe2\x80\xa8b\x0cc\x1cd\xc2\x85e\n\xef\xbb\xbfbom mid\nx </s> y<s>\nlast no newline";

fn edge_sft() -> String {
    let long = "很长的回答。".repeat(200);
    [
        serde_json::json!({"instruction": "把这句话翻译成英文", "input": "你好，世界", "output": "Hello, world"}),
        serde_json::json!({"instruction": "无输入字段", "output": "结尾有空格 "}),
        serde_json::json!({"instruction": "input 为 null", "input": null, "output": ""}),
        serde_json::json!({"instruction": "literal {instruction} and </s> inside", "input": "", "output": "a </s> b [PAD] c<s>"}),
        serde_json::json!({"instruction": "pad spacing", "input": "x [PAD] y", "output": " [PAD] "}),
        // The edge text's `<unk>` falls in a short pre-training batch (dropped); this one is kept.
        serde_json::json!({"instruction": "literal unk", "input": "a<unk>b", "output": "c <unk> d"}),
        serde_json::json!({"instruction": "长输出被截断", "input": "", "output": long}),
        serde_json::json!({"instruction": "trailing", "input": "  ", "output": "<"}),
    ]
    .iter()
    .map(|v| v.to_string() + "\n")
    .collect()
}

fn blocks_of(t: Tokens<'_>) -> Vec<u32> {
    t.to_vec()
}

/// `real`: encode with this tokenizer instead of the oracle's recorded chunks.
fn check_pretrain(
    py: &str,
    tok: &Path,
    real: Option<&dyn Encoder>,
    files: &[PathBuf],
    block: usize,
    work: &Path,
) {
    let mut args = vec![
        "--tokenizer".to_string(),
        tok.display().to_string(),
        "--block-size".into(),
        block.to_string(),
        "--pretrain".into(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let mut inputs = files.to_vec();
    inputs.push(tok.to_path_buf());
    let dir = oracle(py, &args, &inputs);
    let recorded = Recorded::load(&dir);
    let enc: &dyn Encoder = real.unwrap_or(&recorded);
    let want: Value =
        serde_json::from_slice(&std::fs::read(dir.join("pretrain.json")).unwrap()).unwrap();
    let mut full = Vec::new();
    let (mut short, mut short_tokens) = (0u64, 0u64);
    let mut lines = 0;
    for f in want["files"].as_array().unwrap() {
        lines += f["lines"].as_u64().unwrap();
        for b in f["blocks"].as_array().unwrap() {
            let b = ids_of(b);
            if b.len() == block {
                full.push(b);
            } else {
                // group_texts keeps a batch shorter than one block as a short block; we drop it.
                assert!(b.len() < block);
                short += 1;
                short_tokens += b.len() as u64;
            }
        }
    }

    // All blocks in order (no validation split) equal the oracle's full blocks.
    let out = work.join(format!("pt{block}"));
    let cfg = PretrainConfig {
        block_size: block,
        validation_fraction: 0.0,
        ..Default::default()
    };
    let m = pretrain::build_pretrain(enc, files, &out, &cfg).unwrap();
    recorded.assert_complete();
    let sh = PretrainShards::open(&out).unwrap();
    assert_eq!(m.lines, lines, "line count");
    assert_eq!(sh.train.len(), full.len(), "block count");
    for (i, w) in full.iter().enumerate() {
        assert_eq!(&blocks_of(sh.train.block(i)), w, "block {i}");
    }
    assert_eq!(
        (m.short_batches_dropped, m.short_batch_tokens),
        (short, short_tokens),
        "short batches"
    );
    assert_eq!(m.tokens, (full.len() * block) as u64);

    // With a validation split: train + validation are the same blocks, ceil(f * n) in validation.
    let out = work.join(format!("ptv{block}"));
    let cfg = PretrainConfig {
        validation_fraction: 0.01,
        seed: 7,
        ..cfg
    };
    pretrain::build_pretrain(enc, files, &out, &cfg).unwrap();
    let sh = PretrainShards::open(&out).unwrap();
    let n_val = (0.01 * full.len() as f64).ceil() as usize;
    assert_eq!(sh.validation.len(), n_val);
    assert_eq!(sh.train.len() + n_val, full.len());
    let mut got: Vec<Vec<u32>> = (0..sh.train.len())
        .map(|i| blocks_of(sh.train.block(i)))
        .chain((0..n_val).map(|i| blocks_of(sh.validation.block(i))))
        .collect();
    let mut want_sorted = full.clone();
    got.sort();
    want_sorted.sort();
    assert!(
        got == want_sorted,
        "train + validation are not the oracle's blocks"
    );
}

#[test]
fn pretrain_blocks_equal_the_oracle() {
    let (Some(data), Some(py)) = (shared(), python()) else {
        return;
    };
    let tok = data.join("tokenizers/llama_tokenizer.model");
    let work = tempfile::tempdir().unwrap();
    let edge = stable_input("edge.txt", EDGE_TEXT);
    let corpus = vec![
        data.join("zh_corpus/cmrc2018_wiki_contexts.txt"),
        data.join("zh_corpus/cmrc2019_stories_filled.txt"),
        edge.clone(),
    ];
    check_pretrain(&py, &tok, None, &corpus, 512, work.path());
    // Small blocks so the edge lines land in full blocks and are compared id for id.
    check_pretrain(&py, &tok, None, &[edge], 8, work.path());
}

#[test]
fn sft_examples_and_batches_equal_the_oracle() {
    let (Some(data), Some(py)) = (shared(), python()) else {
        return;
    };
    let tok = data.join("tokenizers/llama_tokenizer.model");
    check_sft(&py, &tok, None, &sft_files(&data));
}

fn sft_files(data: &Path) -> Vec<PathBuf> {
    vec![
        data.join("alpaca_zh/llamafactory_alpaca_zh_demo.json"),
        data.join("alpaca_en/alpaca_data_en_sample.json"),
        stable_input("edge.jsonl", edge_sft().as_bytes()),
    ]
}

fn check_sft(py: &str, tok: &Path, real: Option<&dyn Encoder>, files: &[PathBuf]) {
    let work = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--tokenizer".to_string(),
        tok.display().to_string(),
        "--sft".into(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let mut inputs = files.to_vec();
    inputs.push(tok.to_path_buf());
    let dir = oracle(py, &args, &inputs);
    let recorded = Recorded::load(&dir);
    let enc: &dyn Encoder = real.unwrap_or(&recorded);
    let want: Value =
        serde_json::from_slice(&std::fs::read(dir.join("sft.json")).unwrap()).unwrap();

    let out = work.path().join("sft");
    let m = sft::build_sft(enc, files, &out, &SftConfig::default()).unwrap();
    recorded.assert_complete();
    assert_eq!(m.pad_id as u64, want["pad_id"].as_u64().unwrap());
    assert_eq!(m.vocab_size as u64, want["vocab_size"].as_u64().unwrap());
    let sh = SftShards::open(&out).unwrap();
    let mut i = 0;
    let mut truncated = 0;
    for f in want["files"].as_array().unwrap() {
        let ids = f["input_ids"].as_array().unwrap();
        let labels = f["labels"].as_array().unwrap();
        for (wi, wl) in ids.iter().zip(labels) {
            let e = sh.example(i);
            assert_eq!(e.input_ids, ids_of(wi), "example {i} input_ids");
            assert_eq!(e.labels(), i64s_of(wl), "example {i} labels");
            truncated += (e.input_ids.len() == 512) as usize;
            i += 1;
        }
    }
    assert_eq!(i, sh.len(), "example count");
    assert!(truncated > 0, "the edge file must exercise truncation");
    let bs = want["batch_size"].as_u64().unwrap() as usize;
    for b in want["batches"].as_array().unwrap() {
        let start = b["start"].as_u64().unwrap() as usize;
        let idx: Vec<usize> = (start..(start + bs).min(sh.len())).collect();
        let got = sh.batch(&idx);
        let flat =
            |k: &str| -> Vec<i64> { b[k].as_array().unwrap().iter().flat_map(i64s_of).collect() };
        let ids: Vec<i64> = got.input_ids.iter().map(|&t| t as i64).collect();
        assert_eq!(ids, flat("input_ids"), "batch at {start}: input_ids");
        assert_eq!(got.labels, flat("labels"), "batch at {start}: labels");
        let mask: Vec<i64> = got.attention_mask.iter().map(|&t| t as i64).collect();
        assert_eq!(
            mask,
            flat("attention_mask"),
            "batch at {start}: attention_mask"
        );
    }
}

/// The same checks end to end with our own tokenizer: the Chinese-LLaMA tokenizer merged by
/// `vocab::merge_tokenizers` from the shared LLaMA and Chinese models (49953 pieces).
#[test]
fn merged_tokenizer_pipeline_equals_the_oracle() {
    let (Some(data), Some(py)) = (shared(), python()) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let merged = work.path().join("merged");
    zhllama::vocab::merge_tokenizers(
        &data.join("tokenizers/llama_tokenizer.model"),
        &data.join("tokenizers/chinese_sp.model"),
        &merged,
        false,
    )
    .unwrap();
    let model = stable_input(
        "chinese_llama.model",
        &std::fs::read(merged.join("tokenizer.model")).unwrap(),
    );
    let enc = zhllama::data::TokenizerEncoder::load(&model).unwrap();
    assert_eq!(enc.vocab_size(), 49953);
    let corpus = vec![
        data.join("zh_corpus/cmrc2018_wiki_contexts.txt"),
        data.join("zh_corpus/cmrc2019_stories_filled.txt"),
        stable_input("edge.txt", EDGE_TEXT),
    ];
    check_pretrain(&py, &model, Some(&enc), &corpus, 512, work.path());
    check_sft(&py, &model, Some(&enc), &sft_files(&data));

    // The Chinese-Alpaca tokenizer (49954, `[PAD]` = 49953 registered as the pad token in its HF
    // files): loaded from its directory on both sides, its own pad is used and a literal
    // "[PAD]" keeps the whitespace around it (an AddedToken without lstrip/rstrip).
    let alpaca = work.path().join("alpaca");
    zhllama::vocab::merge_tokenizers(
        &data.join("tokenizers/llama_tokenizer.model"),
        &data.join("tokenizers/chinese_sp.model"),
        &alpaca,
        true,
    )
    .unwrap();
    let mut tok_dir = None;
    for f in [
        "tokenizer.model",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        let p = stable_input(
            &format!("alpaca_tok/{f}"),
            &std::fs::read(alpaca.join(f)).unwrap(),
        );
        tok_dir = Some(p.parent().unwrap().to_path_buf());
    }
    let tok_dir = tok_dir.unwrap();
    let enc = zhllama::data::TokenizerEncoder::load(&tok_dir).unwrap();
    assert_eq!((enc.vocab_size(), enc.pad_id()), (49954, Some(49953)));
    check_sft(&py, &tok_dir, Some(&enc), &sft_files(&data));
}
