//! `zhllama export` (GGUF for llama.cpp):
//! - the GGUF file read back by llama.cpp's own `gguf` Python package equals, key for key and
//!   byte for byte, what `tools/oracle/gguf_check.py` rebuilds from the inputs without zhllama
//!   code (every outtype; GQA; the SFT `[PAD]`; a bf16 base; the Q8_0 → f16 fallback);
//! - Q8_0 blocks follow GGML's reference quantizer (a hand-worked block, and the round-trip bound);
//! - the Q/K row permutation turns HF's RoPE (`rotate_half`) into llama.cpp's adjacent-pair RoPE;
//! - `--adapter` gives the same file, byte for byte, as exporting the `merge-lora` output;
//! - bad inputs are one-line errors naming the path/tensor, and leave no file behind.
//!
//! The Python oracle runs from `.venv/gguf-oracle` (tools/test.sh makes it) or
//! `$ZHLLAMA_GGUF_PYTHON`; without it the oracle test skips through `tests/skip_common` (a failure
//! under `ZHLLAMA_REQUIRE_ALL=1`, as CI runs).

mod skip_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::export::gguf::{QK8_0, dequantize_q8_0, quantize_q8_0_block};
use zhllama::export::{ExportOptions, OutType, export_gguf, permute_qk_rows};
use zhllama::model::{Llama, LlamaConfig, SaveOptions, TrainSpec};
use zhllama::tensor::DType;
use zhllama::vocab::proto::ModelType;
use zhllama::vocab::{Tokenizer, TrainOptions};

const CORPUS: &[&str] = &[
    "the quick brown fox jumps over the lazy dog",
    "a small model writes a short answer",
    "我们今天学习中文和英文",
    "模型生成的文本应该完整输出",
    "hello world, 你好世界",
];

