//! Gradient checkpointing (per decoder layer, as HF's `gradient_checkpointing`): on the CPU
//! backend, which is deterministic, recomputing each layer's forward in the backward must give
//! the very same bits as keeping every layer's activations — the loss, the logits, every
//! gradient and the input-embedding gradient, for a dense model, a GQA model and LoRA with
//! dropout in training mode (the masks replay from (key, layer, proj)), and the weights after
//! optimizer steps through `Trainer`. The memory saving is checked against the dry run's formula,
//! written from the list of buffers independently of `Activations::bytes()`'s summation.

mod train_common;

use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::LocalComm;
use zhllama::model::{Activations, Llama, LlamaConfig, LoraConfig, Proj, TrainSpec};
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::data::Data;
use zhllama::train::dryrun::{self, Dims};
use zhllama::train::{setup, trainer::Trainer};

fn be() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

/// `[B, T]` ids and labels (some labels ignored, as SFT prompts are) from a fixed LCG.
fn batch(b: usize, t: usize, vocab: usize, seed: u64) -> (Vec<i32>, Vec<i32>) {
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    let ids: Vec<i32> = (0..b * t).map(|_| (next() % vocab) as i32).collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| if i % t < t / 4 { -100 } else { id })
        .collect();
    (ids, labels)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Two micro-steps (different dropout keys and batches) of forward + backward accumulating into
/// one gradient buffer, on activations `acts`; returns the losses, the last logits, the gradient
/// and the last input-embedding gradient.
fn run(
    model: &Llama<CpuBackend>,
    mut acts: Activations<CpuBackend>,
    training: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, t, v) = (acts.batch(), acts.seq_len(), model.config().vocab_size);
    let mut grads = model.alloc_grads().unwrap();
    let mut losses = Vec::new();
    acts.training = training;
    for step in 0..2u64 {
        let (ids, labels) = batch(b, t, v, 11 + step);
        acts.rng_key = 1000 + step;
        losses.push(model.forward(&mut acts, &ids, &labels).unwrap());
        model.backward(&mut acts, &mut grads, 0.5).unwrap();
    }
    let demb = acts.d_embeddings().unwrap().clone();
    (losses, acts.logits().clone(), grads, demb)
}

/// Full and checkpointed runs give identical bits; the gradient is not trivially zero.
fn assert_identical(model: &Llama<CpuBackend>, b: usize, t: usize, training: bool) {
    assert!(!model.gradient_checkpointing());
    let full = Activations::new(model, b, t).unwrap();
    assert!(!full.checkpointed());
    let ckpt = Activations::new_checkpointed(model, b, t).unwrap();
    assert!(ckpt.checkpointed());
    let (l0, lg0, g0, e0) = run(model, full, training);
    let (l1, lg1, g1, e1) = run(model, ckpt, training);
    assert_eq!(bits(&l0), bits(&l1), "losses {l0:?} vs {l1:?}");
    assert_eq!(bits(&lg0), bits(&lg1), "logits differ");
    assert_eq!(bits(&e0), bits(&e1), "input-embedding gradients differ");
    for e in model
        .layout()
        .entries()
        .iter()
        .filter(|e| e.loc().trainable())
    {
        let (a, c) = (&g0[e.range.clone()], &g1[e.range.clone()]);
        assert!(a.iter().any(|&x| x != 0.0), "{}: zero gradient", e.name);
        assert_eq!(bits(a), bits(c), "{}: gradients differ", e.name);
    }
}

#[test]
fn dense_model_bit_identical() {
    // MHA (4 heads = 4 kv heads), 3 layers: layers 0 and 1 are recomputed, 2 stays resident.
    let cfg = LlamaConfig::new(50, 32, 56, 3, 4, 4);
    let model = Llama::random(be(), cfg, TrainSpec::full(), 1).unwrap();
    assert_identical(&model, 2, 12, true);
}

