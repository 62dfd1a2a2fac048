//! `zhllama export`: an HF LLaMA directory (plus PEFT adapters, merged in order exactly as
//! `merge-lora` merges them) and its SentencePiece tokenizer → one GGUF v3 file that llama.cpp
//! loads as a `llama` model.
//!
//! What llama.cpp expects, and where it differs from the HF layout:
//! - tensor names: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
//!   ffn_gate, ffn_up, ffn_down}`, `output_norm`, `output` (`.weight` each) — [`gguf_name`];
//! - RoPE: llama.cpp rotates adjacent pairs `(2i, 2i+1)` of each head, HF rotates `(i, i + d/2)`
//!   (`rotate_half`), so the rows of `q_proj` and `k_proj` are reordered within each head
//!   ([`permute_qk_rows`]; `k_proj` per key/value head under GQA);
//! - the tokenizer travels as metadata (`tokenizer.ggml.*`, model `llama` = SentencePiece): every
//!   piece, score and piece type, the special ids; a model with one more row than the tokenizer
//!   has pieces gets the `[PAD]` the SFT script adds as that last token.
//!
//! Memory: tensors are read, merged, permuted, converted and written one at a time (the header,
//! with every offset, is known before any tensor is read), so the export holds one tensor in f32
//! plus its encoded bytes, besides the adapters.

pub mod gguf;

use crate::model::config::LlamaConfig;
use crate::model::generate::{ExpectVocab, adapter_vocab};
use crate::model::peft::{Adapter, load_adapter, merge_one};
use crate::model::weights::Checkpoint;
use crate::vocab::Tokenizer;
use crate::vocab::proto::{PieceType, normalizer};
use anyhow::{Context, Result, bail, ensure};
use gguf::{GgmlType, GgufWriter, TensorDesc, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;

/// The element type of the exported 2-D weights (norms always stay f32, as llama.cpp's converter
/// writes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl OutType {
    /// GGUF's `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q8_0 => 7,
            OutType::BF16 => 32,
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            OutType::F32 => GgmlType::F32,
            OutType::F16 => GgmlType::F16,
            OutType::BF16 => GgmlType::BF16,
            OutType::Q8_0 => GgmlType::Q8_0,
        }
    }
}

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub model_dir: PathBuf,
    pub adapter_dirs: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub output: PathBuf,
    pub outtype: OutType,
}

/// What [`export_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub tensors: usize,
    pub vocab: usize,
    pub bytes: u64,
    /// Tensors written as f16 because their rows are not a whole number of Q8_0 blocks.
    pub q8_0_fallbacks: Vec<String>,
}

/// HF tensor name → llama.cpp's, `None` for a name llama.cpp's `llama` architecture has no
/// tensor for.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = match rest {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// The HF names of a model of `cfg`'s shape with their shapes, in the order written to the file.
fn expected_tensors(cfg: &LlamaConfig, has_lm_head: bool) -> Vec<(String, Vec<usize>)> {
    let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim(), cfg.kv_dim());
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("input_layernorm.weight", vec![c]),
            ("self_attn.q_proj.weight", vec![q, c]),
            ("self_attn.k_proj.weight", vec![kv, c]),
            ("self_attn.v_proj.weight", vec![kv, c]),
            ("self_attn.o_proj.weight", vec![c, q]),
            ("post_attention_layernorm.weight", vec![c]),
            ("mlp.gate_proj.weight", vec![i, c]),
            ("mlp.up_proj.weight", vec![i, c]),
            ("mlp.down_proj.weight", vec![c, i]),
        ] {
            out.push((format!("{p}{n}"), s));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![c]));
    if has_lm_head {
        out.push(("lm_head.weight".to_string(), vec![v, c]));
    }
    out
}

