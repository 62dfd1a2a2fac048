//! The vocabulary resize at model load (docs/RECIPE.md §1): LLaMA's 32000 rows grow to the merged
//! tokenizer's 49953 with the mean-of-old-pieces init; disallowed pairs are a clear error.
//! Uses the real tokenizers from ../shared/data (skipped when absent).

mod skip_common;

mod train_common;

use std::path::Path;
use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::setup::{self, ResizeTokenizers};
use zhllama::vocab::{ModelProto, Tokenizer, merge_models};

fn tokenizers() -> Option<(Tokenizer, Tokenizer)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tokenizers");
    if !dir.join("llama_tokenizer.model").exists() {
        skip_common::skip(&format!(
            "../shared data absent: {} not found",
            dir.display()
        ));
        return None;
    }
    let llama = Tokenizer::load(&dir.join("llama_tokenizer.model")).unwrap();
    let mut merged: ModelProto = llama.model().clone();
    let zh = Tokenizer::load(&dir.join("chinese_sp.model")).unwrap();
    merge_models(&mut merged, zh.model(), false);
    Some((llama, Tokenizer::from_model(merged).unwrap()))
}

#[test]
fn llama_32000_resizes_to_49953_with_mean_of_pieces() {
    let Some((llama, merged)) = tokenizers() else {
        return;
    };
    assert_eq!(merged.vocab_size(), 49953);
    let tmp = tempfile::tempdir().unwrap();
    let dir = train_common::tiny_model(&tmp.path().join("m"), 32000, 5);
    let cfg = TrainConfig::preset(Stage::Pt1);
    let be = Arc::new(CpuBackend::new());
    let base = zhllama::model::weights::Checkpoint::open(&dir).unwrap();
    let (_, old_emb) = base.read("model.embed_tokens.weight").unwrap();
    let (_, old_head) = base.read("lm_head.weight").unwrap();
    // With the original tokenizer given, and derived from the merged one: the same rows.
    for old in [Some(&llama), None] {
        let toks = ResizeTokenizers { new: &merged, old };
        let m = setup::load_model(be.clone(), &dir, &cfg, Stage::Pt1, 49953, Some(toks)).unwrap();
        assert_eq!(m.config().vocab_size, 49953);
        let host = m.download_params().unwrap();
        let emb = host.get("model.embed_tokens.weight").unwrap();
        let head = host.get("lm_head.weight").unwrap();
        let c = 32;
        assert_eq!(emb.len(), 49953 * c);
        assert_eq!(&emb[..32000 * c], &old_emb[..], "old rows unchanged");
        assert_eq!(&head[..32000 * c], &old_head[..]);
        // A new piece's row is the mean of the rows of its split by the original tokenizer.
        for id in [32000u32, 40000, 49952] {
            let piece = merged.id_to_piece(id);
            let src = llama.encode_normalized(piece);
            assert!(!src.is_empty() && src.iter().all(|&s| s < 32000), "{piece}");
            for (table, old_t) in [(emb, &old_emb), (head, &old_head)] {
                let row = &table[id as usize * c..(id as usize + 1) * c];
                for j in 0..c {
                    let mean = src
                        .iter()
                        .map(|&s| old_t[s as usize * c + j] as f64)
                        .sum::<f64>()
                        / src.len() as f64;
                    // f64 mean rounded once to f32
                    assert!((row[j] as f64 - mean).abs() <= 1e-7 * mean.abs().max(1e-3));
                }
            }
        }
    }
}

#[test]
fn disallowed_vocab_pairs_name_both_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = train_common::tiny_model(&tmp.path().join("m"), 64, 5);
    let be = Arc::new(CpuBackend::new());
    let cfg = TrainConfig::preset(Stage::Pt2);
    let err = format!(
        "{:#}",
        setup::load_model(be, &dir, &cfg, Stage::Pt2, 100, None)
            .err()
            .unwrap()
    );
    assert!(err.contains("64") && err.contains("100"), "{err}");
    for (m, t, stage, ok) in [
        (32000, 49953, Stage::Pt1, true),
        (32000, 32000, Stage::Pt2, true),
        (49953, 49953, Stage::Pt2, true),
        (49954, 49954, Stage::Sft, true),
        (49953, 49954, Stage::Sft, true),
        (32000, 49954, Stage::Pt1, false),
        (49953, 32000, Stage::Pt2, false),
        (32000, 50000, Stage::Sft, false),
    ] {
        assert_eq!(
            setup::check_vocab_pair(stage, m, t).is_ok(),
            ok,
            "{m} → {t} ({stage})"
        );
    }
}