#[test]
fn gqa_model_bit_identical() {
    let mut cfg = LlamaConfig::new(40, 48, 64, 3, 6, 2);
    cfg.rope_theta = 5e5;
    let model = Llama::random(be(), cfg, TrainSpec::full(), 2).unwrap();
    assert_identical(&model, 1, 16, true);
}

/// LoRA with dropout in training mode, the SFT stage's trainable set (every projection adapted,
/// embeddings and lm_head in full): the recomputed forward must redraw the same masks.
#[test]
fn lora_with_dropout_bit_identical() {
    let cfg = LlamaConfig::new(48, 32, 40, 3, 4, 2);
    let spec = TrainSpec {
        embed_tokens: true,
        lm_head: true,
        lora: Some(LoraConfig::new(4, 8.0, 0.3, &Proj::ALL, 5).unwrap()),
        ..TrainSpec::frozen()
    };
    let mut model = Llama::random(be(), cfg, spec, 3).unwrap();
    // PEFT initialises B to zero, which would leave A's gradient zero: give B values.
    let mut host = model.download_params().unwrap();
    for e in model.layout().entries() {
        if matches!(e.kind, zhllama::model::Kind::LoraB { .. }) {
            for (i, x) in host.trainable[e.range.clone()].iter_mut().enumerate() {
                *x = ((i * 7 % 13) as f32 - 6.0) * 0.01;
            }
        }
    }
    let be2 = model.backend().clone();
    be2.upload(model.trainable_mut(), &host.trainable).unwrap();
    assert_identical(&model, 2, 10, true);
    // Dropout actually acts: training and eval losses differ.
    let (ltrain, ..) = run(&model, Activations::new(&model, 2, 10).unwrap(), true);
    let (leval, ..) = run(&model, Activations::new(&model, 2, 10).unwrap(), false);
    assert_ne!(bits(&ltrain), bits(&leval));
}

/// `Activations::bytes()` equals the dry run's formula with and without checkpointing, and
/// checkpointing saves (L−1) layer sets.
#[test]
fn bytes_match_the_dry_run_formula() {
    let (vocab, c, f, layers, h, kv) = (50, 32, 56, 4, 4, 2);
    let dims = Dims {
        hidden_size: c,
        intermediate_size: f,
        num_hidden_layers: layers,
        num_attention_heads: h,
        num_key_value_heads: Some(kv),
        vocab_size: vocab,
        tie_word_embeddings: false,
        head_dim: None,
    };
    for (stage, dropout) in [(Stage::Pt1, 0.0), (Stage::Pt2, 0.0), (Stage::Sft, 0.05)] {
        let tc = TrainConfig {
            lora_rank: if stage == Stage::Pt1 { 0 } else { 4 },
            lora_dropout: dropout,
            ..TrainConfig::preset(stage)
        };
        let spec = setup::train_spec(&tc).unwrap();
        let model =
            Llama::random(be(), LlamaConfig::new(vocab, c, f, layers, h, kv), spec, 4).unwrap();
        let (b, t) = (3, 7);
        let full = Activations::new(&model, b, t).unwrap().bytes() as u64;
        let ckpt = Activations::new_checkpointed(&model, b, t).unwrap().bytes() as u64;
        let want = |on| {
            let layout = dryrun::ActLayout {
                bytes: 4,
                checkpointing: on,
                ce_chunk: None,
            };
            dryrun::activation_bytes(&dims, &tc, (b, t), vocab, layout)
        };
        assert_eq!(full, want(false), "{stage}: without checkpointing");
        assert_eq!(ckpt, want(true), "{stage}: with checkpointing");
        assert!(ckpt < full, "{stage}: {ckpt} !< {full}");
        // The saving is (L-1) per-layer sets; one set, counted by hand for this shape (f32):
        // 5C + 2K + 3F activations, 2 + H statistics per row, + LoRA r and dropped inputs.
        let n = (b * t) as u64;
        let kvw = (kv * c / h) as u64;
        let mut set = 4 * n * (5 * c as u64 + 2 * kvw + 3 * f as u64) + 4 * n * (2 + h as u64);
        if stage != Stage::Pt1 {
            let targets: u64 = if stage == Stage::Pt2 { 4 } else { 7 };
            set += 4 * n * 4 * targets;
            if dropout > 0.0 {
                // q, k, v, o, gate, up read C wide, down F wide.
                set += 4 * n * (6 * c as u64 + f as u64);
            }
        }
        assert_eq!(full - ckpt, (layers as u64 - 1) * set, "{stage}");
    }
}

