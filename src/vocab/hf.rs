//! HF files for a merged LLaMA-style SentencePiece model: `tokenizer.json` (what transformers'
//! `LlamaConverter` builds for `LlamaTokenizerFast` with `legacy=True`), `tokenizer_config.json`
//! and `special_tokens_map.json` (what `LlamaTokenizer.save_pretrained` writes).
//!
//! The `tokenizer.json` is a faithful description of the model in HF's terms (BPE with byte
//! fallback, merges derived from the pieces the way HF's `SentencePieceExtractor` does), but HF's
//! rank-based BPE does not reproduce sentencepiece's ids once many pieces share a score
//! (docs/RECIPE.md §1). zhllama itself always encodes with [`super::Tokenizer`].

use super::encode::SPACE;
use super::proto::{ModelProto, PieceType, trainer};
use anyhow::{Result, bail};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt::Write;

/// Merges as `transformers.convert_slow_tokenizer.SentencePieceExtractor.extract(vocab_scores)`:
/// for every piece (in id order), every split into two pieces of the vocabulary, sorted within a
/// piece by (id of left, id of right); then all merges stably sorted by the piece's score,
/// highest first. `vocab_scores` as `LlamaConverter.vocab`: the first three pieces get score 0.
pub fn derive_merges(model: &ModelProto) -> Vec<(String, String)> {
    let vocab: HashMap<&str, usize> = model
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    let mut local: Vec<(usize, usize)> = Vec::new();
    for (i, p) in model.pieces.iter().enumerate() {
        let score = if i < 3 { 0.0 } else { p.score() };
        local.clear();
        let s = p.piece.as_str();
        for (at, _) in s.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&s[..at]), vocab.get(&s[at..])) {
                local.push((l, r));
            }
        }
        local.sort();
        merges.extend(local.iter().map(|&(l, r)| (l, r, score)));
    }
    // Stable sort, descending score: equal scores keep the order above.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (model.pieces[l].piece.clone(), model.pieces[r].piece.clone()))
        .collect()
}

fn special_piece(model: &ModelProto, field: u32, default: &str) -> Option<(usize, String)> {
    let ts = model.trainer_spec();
    let s = ts.get_str(field).unwrap_or(default);
    model
        .pieces
        .iter()
        .position(|p| p.piece == s)
        .map(|i| (i, s.to_string()))
}

/// `tokenizer.json` text for `model` (a BPE model with byte fallback, LLaMA-style).
pub fn tokenizer_json(model: &ModelProto) -> Result<String> {
    if model.model_type()? != super::proto::ModelType::Bpe {
        bail!("tokenizer.json export supports BPE models only");
    }
    let byte_fallback = model
        .trainer_spec()
        .get_bool(trainer::BYTE_FALLBACK)
        .unwrap_or(false);
    let unk = special_piece(model, trainer::UNK_PIECE, "<unk>");
    let bos = special_piece(model, trainer::BOS_PIECE, "<s>");
    let eos = special_piece(model, trainer::EOS_PIECE, "</s>");
    let Some((unk_id, unk_s)) = unk else {
        bail!("model has no unknown piece")
    };
    let mut added = Vec::new();
    for (id, s) in [Some((unk_id, unk_s.clone())), bos.clone(), eos.clone()]
        .into_iter()
        .flatten()
    {
        added.push(
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
        );
    }
    // Control/unknown pieces other than these are also special added tokens in HF's converter.
    for (i, p) in model.pieces.iter().enumerate() {
        let t = p.piece_type();
        let listed = [
            Some(unk_id),
            bos.as_ref().map(|b| b.0),
            eos.as_ref().map(|e| e.0),
        ]
        .contains(&Some(i));
        if !listed && matches!(t, PieceType::Control | PieceType::UserDefined) {
            added.push(json!({"id": i, "content": p.piece, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false,
                "special": t == PieceType::Control}));
        }
    }
    let (single, pair, specials) = match &bos {
        Some((id, s)) => (
            json!([{"SpecialToken": {"id": s, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]),
            json!([{"SpecialToken": {"id": s, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": s, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]),
            json!({ s.as_str(): {"id": s, "ids": [id], "tokens": [s]} }),
        ),
        None => (
            json!([{"Sequence": {"id": "A", "type_id": 0}}]),
            json!([{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]),
            json!({}),
        ),
    };
    let head = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": specials},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    });
    // The model part is written by hand so the vocab stays in id order (as HF writes it).
    let mut out = serde_json::to_string_pretty(&head)?;
    out.truncate(out.trim_end().len() - 1); // drop the closing brace
    let q = |s: &str| serde_json::to_string(s).unwrap();
    write!(
        out,
        ",\n  \"model\": {{\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": {},\n    \
         \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n    \
         \"fuse_unk\": true,\n    \"byte_fallback\": {byte_fallback},\n    \
         \"ignore_merges\": false,\n    \"vocab\": {{",
        q(&unk_s)
    )?;
    for (i, p) in model.pieces.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        write!(out, "{sep}\n      {}: {i}", q(&p.piece))?;
    }
    out.push_str("\n    },\n    \"merges\": [");
    for (i, (l, r)) in derive_merges(model).iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        write!(out, "{sep}\n      [{}, {}]", q(l), q(r))?;
    }
    out.push_str("\n    ]\n  }\n}\n");
    Ok(out)
}

fn added_token(s: &str) -> Value {
    json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false,
        "single_word": false, "special": true})
}

/// `tokenizer_config.json` as `LlamaTokenizer.save_pretrained` writes it (legacy behaviour),
/// with `pad_token` = `[PAD]` when the model has that piece (Chinese-Alpaca).
pub fn tokenizer_config_json(model: &ModelProto) -> Result<String> {
    let mut decoder = serde_json::Map::new();
    let mut specials = Vec::new();
    for (field, default) in [
        (trainer::UNK_PIECE, "<unk>"),
        (trainer::BOS_PIECE, "<s>"),
        (trainer::EOS_PIECE, "</s>"),
    ] {
        specials.push(special_piece(model, field, default));
    }
    let pad = model
        .pieces
        .iter()
        .position(|p| p.piece == "[PAD]")
        .map(|i| (i, "[PAD]".to_string()));
    for (id, s) in specials.iter().chain([&pad]).flatten() {
        decoder.insert(id.to_string(), added_token(s));
    }
    let name = |o: &Option<(usize, String)>| o.as_ref().map(|x| x.1.clone());
    let cfg = json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "bos_token": name(&specials[1]),
        "clean_up_tokenization_spaces": false,
        "eos_token": name(&specials[2]),
        "legacy": true,
        "model_max_length": 1e30,
        "pad_token": name(&pad),
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": name(&specials[0]),
    });
    Ok(serde_json::to_string_pretty(&cfg)? + "\n")
}

/// `special_tokens_map.json`: bos/eos/unk, plus pad when the model has `[PAD]`.
pub fn special_tokens_map_json(model: &ModelProto) -> Result<String> {
    let mut m = serde_json::Map::new();
    for (key, field, default) in [
        ("bos_token", trainer::BOS_PIECE, "<s>"),
        ("eos_token", trainer::EOS_PIECE, "</s>"),
        ("unk_token", trainer::UNK_PIECE, "<unk>"),
    ] {
        if let Some((_, s)) = special_piece(model, field, default) {
            m.insert(key.to_string(), added_token(&s));
        }
    }
    if model.pieces.iter().any(|p| p.piece == "[PAD]") {
        m.insert("pad_token".to_string(), added_token("[PAD]"));
    }
    Ok(serde_json::to_string_pretty(&Value::Object(m))? + "\n")
}