/// Reorder the rows of a `[heads·d, cols]` projection from HF's RoPE layout to llama.cpp's: in
/// each head, output row `2i + j` is input row `j·d/2 + i` (`i < d/2`, `j ∈ {0, 1}`), so the pair
/// HF rotates together, `(i, i + d/2)`, becomes the adjacent pair llama.cpp rotates.
pub fn permute_qk_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    assert!(
        heads > 0 && cols > 0 && w.len().is_multiple_of(heads * cols),
        "permute_qk_rows: {} elements do not fit heads={heads} cols={cols}",
        w.len()
    );
    let d = w.len() / heads / cols;
    assert!(d.is_multiple_of(2), "permute_qk_rows: odd head dim {d}");
    let half = d / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let dst = (h * d + 2 * i + j) * cols;
                let src = (h * d + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// llama.cpp's token type of a SentencePiece piece type (the same numbering:
/// normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6).
fn token_type(t: PieceType) -> i32 {
    t as i32
}

/// The `tokenizer.ggml.*` metadata for `tok` with `vocab` tokens (`vocab` is the tokenizer's size,
/// or one more when it has no `[PAD]`: the SFT script's added pad token, a control token).
fn tokenizer_metadata(tok: &Tokenizer, vocab: usize) -> Vec<(String, Value)> {
    let n = tok.vocab_size();
    let mut tokens = Vec::with_capacity(vocab);
    let mut scores = Vec::with_capacity(vocab);
    let mut types = Vec::with_capacity(vocab);
    for id in 0..n as u32 {
        tokens.push(tok.id_to_piece(id).to_string());
        scores.push(tok.score(id));
        types.push(token_type(tok.piece_type(id)));
    }
    let mut pad = tok.pad_id();
    if vocab == n + 1 {
        pad = Some(n as u32);
        tokens.push("[PAD]".to_string());
        scores.push(0.0);
        types.push(token_type(PieceType::Control));
    }
    let ns = tok.model().normalizer_spec();
    let mut m: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::Str("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::ArrStr(tokens)),
        ("tokenizer.ggml.scores".into(), Value::ArrF32(scores)),
        ("tokenizer.ggml.token_type".into(), Value::ArrI32(types)),
    ];
    if let Some(b) = tok.bos_id() {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = tok.eos_id() {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    m.push((
        "tokenizer.ggml.unknown_token_id".into(),
        Value::U32(tok.unk_id()),
    ));
    if let Some(p) = pad {
        m.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(p)));
    }
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tok.bos_id().is_some()),
    ));
    m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    m.push((
        "tokenizer.ggml.add_space_prefix".into(),
        Value::Bool(ns.get_bool(normalizer::ADD_DUMMY_PREFIX).unwrap_or(true)),
    ));
    m
}

