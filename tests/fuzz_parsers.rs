//! Property-based fuzzing of every parser that reads a file a user hands us: SentencePiece model,
//! safetensors header, shard header, config.json, adapter_config.json, Alpaca JSON, metrics.jsonl.
//! Each target starts from a valid seed file and applies random byte flips, insertions and a
//! truncation, or feeds random bytes; the property is that the parser returns (Ok or a clean
//! error) and never panics, aborts or hangs.
//!
//! The default `cargo test` runs a smoke budget of `ZHLLAMA_FUZZ_CASES` (default 64) inputs per
//! target; `tools/fuzz.sh` runs the fixed budget recorded in docs/RELIABILITY.md.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::Path;

#[path = "train_common/mod.rs"]
mod train_common;

fn cases() -> u32 {
    std::env::var("ZHLLAMA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Mutations of a seed: byte overwrites, insertions, then an optional truncation.
#[derive(Clone, Debug)]
struct Mutation {
    writes: Vec<(usize, u8)>,
    inserts: Vec<(usize, Vec<u8>)>,
    truncate: Option<usize>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        prop::collection::vec(
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)),
            0..3,
        ),
        prop::option::of(any::<usize>()),
    )
        .prop_map(|(writes, inserts, truncate)| Mutation {
            writes,
            inserts,
            truncate,
        })
}

fn apply(seed: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = seed.to_vec();
    for (i, bytes) in &m.inserts {
        let at = if b.is_empty() { 0 } else { i % (b.len() + 1) };
        b.splice(at..at, bytes.iter().copied());
    }
    if !b.is_empty() {
        for (i, v) in &m.writes {
            let n = b.len();
            b[i % n] = *v;
        }
    }
    if let Some(t) = m.truncate
        && !b.is_empty()
    {
        b.truncate(t % (b.len() + 1));
    }
    b
}

/// Run `parse` on `cases()` mutations of `seed` and as many random byte strings; a panic fails
/// the test with the shrunk input. Prints the number of executions.
fn fuzz(name: &str, seed: &[u8], parse: impl Fn(&[u8])) {
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&mutation(), |m| {
            parse(&apply(seed, &m));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..512), |b| {
            parse(&b);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("fuzz {name}: {} executions, 0 crashes", 2 * n);
}

/// Write `bytes` as `dir/name` and return the path.
fn put(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A small BPE model trained here (the real trainer), as the SentencePiece seed.
fn sp_seed() -> Vec<u8> {
    let lines: Vec<String> = (0..50)
        .map(|i| format!("the cat {i} sat on the mat 我们 {i}"))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let opt = zhllama::vocab::train::TrainOptions {
        vocab_size: 60,
        ..Default::default()
    };
    let (model, _) = zhllama::vocab::train::train(&refs, &opt).unwrap();
    model.to_bytes()
}

#[test]
fn fuzz_sentencepiece_model() {
    let seed = sp_seed();
    fuzz("sentencepiece", &seed, |b| {
        let _ = zhllama::vocab::proto::ModelProto::parse(b);
    });
    let tmp = tempfile::tempdir().unwrap();
    fuzz("tokenizer load", &seed, |b| {
        let p = put(tmp.path(), "t.model", b);
        let _ = zhllama::vocab::Tokenizer::load(&p);
    });
}

#[test]
fn fuzz_safetensors_header_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let model = train_common::tiny_model(&tmp.path().join("m"), 16, 1);
    let st = std::fs::read(model.join("model.safetensors")).unwrap();
    // The header and the first bytes of data: where the parser's decisions are.
    let n = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let cfg = std::fs::read(model.join("config.json")).unwrap();
    let work = tmp.path().join("w");
    train_common::tiny_model(&work, 16, 1);
    fuzz("safetensors header", &st[..n.min(st.len())], |b| {
        let mut bytes = b.to_vec();
        bytes.extend_from_slice(&st[n.min(st.len())..]);
        put(&work, "model.safetensors", &bytes);
        if let Ok(ck) = zhllama::model::weights::Checkpoint::open(&work) {
            let names: Vec<String> = ck.names().map(str::to_string).collect();
            for name in names {
                let _ = ck.read(&name);
            }
        }
    });
    put(&work, "model.safetensors", &st);
    fuzz("config.json", &cfg, |b| {
        let p = put(&work, "config.json", b);
        if zhllama::model::LlamaConfig::load(&p).is_ok() {
            let _ = zhllama::model::llama::check_model_dir(&work);
        }
    });
}

#[test]
fn fuzz_shard_header() {
    let tmp = tempfile::tempdir().unwrap();
    let pt = train_common::pretrain_data(&tmp.path().join("pt"), 64, 8);
    let sft = train_common::sft_data(&tmp.path().join("sft"), 64, 200);
    let blocks = std::fs::read(pt.join("train.tok")).unwrap();
    let examples = std::fs::read(sft.join("train.sft")).unwrap();
    fuzz("block shard", &blocks, |b| {
        let p = put(tmp.path(), "x.tok", b);
        if let Ok(s) = zhllama::data::shard::BlockShard::open(&p) {
            for i in 0..s.len() {
                let _ = s.block(i);
            }
        }
    });
    fuzz("example shard", &examples, |b| {
        let p = put(tmp.path(), "x.sft", b);
        if let Ok(s) = zhllama::data::shard::ExampleShard::open(&p) {
            for i in 0..s.len() {
                let _ = s.example(i);
            }
        }
    });
}

#[test]
fn fuzz_adapter_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    let seed = serde_json::to_vec_pretty(&serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0,
        "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "fan_in_fan_out": false, "inference_mode": true, "modules_to_save": null
    }))
    .unwrap();
    fuzz("adapter_config.json", &seed, |b| {
        put(&dir, "adapter_config.json", b);
        let _ = zhllama::model::peft::load_adapter(&dir);
    });
}

#[test]
fn fuzz_alpaca_json() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = serde_json::to_vec(&serde_json::json!([
        {"instruction": "把这句翻译成英文", "input": "你好", "output": "Hello"},
        {"instruction": "say hi", "input": "", "output": "hi"}
    ]))
    .unwrap();
    for skip_bad in [false, true] {
        fuzz("alpaca json", &seed, |b| {
            let p = put(tmp.path(), "a.json", b);
            let mut skips = Default::default();
            let _ = zhllama::instruct::convert::read_alpaca(&p, skip_bad, &mut skips);
        });
    }
}

#[test]
fn fuzz_metrics_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = b"{\"step\":1,\"loss\":2.5,\"lr\":0.0001,\"tokens_per_s\":100.0}\n{\"step\":2,\"loss\":2.4,\"lr\":0.0001,\"tokens_per_s\":101.0}\n{\"step\":2,\"eval_loss\":2.6}\n";
    fuzz("metrics.jsonl", seed, |b| {
        let p = put(tmp.path(), "metrics.jsonl", b);
        let _ = zhllama::train::metrics::read(&p);
    });
}