/// A tokenizer trained by the project's BPE trainer (no `[PAD]` piece), in `dir/tok.model`.
fn tiny_tokenizer(dir: &Path) -> (PathBuf, usize) {
    let (proto, _) = zhllama::vocab::train(
        CORPUS,
        &TrainOptions {
            vocab_size: 340,
            model_type: ModelType::Bpe,
            character_coverage: 1.0,
            byte_fallback: true,
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let p = dir.join("tok.model");
    std::fs::write(&p, proto.to_bytes()).unwrap();
    let n = Tokenizer::load(&p).unwrap().vocab_size();
    (p, n)
}

fn save_random(dir: &Path, cfg: LlamaConfig, dtype: DType, seed: u64) {
    let m = Llama::random(Arc::new(CpuBackend::new()), cfg, TrainSpec::frozen(), seed).unwrap();
    m.save_hf(
        dir,
        SaveOptions {
            dtype,
            max_shard_bytes: None,
        },
    )
    .unwrap();
}

fn export(model: &Path, adapters: &[PathBuf], tok: &Path, out: &Path, t: OutType) {
    export_gguf(&ExportOptions {
        model_dir: model.to_path_buf(),
        adapter_dirs: adapters.to_vec(),
        tokenizer: tok.to_path_buf(),
        output: out.to_path_buf(),
        outtype: t,
    })
    .unwrap();
}

fn oracle_python() -> Option<String> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/gguf-oracle/bin/python");
    let mut cands = Vec::new();
    if let Ok(p) = std::env::var("ZHLLAMA_GGUF_PYTHON") {
        cands.push(p);
    }
    cands.push(venv.display().to_string());
    cands.push("python3".into());
    for c in cands {
        let ok = Command::new(&c)
            .args([
                "-c",
                "import gguf, numpy; from sentencepiece import sentencepiece_model_pb2",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(c);
        }
    }
    let msg = "no python with gguf, numpy, sentencepiece + protobuf (run tools/test.sh, or pip \
               install -r tools/oracle/gguf_requirements.txt)";
    skip_common::skip(msg);
    None
}

fn run_oracle(py: &str, gguf: &Path, model: &Path, tok: &Path, t: &str) {
    let o = Command::new(py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/oracle/gguf_check.py"))
        .args([
            "--gguf",
            s(gguf),
            "--model",
            s(model),
            "--tokenizer",
            s(tok),
        ])
        .args(["--outtype", t])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    println!(
        "{} {t}: {}",
        model.display(),
        out.lines().last().unwrap_or("")
    );
    assert!(
        o.status.success(),
        "gguf_check.py on {} ({t}) failed:\n{out}\n{}",
        gguf.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn gguf_reader_oracle_equals_inputs() {
    let Some(py) = oracle_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (tok, n) = tiny_tokenizer(dir.path());
    // GQA (4 heads, 2 kv heads, head dim 16), one more row than the tokenizer (the SFT [PAD]),
    // stored in bf16 as the recipe's checkpoints are.
    let gqa = dir.path().join("gqa");
    let mut cfg = LlamaConfig::new(n + 1, 64, 96, 2, 4, 2);
    cfg.rms_norm_eps = 1e-5;
    cfg.rope_theta = 5e5;
    cfg.max_position_embeddings = 512;
    save_random(&gqa, cfg, DType::BF16, 3);
    for (t, name) in [
        (OutType::F32, "f32"),
        (OutType::F16, "f16"),
        (OutType::BF16, "bf16"),
        (OutType::Q8_0, "q8_0"),
    ] {
        let out = dir.path().join(format!("gqa-{name}.gguf"));
        export(&gqa, &[], &tok, &out, t);
        run_oracle(&py, &out, &gqa, &tok, name);
    }
    // Hidden 48: rows of 48 are not whole Q8_0 blocks, so q8_0 falls back to f16 for the matrices
    // whose rows are 48 long; f32 storage, vocab equal to the tokenizer's, tied embeddings off.
    let odd = dir.path().join("odd");
    save_random(&odd, LlamaConfig::new(n, 48, 64, 1, 4, 4), DType::F32, 5);
    let out = dir.path().join("odd-q8_0.gguf");
    export(&odd, &[], &tok, &out, OutType::Q8_0);
    run_oracle(&py, &out, &odd, &tok, "q8_0");
}

/// The merged Chinese-LLaMA tokenizer (49953 pieces, 17953 appended at score 0) and the
/// Chinese-Alpaca one (49954, with `[PAD]`), built from the shared LLaMA and Chinese models.
#[test]
fn gguf_reader_oracle_merged_chinese_vocab() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tokenizers");
    if !shared.is_dir() {
        println!("SKIP: {} not found", shared.display());
        return;
    }
    let Some(py) = oracle_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (add_pad, want) in [(false, 49953usize), (true, 49954)] {
        let tdir = dir.path().join(format!("tok-{add_pad}"));
        zhllama::vocab::merge_tokenizers(
            &shared.join("llama_tokenizer.model"),
            &shared.join("chinese_sp.model"),
            &tdir,
            add_pad,
        )
        .unwrap();
        let tok = tdir.join("tokenizer.model");
        assert_eq!(Tokenizer::load(&tok).unwrap().vocab_size(), want);
        // The model always has 49954 rows: with the 49953 tokenizer the export appends [PAD].
        let model = dir.path().join(format!("m-{add_pad}"));
        save_random(
            &model,
            LlamaConfig::new(49954, 32, 64, 1, 2, 2),
            DType::F32,
            9,
        );
        let out = dir.path().join(format!("m-{add_pad}.gguf"));
        export(&model, &[], &tok, &out, OutType::F16);
        run_oracle(&py, &out, &model, &tok, "f16");
    }
}

/// GGML's `quantize_row_q8_0` on a hand-worked block: max |x| = 2.54 → d = 0.02 (stored as the
/// nearest f16), q = round(x / d) with halves away from zero.
#[test]
fn q8_0_block_by_hand() {
    let mut x = vec![0.0f32; QK8_0];
    x[0] = 2.54; // → 127
    x[1] = -1.0; // → -50
    x[2] = 0.03; // 1.5 → 2 (half away from zero)
    x[3] = -0.03; // -1.5 → -2
    x[4] = 0.009; // 0.45 → 0
    let mut out = Vec::new();
    quantize_q8_0_block(&x, &mut out);
    assert_eq!(out.len(), 34);
    let d = half::f16::from_le_bytes([out[0], out[1]]);
    assert_eq!(d, half::f16::from_f32(2.54 / 127.0));
    let q: Vec<i8> = out[2..].iter().map(|&b| b as i8).collect();
    assert_eq!(&q[..5], &[127, -50, 2, -2, 0]);
    assert!(q[5..].iter().all(|&v| v == 0));
    // An all-zero block: d = 0, every q = 0, dequantizes to zeros.
    let mut z = Vec::new();
    quantize_q8_0_block(&[0.0; QK8_0], &mut z);
    assert!(z.iter().all(|&b| b == 0));
}

/// Round trip of random blocks: |x − f16(d)·q| ≤ d/2 + |x|·2⁻¹¹·(1 + 1) — half a step from the
/// rounding to an integer, plus the relative error of storing d as f16 (2⁻¹¹, scaled by |q| ≤ 127
/// steps, i.e. at most |x|·2⁻¹¹ up to the step rounding, doubled as margin for the f32 product).
#[test]
fn q8_0_round_trip_bound() {
    let x: Vec<f32> = (0..QK8_0 * 64)
        .map(|i| ((i as f32 * 0.7123).sin() * 3.0) * if i % 97 == 0 { 40.0 } else { 1.0 })
        .collect();
    let mut bytes = Vec::new();
    for b in x.chunks_exact(QK8_0) {
        quantize_q8_0_block(b, &mut bytes);
    }
    let y = dequantize_q8_0(&bytes);
    for (bi, (xb, yb)) in x.chunks(QK8_0).zip(y.chunks(QK8_0)).enumerate() {
        let d = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        for (a, b) in xb.iter().zip(yb) {
            let tol = d / 2.0 + a.abs() * 2.0 * 2f32.powi(-11);
            assert!((a - b).abs() <= tol, "block {bi}: {a} → {b} (tol {tol})");
        }
    }
}

/// Applying HF's RoPE (`rotate_half`: pairs (i, i + d/2)) to `W·x` equals applying llama.cpp's
/// (pairs (2i, 2i+1), same frequency θ_i = base^(−2i/d)) to `P(W)·x`, up to the row order P:
/// the permuted model computes the same attention scores.
#[test]
fn qk_permutation_turns_hf_rope_into_llamacpp_rope() {
    let (heads, d, cols, base) = (3usize, 8usize, 5usize, 10000f32);
    let w: Vec<f32> = (0..heads * d * cols)
        .map(|i| (i as f32 * 0.37).cos())
        .collect();
    let x: Vec<f32> = (0..cols).map(|i| 0.5 - i as f32 * 0.3).collect();
    let matvec = |w: &[f32]| -> Vec<f32> {
        w.chunks(cols)
            .map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let pw = permute_qk_rows(&w, heads, cols);
    let (hf_q, gg_q) = (matvec(&w), matvec(&pw));
    for pos in [0usize, 1, 7, 100] {
        let mut hf = hf_q.clone();
        let mut gg = gg_q.clone();
        for h in 0..heads {
            for i in 0..d / 2 {
                let theta = pos as f32 * base.powf(-2.0 * i as f32 / d as f32);
                let (s, c) = theta.sin_cos();
                let (a, b) = (h * d + i, h * d + i + d / 2);
                let (x0, x1) = (hf[a], hf[b]);
                hf[a] = x0 * c - x1 * s;
                hf[b] = x0 * s + x1 * c;
                let (a, b) = (h * d + 2 * i, h * d + 2 * i + 1);
                let (x0, x1) = (gg[a], gg[b]);
                gg[a] = x0 * c - x1 * s;
                gg[b] = x0 * s + x1 * c;
            }
        }
        for h in 0..heads {
            for i in 0..d / 2 {
                for j in 0..2 {
                    // Same operands, same operations: equal bit for bit.
                    assert_eq!(
                        gg[h * d + 2 * i + j],
                        hf[h * d + j * d / 2 + i],
                        "pos {pos} head {h} pair {i}"
                    );
                }
            }
        }
        // And the score q·k between two heads' rows is invariant (a permutation within heads).
        let dot = |v: &[f32]| -> f32 { v.iter().map(|a| a * a).sum() };
        assert!((dot(&hf) - dot(&gg)).abs() <= 1e-5 * dot(&hf));
    }
}

fn pseudo(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let x = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(97)) % 1000;
            (x as f32 / 500.0 - 1.0) * scale
        })
        .collect()
}

/// Write a PEFT adapter by hand: `tensors` under `base_model.model.` + `adapter_config.json`.
fn write_adapter(dir: &Path, r: usize, alpha: f32, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
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
    // target_modules / modules_to_save: the modules that have tensors (PEFT writes no others).
    let has = |m: &str| tensors.iter().any(|(n, _, _)| n.contains(m));
    let targets: Vec<&str> = ["q_proj", "k_proj", "down_proj"]
        .into_iter()
        .filter(|m| has(&format!("{m}.lora_A")))
        .collect();
    let saved: Vec<&str> = ["embed_tokens", "lm_head"]
        .into_iter()
        .filter(|m| has(&format!("{m}.weight")))
        .collect();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": targets,
        "modules_to_save": saved, "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

/// Two adapters in order (the second touching the first's q_proj again, and replacing the
/// embedding and lm_head with one more row, the SFT [PAD]) give the same file as exporting
/// `merge-lora`'s output of the same merge. The base is f32 so `merge-lora` writes the merged
/// weights without rounding; both model dirs share a basename (it is `general.name`).
#[test]
fn adapters_equal_merge_lora_output() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, n) = tiny_tokenizer(dir.path());
    let (c, f, r) = (64usize, 96usize, 4usize);
    let base = dir.path().join("a/model");
    save_random(&base, LlamaConfig::new(n, c, f, 2, 4, 2), DType::F32, 21);
    let kv = 2 * 16;
    let a1 = dir.path().join("pt");
    write_adapter(
        &a1,
        r,
        8.0,
        &[
            (
                "model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                vec![r, c],
                pseudo(r * c, 1, 0.1),
            ),
            (
                "model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                vec![c, r],
                pseudo(c * r, 2, 0.1),
            ),
            (
                "model.layers.1.self_attn.k_proj.lora_A.weight".into(),
                vec![r, c],
                pseudo(r * c, 3, 0.1),
            ),
            (
                "model.layers.1.self_attn.k_proj.lora_B.weight".into(),
                vec![kv, r],
                pseudo(kv * r, 4, 0.1),
            ),
        ],
    );
    let a2 = dir.path().join("sft");
    write_adapter(
        &a2,
        2,
        4.0,
        &[
            (
                "model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                vec![2, c],
                pseudo(2 * c, 5, 0.2),
            ),
            (
                "model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                vec![c, 2],
                pseudo(c * 2, 6, 0.2),
            ),
            (
                "model.layers.1.mlp.down_proj.lora_A.weight".into(),
                vec![2, f],
                pseudo(2 * f, 7, 0.2),
            ),
            (
                "model.layers.1.mlp.down_proj.lora_B.weight".into(),
                vec![c, 2],
                pseudo(c * 2, 8, 0.2),
            ),
            (
                "model.embed_tokens.weight".into(),
                vec![n + 1, c],
                pseudo((n + 1) * c, 9, 0.05),
            ),
            (
                "lm_head.weight".into(),
                vec![n + 1, c],
                pseudo((n + 1) * c, 10, 0.05),
            ),
        ],
    );
    let ads = vec![a1.clone(), a2.clone()];
    let merged = dir.path().join("b/model");
    let loaded: Vec<_> = ads
        .iter()
        .map(|d| zhllama::model::peft::load_adapter(d).unwrap())
        .collect();
    zhllama::model::peft::merge_into_dir(&base, &loaded, &merged, 1 << 30).unwrap();
    for (t, name) in [(OutType::F32, "f32"), (OutType::Q8_0, "q8_0")] {
        let via_adapters = dir.path().join(format!("ad-{name}.gguf"));
        let via_merged = dir.path().join(format!("mg-{name}.gguf"));
        export(&base, &ads, &tok, &via_adapters, t);
        export(&merged, &[], &tok, &via_merged, t);
        let (x, y) = (
            std::fs::read(&via_adapters).unwrap(),
            std::fs::read(&via_merged).unwrap(),
        );
        assert!(
            x == y,
            "{name}: export --adapter differs from exporting merge-lora's output"
        );
        // And the adapters did change the file (the test is not comparing two plain exports).
        let plain = dir.path().join(format!("plain-{name}.gguf"));
        export(&base, &[], &tok, &plain, t);
        assert_ne!(std::fs::read(&plain).unwrap(), x);
    }
}

fn err_of(model: &Path, adapters: &[PathBuf], tok: &Path, out: &Path) -> String {
    let e = export_gguf(&ExportOptions {
        model_dir: model.to_path_buf(),
        adapter_dirs: adapters.to_vec(),
        tokenizer: tok.to_path_buf(),
        output: out.to_path_buf(),
        outtype: OutType::F16,
    })
    .unwrap_err();
    format!("{e:#}")
}

#[test]
fn bad_inputs_are_one_line_errors_and_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, n) = tiny_tokenizer(dir.path());
    let model = dir.path().join("model");
    save_random(&model, LlamaConfig::new(n, 32, 64, 1, 2, 2), DType::F32, 1);
    let out = dir.path().join("out.gguf");
    let check = |e: String, needles: &[&str]| {
        assert!(!e.contains('\n'), "multi-line error: {e}");
        for nd in needles {
            assert!(e.contains(nd), "{e:?} should mention {nd:?}");
        }
        assert!(!out.exists(), "a failed export left {}", out.display());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
    };
    // Missing model dir.
    check(
        err_of(&dir.path().join("nope"), &[], &tok, &out),
        &["nope", "does not exist"],
    );
    // Vocabulary mismatch: a model two rows larger than the tokenizer.
    let big = dir.path().join("big");
    save_random(
        &big,
        LlamaConfig::new(n + 2, 32, 64, 1, 2, 2),
        DType::F32,
        1,
    );
    check(
        err_of(&big, &[], &tok, &out),
        &[&format!("{}", n + 2), &format!("{n}"), "tok.model"],
    );
    // An adapter tensor with no base tensor.
    let ad = dir.path().join("ad");
    write_adapter(
        &ad,
        2,
        2.0,
        &[
            (
                "model.layers.5.self_attn.q_proj.lora_A.weight".into(),
                vec![2, 32],
                vec![0.0; 64],
            ),
            (
                "model.layers.5.self_attn.q_proj.lora_B.weight".into(),
                vec![32, 2],
                vec![0.0; 64],
            ),
        ],
    );
    check(
        err_of(&model, &[ad], &tok, &out),
        &["model.layers.5.self_attn.q_proj", "ad"],
    );
    // A tensor llama.cpp has no place for.
    let extra = dir.path().join("extra");
    let ck = zhllama::model::Checkpoint::open(&model).unwrap();
    let mut tensors: Vec<zhllama::model::HostTensor<'_>> = ck
        .names()
        .map(|nm| {
            let (shape, data) = ck.read(nm).unwrap();
            zhllama::model::HostTensor {
                name: nm.to_string(),
                shape,
                data: data.into(),
            }
        })
        .collect();
    tensors.push(zhllama::model::HostTensor {
        name: "model.layers.0.self_attn.q_proj.bias".into(),
        shape: vec![32],
        data: vec![0.0; 32].into(),
    });
    let cfg = LlamaConfig::load(&model.join("config.json")).unwrap();
    zhllama::model::save_model_dir(
        &extra,
        &cfg,
        &tensors,
        SaveOptions {
            dtype: DType::F32,
            max_shard_bytes: None,
        },
    )
    .unwrap();
    check(
        err_of(&extra, &[], &tok, &out),
        &["model.layers.0.self_attn.q_proj.bias", "llama.cpp"],
    );
    // An output directory that does not exist: the error names the file.
    let e = err_of(&model, &[], &tok, &dir.path().join("no/such/dir/x.gguf"));
    assert!(e.contains("x.gguf") && !e.contains('\n'), "{e}");
}
