//! `zhllama generate` end to end on a tiny random model saved to a temp dir, with a tokenizer
//! trained by the project's own vocab trainer: its text equals an independent greedy reference
//! (full forward each step, no cache, decoded once at the end); `--adapter` equals generating
//! from the `merge-lora` output; every bad input is a one-line error and a non-zero exit.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::data::sft::Template;
use zhllama::model::generate::{SamplingConfig, StreamDecoder, generate_text, load_merged};
use zhllama::model::{Activations, Llama, LlamaConfig, SaveOptions, TrainSpec};
use zhllama::tensor::DType;
use zhllama::vocab::proto::ModelType;
use zhllama::vocab::{Tokenizer, TrainOptions};

const CORPUS: &[&str] = &[
    "the quick brown fox jumps over the lazy dog",
    "a small model writes a short answer",
    "我们今天学习中文和英文",
    "模型生成的文本应该完整输出",
    "hello world, 你好世界",
    "numbers like 12 and 345 appear too",
];

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    tok_path: PathBuf,
    model_dir: PathBuf,
    vocab: usize,
}

fn f32_opts() -> SaveOptions {
    SaveOptions {
        dtype: DType::F32,
        max_shard_bytes: None,
    }
}

fn tiny_config(vocab: usize) -> LlamaConfig {
    let mut cfg = LlamaConfig::new(vocab, 32, 64, 2, 4, 2);
    // Spread-out logits (see greedy_reference's margin check).
    cfg.initializer_range = 0.35;
    cfg
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (proto, _) = zhllama::vocab::train(
        CORPUS,
        &TrainOptions {
            vocab_size: 320,
            model_type: ModelType::Bpe,
            character_coverage: 1.0,
            byte_fallback: true,
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let tok_path = root.join("tok.model");
    std::fs::write(&tok_path, proto.to_bytes()).unwrap();
    let vocab = Tokenizer::load(&tok_path).unwrap().vocab_size();
    let model_dir = root.join("model");
    let m = Llama::random(
        Arc::new(CpuBackend::new()),
        tiny_config(vocab),
        TrainSpec::frozen(),
        11,
    )
    .unwrap();
    m.save_hf(&model_dir, f32_opts()).unwrap();
    Fixture {
        _dir: dir,
        root,
        tok_path,
        model_dir,
        vocab,
    }
}

fn zhllama(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Greedy text by recomputing the full forward over the whole prefix each step (no cache), the
/// prompt built by hand from the template string: `[BOS] + encode(text)`.
fn greedy_reference(model_dir: &Path, tok: &Tokenizer, text: &str, n: usize) -> String {
    let m = Llama::from_dir(Arc::new(CpuBackend::new()), model_dir, TrainSpec::frozen()).unwrap();
    let v = m.config().vocab_size;
    let mut seq: Vec<u32> = vec![tok.bos_id().unwrap()];
    seq.extend(tok.encode(text));
    let start = seq.len();
    for _ in 0..n {
        let mut acts = Activations::new_inference(&m, 1, seq.len()).unwrap();
        let ids: Vec<i32> = seq.iter().map(|&i| i as i32).collect();
        m.forward_logits(&mut acts, &ids).unwrap();
        let mut l = vec![0.0; seq.len() * v];
        m.backend().download(acts.logits(), &mut l).unwrap();
        let last = &l[(seq.len() - 1) * v..];
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        // The cached path differs from this one by f32 rounding (~1e-6 of the logit scale, see
        // generate_model.rs); a top-1 margin above 1e-3 makes the greedy choice unambiguous.
        assert!(
            last[order[0]] - last[order[1]] > 1e-3,
            "near-tie in the reference: the test model is too flat"
        );
        let best = order[0] as u32;
        if Some(best) == tok.eos_id() {
            break;
        }
        seq.push(best);
    }
    tok.decode(&seq[start..])
}

fn alpaca(instruction: &str) -> String {
    zhllama::data::sft::PROMPT_TEMPLATE.replace("{instruction}", instruction)
}

#[test]
fn end_to_end_prompt_input_and_interactive() {
    let f = fixture();
    let tok = Tokenizer::load(&f.tok_path).unwrap();
    let n = 12;
    let base = [
        "generate",
        "--model",
        s(&f.model_dir),
        "--tokenizer",
        s(&f.tok_path),
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--max-new-tokens",
        "12",
    ];
    // --prompt, raw and alpaca templates.
    for (template, text) in [
        ("raw", "hello world".to_string()),
        ("alpaca", alpaca("你好世界")),
    ] {
        let prompt = if template == "raw" {
            "hello world"
        } else {
            "你好世界"
        };
        let mut args = base.to_vec();
        args.extend(["--template", template, "--prompt", prompt]);
        let (code, out, err) = zhllama(&args, "");
        assert_eq!(code, 0, "{err}");
        let want = greedy_reference(&f.model_dir, &tok, &text, n);
        eprintln!("{template}: {out:?}");
        assert_eq!(out, format!("{want}\n"), "template {template}");
    }
    // The library's one-call form (what the demo uses) gives the same text.
    let enc = zhllama::data::TokenizerEncoder::load(&f.tok_path).unwrap();
    let model = load_merged(Arc::new(CpuBackend::new()), &f.model_dir, &[], None).unwrap();
    let got = generate_text(
        &model,
        &enc,
        "你好世界",
        Template::Alpaca,
        &SamplingConfig::greedy(n),
    )
    .unwrap();
    assert_eq!(
        got,
        greedy_reference(&f.model_dir, &tok, &alpaca("你好世界"), n)
    );
    // --input: one output line per prompt line (newlines inside escaped).
    let prompts = ["the quick brown fox", "我们今天", "numbers like 12"];
    let input = f.root.join("prompts.txt");
    std::fs::write(&input, prompts.join("\n") + "\n").unwrap();
    let mut args = base.to_vec();
    args.extend(["--input", s(&input)]);
    let (code, out, err) = zhllama(&args, "");
    assert_eq!(code, 0, "{err}");
    let want: Vec<String> = prompts
        .iter()
        .map(|p| greedy_reference(&f.model_dir, &tok, &alpaca(p), n).replace('\n', "\\n"))
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    // Interactive: prompts on stdin, raw template.
    let mut args = base.to_vec();
    args.extend(["--template", "raw"]);
    let (code, out, err) = zhllama(&args, "hello\n模型\n");
    assert_eq!(code, 0, "{err}");
    let want = format!(
        "{}\n{}\n",
        greedy_reference(&f.model_dir, &tok, "hello", n),
        greedy_reference(&f.model_dir, &tok, "模型", n)
    );
    assert_eq!(out, want);
    // Sampling with a seed is reproducible through the CLI.
    let sample = |seed: &str| {
        zhllama(
            &[
                "generate",
                "--model",
                s(&f.model_dir),
                "--tokenizer",
                s(&f.tok_path),
                "--temperature",
                "1.0",
                "--top-k",
                "50",
                "--top-p",
                "0.95",
                "--seed",
                seed,
                "--prompt",
                "hello",
            ],
            "",
        )
    };
    let (c1, o1, _) = sample("3");
    let (c2, o2, _) = sample("3");
    assert!(c1 == 0 && c2 == 0);
    assert_eq!(o1, o2);
}

/// Streaming deltas of byte-fallback text: concatenated they are the full decode, and no delta
/// carries a broken (U+FFFD) character.
#[test]
fn stream_decoder_emits_whole_characters() {
    let f = fixture();
    let tok = Tokenizer::load(&f.tok_path).unwrap();
    // 鱷 and 🦀 are not in the training corpus: they encode as byte pieces (3 and 4 bytes).
    let text = "hello 鱷 world 🦀 你好";
    let ids = tok.encode(text);
    let bytes = ids
        .iter()
        .filter(|&&i| tok.id_to_piece(i).starts_with("<0x"))
        .count();
    assert!(bytes >= 7, "expected byte-fallback pieces, got {bytes}");
    let mut dec = StreamDecoder::new(&tok);
    let mut all = String::new();
    for &id in &ids {
        let d = dec.push(id);
        assert!(!d.contains('\u{FFFD}'), "broken character in delta {d:?}");
        all += &d;
    }
    all += &dec.finish();
    assert_eq!(all, tok.decode(&ids));
    assert_eq!(all, text);
}

/// Write a PEFT adapter by hand: `tensors` under `base_model.model.` + `adapter_config.json`.
fn write_adapter(
    dir: &Path,
    r: usize,
    alpha: f32,
    modules_to_save: &[&str],
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, sh, d)| {
            (
                format!("base_model.model.{n}"),
                sh.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, sh.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(
        views,
        Some(HashMap::from([("format".into(), "pt".into())])),
        &dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    // target_modules: the projections that have LoRA factors (a PEFT adapter has no others)
    let targets: Vec<&str> = ["q_proj", "down_proj"]
        .into_iter()
        .filter(|m| {
            tensors
                .iter()
                .any(|(n, _, _)| n.contains(&format!("{m}.lora_A")))
        })
        .collect();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": targets,
        "modules_to_save": modules_to_save, "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

fn pseudo(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let x = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(97)) % 1000;
            (x as f32 / 500.0 - 1.0) * scale
        })
        .collect()
}

/// The base model's directory with `W += (alpha/r)·B·A` applied to each named linear weight,
/// computed here in f64 straight on the safetensors file (independent of `peft::merge_one`).
fn merge_by_hand(base: &Path, out: &Path, scale: f64, pairs: &[(&str, &[f32], &[f32], usize)]) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(base.join("config.json"), out.join("config.json")).unwrap();
    let bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let shape = view.shape().to_vec();
        let mut w: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        if let Some((_, a, b, r)) = pairs.iter().find(|(n, ..)| name == format!("{n}.weight")) {
            let (rows, cols) = (shape[0], shape[1]);
            assert_eq!((a.len(), b.len()), (r * cols, rows * r), "{name}");
            for i in 0..rows {
                for j in 0..cols {
                    let d: f64 = (0..*r)
                        .map(|k| b[i * r + k] as f64 * a[k * cols + j] as f64)
                        .sum();
                    w[i * cols + j] = (w[i * cols + j] as f64 + scale * d) as f32;
                }
            }
        }
        tensors.push((
            name,
            shape,
            w.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, sh.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(
        views,
        Some(HashMap::from([("format".into(), "pt".into())])),
        &out.join("model.safetensors"),
    )
    .unwrap();
}

/// An adapter of LoRA pairs only (no replaced embedding or lm_head): `--adapter` generates the
/// text of an independent greedy reference over the base weights merged by hand, the same as
/// generating from `merge-lora`'s output, and not the base model's text.
#[test]
fn adapter_equals_merge_lora_output() {
    let f = fixture();
    let (c, fsz, r, alpha) = (32, 64, 4, 8.0f32);
    let qa = pseudo(r * c, 1, 0.5);
    let qb = pseudo(c * r, 2, 0.5);
    let da = pseudo(r * fsz, 3, 0.5);
    let db = pseudo(c * r, 4, 0.5);
    let adapter = f.root.join("adapter");
    write_adapter(
        &adapter,
        r,
        alpha,
        &[],
        &[
            (
                "model.layers.0.self_attn.q_proj.lora_A.weight",
                vec![r, c],
                qa.clone(),
            ),
            (
                "model.layers.0.self_attn.q_proj.lora_B.weight",
                vec![c, r],
                qb.clone(),
            ),
            (
                "model.layers.1.mlp.down_proj.lora_A.weight",
                vec![r, fsz],
                da.clone(),
            ),
            (
                "model.layers.1.mlp.down_proj.lora_B.weight",
                vec![c, r],
                db.clone(),
            ),
        ],
    );
    let hand = f.root.join("hand");
    merge_by_hand(
        &f.model_dir,
        &hand,
        alpha as f64 / r as f64,
        &[
            ("model.layers.0.self_attn.q_proj", &qa, &qb, r),
            ("model.layers.1.mlp.down_proj", &da, &db, r),
        ],
    );
    let merged = f.root.join("merged");
    let (code, _, err) = zhllama(
        &[
            "merge-lora",
            "--base",
            s(&f.model_dir),
            "--adapter",
            s(&adapter),
            "--output",
            s(&merged),
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let n = 10;
    let run_gen = |model: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "generate",
            "--model",
            s(model),
            "--tokenizer",
            s(&f.tok_path),
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
            "--template",
            "raw",
            "--max-new-tokens",
            "10",
            "--prompt",
            "hello world",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        let (code, out, err) = zhllama(&args, "");
        assert_eq!(code, 0, "{err}");
        out
    };
    let tok = Tokenizer::load(&f.tok_path).unwrap();
    let with_adapter = run_gen(&f.model_dir, Some(&adapter));
    let want = greedy_reference(&hand, &tok, "hello world", n);
    assert_eq!(
        with_adapter,
        format!("{want}\n"),
        "--adapter vs merged by hand"
    );
    assert_eq!(
        with_adapter,
        run_gen(&merged, None),
        "--adapter vs merge-lora"
    );
    // The LoRA pairs alone change the text: the base model's differs.
    let base = greedy_reference(&f.model_dir, &tok, "hello world", n);
    assert_eq!(run_gen(&f.model_dir, None), format!("{base}\n"));
    assert_ne!(
        want, base,
        "the adapter's LoRA pairs do not change the greedy text"
    );
}

/// Run `generate` expecting failure: non-zero exit, exactly one stderr line, containing `needles`.
fn fails(args: &[&str], needles: &[&str]) {
    let mut full = vec!["generate"];
    full.extend(args);
    let (code, out, err) = zhllama(&full, "");
    eprintln!("{err}");
    assert_ne!(code, 0, "{full:?} succeeded: {out}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{err:?} does not mention {n:?}");
    }
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let f = fixture();
    let (m, t) = (s(&f.model_dir), s(&f.tok_path));
    let missing = f.root.join("nope");
    let ms = s(&missing);
    fails(&["--model", ms, "--tokenizer", t, "--prompt", "x"], &[ms]);
    fails(
        &[
            "--model",
            m,
            "--tokenizer",
            t,
            "--adapter",
            ms,
            "--prompt",
            "x",
        ],
        &[ms],
    );
    fails(&["--model", m, "--tokenizer", ms, "--prompt", "x"], &[ms]);
    // An adapter whose embedding/lm_head were made for another vocabulary: both sizes named.
    let c = 32;
    let other = f.vocab + 5;
    let adapter = f.root.join("other_vocab");
    write_adapter(
        &adapter,
        4,
        8.0,
        &["embed_tokens", "lm_head"],
        &[
            (
                "model.embed_tokens.weight",
                vec![other, c],
                vec![0.0; other * c],
            ),
            ("lm_head.weight", vec![other, c], vec![0.0; other * c]),
        ],
    );
    fails(
        &[
            "--model",
            m,
            "--tokenizer",
            t,
            "--adapter",
            s(&adapter),
            "--prompt",
            "x",
        ],
        &[s(&adapter), &other.to_string(), &f.vocab.to_string()],
    );
    // A model whose vocabulary is not the tokenizer's: both sizes named.
    let big = f.root.join("big_model");
    let wrong = f.vocab + 7;
    let mb = Llama::random(
        Arc::new(CpuBackend::new()),
        tiny_config(wrong),
        TrainSpec::frozen(),
        1,
    )
    .unwrap();
    mb.save_hf(&big, f32_opts()).unwrap();
    fails(
        &["--model", s(&big), "--tokenizer", t, "--prompt", "x"],
        &[&wrong.to_string(), &f.vocab.to_string()],
    );
    // A file that is not a model directory, and a corrupt adapter.
    let junk = f.root.join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    fails(
        &["--model", s(&junk), "--tokenizer", t, "--prompt", "x"],
        &[s(&junk)],
    );
    let bad_ad = f.root.join("bad_adapter");
    std::fs::create_dir_all(&bad_ad).unwrap();
    std::fs::write(bad_ad.join("adapter_config.json"), "{").unwrap();
    fails(
        &[
            "--model",
            m,
            "--tokenizer",
            t,
            "--adapter",
            s(&bad_ad),
            "--prompt",
            "x",
        ],
        &[s(&bad_ad)],
    );
    // Invalid sampling settings.
    fails(
        &[
            "--model",
            m,
            "--tokenizer",
            t,
            "--top-p",
            "0",
            "--prompt",
            "x",
        ],
        &["top_p"],
    );
}
