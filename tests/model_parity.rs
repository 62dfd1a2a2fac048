//! The model against HF transformers: logits, loss, every parameter gradient and the input-embedding
//! gradient, on the fixtures of `tools/oracle/make_reference.py` (references computed in float64).
//! Also: low-precision and sharded checkpoints, save → load round trips, gradient accumulation,
//! frozen groups, and clear errors on bad checkpoints.

mod model_common;

use model_common::*;
use std::collections::HashMap;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::{Activations, Checkpoint, Group, Llama, TrainSpec};
use zhllama::tensor::DType;

/// The tolerance table. Our side runs in f32 against an f64 reference, so every entry only has to
/// cover f32 rounding: unit roundoff 6e-8, grown by the length of the dot products (≤ 160 terms
/// here, ~sqrt(K)·u ≈ 1e-6 for random-sign sums) and by the depth of the chain (2 layers, ~10 ops
/// each). All entries are at or below the rel 1e-5 aim, relative to the tensor's scale.
mod tol {
    use super::Tol;
    /// Logits: one forward chain; measured worst ~5e-7 of max|logit|.
    pub const LOGITS: Tol = Tol {
        rtol: 1e-5,
        floor: 1e-5,
        why: "f32 forward through 2 layers vs f64",
    };
    /// The loss is a mean of ≤ 18 per-token CE values (each a log-sum-exp over V); relative.
    pub const LOSS: f64 = 1e-6;
    /// Gradients: forward and backward chains; entries that are cancellations of larger terms
    /// are judged against the tensor's max (the `floor`); measured worst ~2e-6.
    pub const GRAD: Tol = Tol {
        rtol: 1e-5,
        floor: 1e-5,
        why: "f32 forward+backward through 2 layers vs f64, relative to the tensor's max",
    };
}

struct Run {
    loss: f32,
    logits: Vec<f32>,
    grads: Vec<f32>,
    d_emb: Vec<f32>,
}

fn run(
    model: &Llama<CpuBackend>,
    r: &HashMap<String, RefTensor>,
    backward_calls: usize,
    scale: f32,
) -> Run {
    let (ids, b, t) = ids(r, "input_ids");
    let (labels, _, _) = ids_of(r, "labels");
    let mut acts = Activations::new(model, b, t).unwrap();
    let mut grads = model.alloc_grads().unwrap();
    let loss = model.forward(&mut acts, &ids, &labels).unwrap();
    for _ in 0..backward_calls {
        model.backward(&mut acts, &mut grads, scale).unwrap();
    }
    Run {
        loss,
        logits: acts.logits().clone(),
        grads,
        d_emb: acts.d_embeddings().unwrap().clone(),
    }
}

fn ids_of(r: &HashMap<String, RefTensor>, name: &str) -> (Vec<i32>, usize, usize) {
    ids(r, name)
}

/// Compare loss, logits, every trainable gradient (times `mult`) and the input-embedding gradient.
fn check_case(
    case: &str,
    model: &Llama<CpuBackend>,
    r: &HashMap<String, RefTensor>,
    out: &Run,
    mult: f64,
    emb_mult: f64,
) {
    let want_loss = r["loss"].data[0];
    let rel = (out.loss as f64 - want_loss).abs() / want_loss.abs();
    assert!(
        rel <= tol::LOSS,
        "{case}: loss {} vs HF {want_loss} (rel {rel:.2e})",
        out.loss
    );
    let w = compare(
        &format!("{case} logits"),
        &out.logits,
        &r["logits"].data,
        tol::LOGITS,
    )
    .unwrap();
    eprintln!("{case}: loss rel {rel:.1e}, logits {w:.1e}");
    let mut n_checked = 0;
    for e in model.layout().entries() {
        if e.group != Group::Trainable {
            continue;
        }
        let want: Vec<f64> = r[&format!("grad.{}", e.name)]
            .data
            .iter()
            .map(|x| x * mult)
            .collect();
        // A zero reference gradient would make the comparison vacuous (e.g. LoRA A under a zero B).
        assert!(
            want.iter().any(|&x| x != 0.0),
            "{case}: the reference gradient of {} is all zero",
            e.name
        );
        let w = compare(
            &format!("{case} grad {}", e.name),
            &out.grads[e.range.clone()],
            &want,
            tol::GRAD,
        )
        .unwrap_or_else(|m| panic!("{m}"));
        eprintln!("  grad {:<50} {w:.1e}", e.name);
        n_checked += 1;
    }
    let want: Vec<f64> = r["grad.inputs_embeds"]
        .data
        .iter()
        .map(|x| x * emb_mult)
        .collect();
    let w = compare(
        &format!("{case} grad inputs_embeds"),
        &out.d_emb,
        &want,
        tol::GRAD,
    )
    .unwrap();
    eprintln!("  grad inputs_embeds {w:.1e}; {n_checked} parameter gradients checked");
}