/// Two optimizer steps through `Trainer` (SFT-like: LoRA on every projection with dropout,
/// embeddings and lm_head in full, accumulation 2) give bit-identical weights and losses with and
/// without `gradient_checkpointing`.
#[test]
fn trainer_steps_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = train_common::tiny_model(&tmp.path().join("m"), 64, 9);
    let data = Data::open(&train_common::pretrain_data(&tmp.path().join("d"), 64, 16)).unwrap();
    let mut results = Vec::new();
    for gc in [false, true] {
        let cfg = TrainConfig {
            batch_size: 4,
            micro_batch_size: 2,
            max_steps: 2,
            max_length: 16,
            learning_rate: 1e-2,
            warmup_ratio: 0.0,
            lora_rank: 4,
            lora_dropout: 0.2,
            save_steps: 0,
            gradient_checkpointing: gc,
            ..TrainConfig::preset(Stage::Sft)
        };
        let model = setup::load_model(be(), &dir, &cfg, Stage::Sft, 64, None).unwrap();
        let comm = LocalComm;
        let out = tmp.path().join(format!("o{gc}"));
        let mut t = Trainer::new(model, &data, cfg, Stage::Sft, &comm, &out, None).unwrap();
        assert_eq!(t.model.gradient_checkpointing(), gc);
        let init = t.params().to_vec();
        let mut losses = Vec::new();
        for _ in 0..2 {
            let rec = t.step(false).unwrap();
            assert_eq!(rec.skipped, Some(false));
            losses.push(rec.loss.unwrap());
        }
        assert_ne!(bits(&init), bits(t.params()), "weights did not move");
        results.push((losses, t.params().to_vec()));
    }
    assert_eq!(results[0].0, results[1].0, "losses");
    assert_eq!(bits(&results[0].1), bits(&results[1].1), "weights");
}

/// `zhllama train --dry-run` reports both activation sizes (the formula's, at bf16) and counts the
/// one `gradient_checkpointing` selects.
#[test]
fn dry_run_reports_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let dims = Dims::from_model_dir(dir.path()).unwrap();
    let tc = TrainConfig {
        micro_batch_size: 4,
        ..TrainConfig::preset(Stage::Sft)
    };
    let chunk = dryrun::lm_head_ce_chunk("bf16");
    assert!(
        chunk.is_some(),
        "bf16 is the CUDA layout: fused lm_head + CE"
    );
    let want = |on| {
        let layout = dryrun::ActLayout {
            bytes: 2,
            checkpointing: on,
            ce_chunk: chunk,
        };
        dryrun::activation_bytes(&dims, &tc, (4, 512), 49954, layout)
    };
    for on in [false, true] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zhllama"))
            .args(["train", "--stage", "sft", "--dry-run", "--model"])
            .arg(dir.path())
            .args(["--vocab-size", "49954", "--precision", "bf16"])
            .args(["--micro-batch-size", "4", "--gradient-checkpointing"])
            .arg(on.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let get = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        assert_eq!(
            get("activation_bytes_per_micro_batch_without_checkpointing"),
            want(false)
        );
        assert_eq!(
            get("activation_bytes_per_micro_batch_with_checkpointing"),
            want(true)
        );
        assert_eq!(get("activation_bytes_per_micro_batch"), want(on));
        assert_eq!(v["gradient_checkpointing"].as_bool(), Some(on));
    }
}
