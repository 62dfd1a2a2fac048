//! Encoding/decoding parity with python sentencepiece on the reference cases
//! (`reference_encodings.json`, made by python sentencepiece 0.2.3).

mod skip_common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use zhllama::vocab::{ModelProto, Tokenizer, merge_models};

fn tokenizers_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tokenizers");
    if d.join("reference_encodings.json").is_file() {
        Some(d)
    } else {
        skip_common::skip(&format!("../shared data absent: {} not found", d.display()));
        None
    }
}

/// The merged models as the merge builds them (their bytes are hash-checked in vocab_merge.rs).
fn merged(d: &Path, add_pad: bool) -> Tokenizer {
    let mut llama =
        ModelProto::parse(&std::fs::read(d.join("llama_tokenizer.model")).unwrap()).unwrap();
    let zh = ModelProto::parse(&std::fs::read(d.join("chinese_sp.model")).unwrap()).unwrap();
    merge_models(&mut llama, &zh, add_pad);
    Tokenizer::from_model(llama).unwrap()
}

fn check(tok: &Tokenizer, model: &Value, name: &str) {
    assert_eq!(
        tok.vocab_size() as u64,
        model["vocab_size"].as_u64().unwrap(),
        "{name}"
    );
    assert_eq!(
        tok.bos_id().map(i64::from).unwrap_or(-1),
        model["bos_id"].as_i64().unwrap()
    );
    assert_eq!(
        tok.eos_id().map(i64::from).unwrap_or(-1),
        model["eos_id"].as_i64().unwrap()
    );
    assert_eq!(i64::from(tok.unk_id()), model["unk_id"].as_i64().unwrap());
    for case in model["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let pieces: Vec<&str> = case["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let got = tok.encode(text);
        assert_eq!(got, want, "{name}: ids of {text:?}");
        assert_eq!(
            tok.encode_pieces(text),
            pieces,
            "{name}: pieces of {text:?}"
        );
        assert_eq!(
            tok.decode(&want),
            case["decoded"].as_str().unwrap(),
            "{name}: decode"
        );
    }
}

#[test]
fn reference_cases_llama_and_merged() {
    let Some(d) = tokenizers_dir() else { return };
    let refs: Value =
        serde_json::from_slice(&std::fs::read(d.join("reference_encodings.json")).unwrap())
            .unwrap();
    let models = &refs["models"];
    let llama = Tokenizer::load(&d.join("llama_tokenizer.model")).unwrap();
    check(&llama, &models["llama_tokenizer.model"], "llama");
    check(
        &merged(&d, false),
        &models["merged_chinese_llama_sp.model"],
        "merged 49953",
    );
    let alpaca = merged(&d, true);
    check(
        &alpaca,
        &models["merged_chinese_alpaca_sp.model"],
        "merged 49954",
    );
    assert_eq!(alpaca.pad_id(), Some(49953));
    // The Chinese model: unigram, nmt_nfkc character map, no byte fallback.
    let zh = Tokenizer::load(&d.join("chinese_sp.model")).unwrap();
    check(&zh, &models["chinese_sp.model"], "chinese_sp");
    assert_eq!(llama.pad_id(), None);
}

#[test]
fn batch_equals_single() {
    let Some(d) = tokenizers_dir() else { return };
    let tok = merged(&d, false);
    let texts = [
        "我们如何在日常生活中减少用水？",
        "",
        " Hello  world ",
        "emoji 😀",
    ];
    let batch = tok.encode_batch(&texts);
    for (t, b) in texts.iter().zip(&batch) {
        assert_eq!(&tok.encode(t), b);
    }
}