fn full_case(case: &str) {
    let r = read_reference(case);
    let model = load(case, TrainSpec::full());
    // Every HF parameter has a reference gradient and is trainable here.
    let n_ref = r
        .keys()
        .filter(|k| k.starts_with("grad.model") || k.starts_with("grad.lm_head"))
        .count();
    assert_eq!(
        model.layout().entries().len(),
        n_ref,
        "{case}: parameter count vs HF"
    );
    let out = run(&model, &r, 1, 1.0);
    check_case(case, &model, &r, &out, 1.0, 1.0);
}

#[test]
fn mha_matches_hf() {
    full_case("mha");
}

#[test]
fn gqa_rope_theta_matches_hf() {
    full_case("gqa");
}

#[test]
fn tied_mqa_matches_hf() {
    full_case("tied");
}

#[test]
fn lora_matches_peft() {
    let r = read_reference("lora");
    let spec = TrainSpec {
        lora: Some(fixture_lora()),
        ..TrainSpec::full()
    };
    let model = load_with_ref("lora", spec, &r);
    let n_lora = model
        .layout()
        .entries()
        .iter()
        .filter(|e| e.name.contains("lora_"))
        .count();
    assert_eq!(n_lora, 2 * 5 * 2);
    let out = run(&model, &r, 1, 1.0);
    check_case("lora", &model, &r, &out, 1.0, 1.0);
}

#[test]
fn frozen_groups_embedding_only_and_lora_only() {
    // Embedding-only (pre-training stage 1): the gradient still flows through every layer.
    let r = read_reference("mha");
    let model = load("mha", TrainSpec::embeddings_only());
    assert_eq!(model.layout().num_trainable(), 128 * 32);
    let out = run(&model, &r, 1, 1.0);
    check_case("mha/embeddings-only", &model, &r, &out, 1.0, 1.0);

    // LoRA only (base frozen), on the lora fixture: only A/B gradients, same values as PEFT's.
    let r = read_reference("lora");
    let spec = TrainSpec {
        lora: Some(fixture_lora()),
        ..TrainSpec::frozen()
    };
    let model = load_with_ref("lora", spec, &r);
    assert!(
        model
            .layout()
            .entries()
            .iter()
            .all(|e| (e.group == Group::Trainable) == e.name.contains("lora_"))
    );
    let out = run(&model, &r, 1, 1.0);
    check_case("lora/lora-only", &model, &r, &out, 1.0, 1.0);
}

#[test]
fn backward_accumulates_and_scales() {
    // Two backward calls with scale 0.5 each add up to one full gradient: `grads +=`, times scale.
    let r = read_reference("gqa");
    let model = load("gqa", TrainSpec::full());
    let out = run(&model, &r, 2, 0.5);
    // The parameter gradients sum both calls (×1); d_embeddings holds the last call's (×0.5).
    check_case("gqa/2x0.5", &model, &r, &out, 1.0, 0.5);
}

#[test]
fn bf16_sharded_checkpoint_loads() {
    let case = "gqa_bf16_sharded";
    let ck = Checkpoint::open(&fixture(case)).unwrap();
    assert!(ck.sharded);
    assert_eq!(ck.main_dtype(), DType::BF16);
    let r = read_reference(case);
    let model = load(case, TrainSpec::full());
    let out = run(&model, &r, 1, 1.0);
    // The reference ran on the same bf16-rounded weights, widened: the comparison is as exact as f32.
    check_case(case, &model, &r, &out, 1.0, 1.0);
}

#[test]
fn f16_tied_checkpoint_loads() {
    let case = "tied_f16";
    assert_eq!(
        Checkpoint::open(&fixture(case)).unwrap().main_dtype(),
        DType::F16
    );
    let r = read_reference(case);
    let model = load(case, TrainSpec::full());
    let out = run(&model, &r, 1, 1.0);
    check_case(case, &model, &r, &out, 1.0, 1.0);
}
