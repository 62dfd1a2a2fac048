//! The vocabulary merge against the published facts (docs/RECIPE.md §1): the official sha256 of the
//! merged Chinese-LLaMA/Alpaca `tokenizer.model`, the 17953/2047 counts, and byte-identical
//! read→write round trips of every input model.

mod skip_common;

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use zhllama::vocab::{ModelProto, merge_models};

/// Published sha256 of the official merged files (docs/RECIPE.md §1).
const LLAMA_49953: &str = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0";
const ALPACA_49954: &str = "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8";

fn tokenizers_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tokenizers");
    if d.join("llama_tokenizer.model").is_file() && d.join("chinese_sp.model").is_file() {
        Some(d)
    } else {
        skip_common::skip(&format!("../shared data absent: {} not found", d.display()));
        None
    }
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn load(d: &Path, name: &str) -> (Vec<u8>, ModelProto) {
    let bytes = std::fs::read(d.join(name)).unwrap();
    let m = ModelProto::parse(&bytes).unwrap();
    (bytes, m)
}

#[test]
fn merge_matches_official_hashes_and_counts() {
    let Some(d) = tokenizers_dir() else { return };
    let (_, llama) = load(&d, "llama_tokenizer.model");
    let (_, zh) = load(&d, "chinese_sp.model");
    assert_eq!(llama.pieces.len(), 32000);
    assert_eq!(zh.pieces.len(), 20000);

    let mut merged = llama.clone();
    let st = merge_models(&mut merged, &zh, false);
    assert_eq!((st.appended, st.skipped, st.total), (17953, 2047, 49953));
    let bytes = merged.to_bytes();
    assert_eq!(sha256_hex(&bytes), LLAMA_49953);
    // The merged model itself round-trips byte-identically.
    assert_eq!(ModelProto::parse(&bytes).unwrap().to_bytes(), bytes);

    let mut alpaca = llama.clone();
    let st = merge_models(&mut alpaca, &zh, true);
    assert_eq!((st.appended, st.skipped, st.total), (17953, 2047, 49954));
    assert_eq!(alpaca.pieces[49953].piece, "[PAD]");
    let bytes = alpaca.to_bytes();
    assert_eq!(sha256_hex(&bytes), ALPACA_49954);
    assert_eq!(ModelProto::parse(&bytes).unwrap().to_bytes(), bytes);
}

#[test]
fn input_models_round_trip_byte_identically() {
    let Some(d) = tokenizers_dir() else { return };
    for name in ["llama_tokenizer.model", "chinese_sp.model"] {
        let (bytes, m) = load(&d, name);
        assert_eq!(m.to_bytes(), bytes, "{name}");
        // Re-setting the specs from their parsed form changes nothing either.
        let mut m2 = m.clone();
        m2.set_trainer_spec(&m.trainer_spec());
        m2.set_normalizer_spec(&m.normalizer_spec());
        assert_eq!(m2.to_bytes(), bytes, "{name} after set_*_spec");
    }
}

#[test]
fn model_facts_match_provenance() {
    let Some(d) = tokenizers_dir() else { return };
    use zhllama::vocab::proto::{ModelType, PieceType, normalizer};
    let (_, llama) = load(&d, "llama_tokenizer.model");
    assert_eq!(llama.model_type().unwrap(), ModelType::Bpe);
    let ns = llama.normalizer_spec();
    assert_eq!(ns.get_str(normalizer::NAME), Some("identity"));
    let count = |t| llama.pieces.iter().filter(|p| p.piece_type() == t).count();
    // PROVENANCE.md: 31741 normal, 256 byte, 2 control, 1 unknown.
    assert_eq!(count(PieceType::Normal), 31741);
    assert_eq!(count(PieceType::Byte), 256);
    assert_eq!(count(PieceType::Control), 2);
    assert_eq!(count(PieceType::Unknown), 1);
    assert_eq!(llama.pieces[3].piece, "<0x00>");
    // Spec fields as python protobuf prints them for this file (field numbers of
    // sentencepiece_model.proto): byte_fallback, pad_id -1, unk_surface, vocab_size, normalizer.
    use zhllama::vocab::proto::trainer;
    let ts = llama.trainer_spec();
    assert_eq!(ts.get_bool(trainer::BYTE_FALLBACK), Some(true));
    assert_eq!(ts.get_i32(trainer::PAD_ID), Some(-1));
    assert_eq!(ts.get_i32(trainer::VOCAB_SIZE), Some(32000));
    assert_eq!(ts.get_str(44), Some(" \u{2047} "));
    assert_eq!(ts.get_i32(trainer::MAX_SENTENCEPIECE_LENGTH), Some(16));
    assert_eq!(ns.get_bool(normalizer::ADD_DUMMY_PREFIX), Some(true));
    assert_eq!(
        ns.get_bool(normalizer::REMOVE_EXTRA_WHITESPACES),
        Some(false)
    );
    let (_, zh) = load(&d, "chinese_sp.model");
    assert_eq!(zh.model_type().unwrap(), ModelType::Unigram);
    assert_eq!(
        zh.normalizer_spec().get_str(normalizer::NAME),
        Some("nmt_nfkc")
    );
}