/// The whole metadata: `general.*`, the `llama.*` hyper-parameters, the tokenizer.
fn metadata(
    cfg: &LlamaConfig,
    name: &str,
    outtype: OutType,
    tok: &Tokenizer,
) -> Vec<(String, Value)> {
    let u = |x: usize| Value::U32(x as u32);
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str("llama".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(outtype.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
        (
            "llama.context_length".into(),
            u(cfg.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.rope.dimension_count".into(), u(cfg.head_dim())),
        (
            "llama.attention.head_count".into(),
            u(cfg.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(cfg.num_key_value_heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps),
        ),
        ("llama.rope.freq_base".into(), Value::F32(cfg.rope_theta)),
    ];
    m.extend(tokenizer_metadata(tok, cfg.vocab_size));
    m
}

/// Where each adapter tensor goes: the base tensor it changes (`prefix.weight` for a LoRA pair,
/// the tensor itself for a module saved in full). Errors name the adapter and the tensor.
fn adapter_target(name: &str) -> String {
    if let Some(p) = name.strip_suffix(".lora_A.weight") {
        format!("{p}.weight")
    } else if let Some(p) = name.strip_suffix(".lora_B.weight") {
        format!("{p}.weight")
    } else {
        name.to_string()
    }
}

/// Export `opts.model_dir` (+ adapters) with `opts.tokenizer` to the GGUF file `opts.output`,
/// written atomically (temp file + rename).
pub fn export_gguf(opts: &ExportOptions) -> Result<ExportSummary> {
    let model_dir = &opts.model_dir;
    ensure!(
        model_dir.is_dir(),
        "model directory {} does not exist",
        model_dir.display()
    );
    let cpath = model_dir.join("config.json");
    let mut cfg = LlamaConfig::load(&cpath)?;
    let ck = Checkpoint::open(model_dir)?;
    let tok = Tokenizer::load(&opts.tokenizer)
        .with_context(|| format!("cannot load tokenizer {}", opts.tokenizer.display()))?;
    let expect = ExpectVocab::of_tokenizer(&tok, &opts.tokenizer);
    let mut adapters: Vec<Adapter> = Vec::with_capacity(opts.adapter_dirs.len());
    for dir in &opts.adapter_dirs {
        ensure!(
            dir.is_dir(),
            "adapter directory {} does not exist",
            dir.display()
        );
        let ad =
            load_adapter(dir).with_context(|| format!("cannot load adapter {}", dir.display()))?;
        if let Some(v) = adapter_vocab(&ad) {
            ensure!(
                expect.sizes.contains(&v),
                "adapter {} was made for a vocabulary of {v} tokens but tokenizer {} has {} tokens{}",
                dir.display(),
                opts.tokenizer.display(),
                tok.vocab_size(),
                if tok.pad_id().is_none() {
                    " (one more with the [PAD] the SFT script adds)"
                } else {
                    ""
                }
            );
        }
        adapters.push(ad);
    }

    // Final shape of every tensor: the base's, or that of the last adapter saving it in full.
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    for name in ck.names() {
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        shapes.insert(
            name.to_string(),
            ck.info(name).expect("listed").shape.clone(),
        );
    }
    for (ad, dir) in adapters.iter().zip(&opts.adapter_dirs) {
        for (name, (shape, _)) in &ad.tensors {
            let target = adapter_target(name);
            let Some(s) = shapes.get_mut(&target) else {
                bail!(
                    "adapter {}: tensor {name}: the model {} has no {target}",
                    dir.display(),
                    model_dir.display()
                );
            };
            if !name.contains(".lora_") {
                *s = shape.clone();
            }
        }
    }
    let vocab = shapes
        .get("model.embed_tokens.weight")
        .with_context(|| format!("{}: no model.embed_tokens.weight", model_dir.display()))?[0];
    cfg.vocab_size = vocab;
    ensure!(
        expect.sizes.contains(&vocab),
        "model {}{} has a vocabulary of {vocab} tokens but tokenizer {} has {}{}",
        model_dir.display(),
        if adapters.is_empty() {
            ""
        } else {
            " (with its adapters)"
        },
        opts.tokenizer.display(),
        tok.vocab_size(),
        if tok.pad_id().is_none() {
            " (one more with the [PAD] the SFT script adds)"
        } else {
            ""
        }
    );
    let has_lm_head = shapes.contains_key("lm_head.weight");
    ensure!(
        has_lm_head || cfg.tie_word_embeddings,
        "{}: no lm_head.weight and tie_word_embeddings is false",
        model_dir.display()
    );
    let expected = expected_tensors(&cfg, has_lm_head);
    for (name, want) in &expected {
        let got = shapes.get(name).with_context(|| {
            format!(
                "{}: missing tensor {name} (expected shape {want:?})",
                model_dir.display()
            )
        })?;
        ensure!(
            got == want,
            "{}: tensor {name} has shape {got:?} (after the adapters), expected {want:?} from {}",
            model_dir.display(),
            cpath.display()
        );
    }
    if shapes.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let extra = shapes
            .keys()
            .find(|n| !known.contains(n.as_str()))
            .expect("one more");
        bail!(
            "{}: tensor {extra} has no place in llama.cpp's llama architecture",
            model_dir.display()
        );
    }

    let mut descs = Vec::with_capacity(expected.len());
    let mut fallbacks = Vec::new();
    for (name, shape) in &expected {
        let gname = gguf_name(name).expect("every expected name maps");
        let ty = if shape.len() == 1 {
            GgmlType::F32
        } else if opts.outtype == OutType::Q8_0 && !shape[1].is_multiple_of(gguf::QK8_0) {
            // GGML quantizes along rows: a row that is not whole blocks cannot be Q8_0.
            fallbacks.push(gname.clone());
            GgmlType::F16
        } else {
            opts.outtype.ggml()
        };
        descs.push(TensorDesc {
            name: gname,
            shape: shape.clone(),
            ty,
        });
    }
    let name = model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "zhllama".into());
    let meta = metadata(&cfg, &name, opts.outtype, &tok);

    let tmp = crate::util::temp_path(&opts.output);
    // Removed on every error return and on SIGINT/SIGTERM; disarmed once renamed into place.
    let guard = crate::util::TempGuard::new(&tmp);
    let result = (|| -> Result<u64> {
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let sink = std::io::BufWriter::with_capacity(8 << 20, file);
        let mut w = GgufWriter::new(sink, &meta, descs.clone())?;
        let mut bytes = Vec::new();
        for ((hf, shape), desc) in expected.iter().zip(&descs) {
            let data = merged_tensor(&ck, hf, shape, &mut adapters, &opts.adapter_dirs)?;
            check_finite_as(hf, &data, desc.ty, &opts.adapter_dirs)?;
            let data = if hf.ends_with("q_proj.weight") {
                permute_qk_rows(&data, cfg.num_attention_heads, shape[1])
            } else if hf.ends_with("k_proj.weight") {
                permute_qk_rows(&data, cfg.num_key_value_heads, shape[1])
            } else {
                data
            };
            bytes.clear();
            desc.ty.encode(&data, &mut bytes)?;
            drop(data);
            w.write_tensor(&bytes)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        let mut file = w
            .finish()?
            .into_inner()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {}", tmp.display(), e.error()))?;
        file.flush()?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
        Ok(file.metadata()?.len())
    })();
    let bytes = result?;
    std::fs::rename(&tmp, &opts.output).with_context(|| {
        format!(
            "cannot rename {} to {}",
            tmp.display(),
            opts.output.display()
        )
    })?;
    guard.disarm();
    Ok(ExportSummary {
        tensors: descs.len(),
        vocab,
        bytes,
        q8_0_fallbacks: fallbacks,
    })
}

/// Refuse a tensor that is not finite after the adapters, or that would not be once stored as
/// `ty` (f16 overflows past 65504; a Q8_0 block keeps its scale `max|x|/127` in f16). The base's
/// own values were checked when read, so a value here names the adapters as the cause.
fn check_finite_as(hf: &str, data: &[f32], ty: GgmlType, adapters: &[PathBuf]) -> Result<()> {
    let ok = |x: f32| match ty {
        GgmlType::F32 => x.is_finite(),
        GgmlType::F16 => half::f16::from_f32(x).is_finite(),
        GgmlType::BF16 => half::bf16::from_f32(x).is_finite(),
        GgmlType::Q8_0 => x.is_finite() && half::f16::from_f32(x / 127.0).is_finite(),
    };
    if let Some(i) = data.iter().position(|&x| !ok(x)) {
        bail!(
            "tensor {hf} has a non-finite value at element {i} ({} in f32, written as {ty:?}){}",
            data[i],
            if adapters.is_empty() {
                String::new()
            } else {
                format!(
                    " after merging adapter {}",
                    adapters
                        .iter()
                        .map(|a| a.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
    Ok(())
}

/// Tensor `hf` read from `ck` with every adapter's changes to it applied in order (through
/// `merge_one`, the `merge-lora` code, on a map holding just this tensor). The adapter tensors
/// used are moved out of `adapters`, so each is held only until its base tensor is written.
fn merged_tensor(
    ck: &Checkpoint,
    hf: &str,
    shape: &[usize],
    adapters: &mut [Adapter],
    dirs: &[PathBuf],
) -> Result<Vec<f32>> {
    let base = ck.read(hf)?;
    ck.release(hf);
    let mut one = HashMap::from([(hf.to_string(), base)]);
    for (ad, dir) in adapters.iter_mut().zip(dirs) {
        let names: Vec<String> = ad
            .tensors
            .keys()
            .filter(|n| adapter_target(n) == hf)
            .cloned()
            .collect();
        if names.is_empty() {
            continue;
        }
        let mut part = BTreeMap::new();
        for n in names {
            let t = ad.tensors.remove(&n).expect("listed");
            part.insert(n, t);
        }
        let sub = Adapter {
            config: ad.config.clone(),
            tensors: part,
        };
        merge_one(&mut one, &sub)
            .with_context(|| format!("cannot merge adapter {} into {hf}", dir.display()))?;
    }
    let (s, data) = one.remove(hf).expect("inserted");
    ensure!(
        s == shape,
        "tensor {hf}: shape {s:?} after merging, expected {shape:?}"
    );
    Ok(data)
}
