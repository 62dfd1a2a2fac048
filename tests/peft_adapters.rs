//! Adapters saved by real PEFT (fixtures from `tools/oracle/make_peft_reference.py`, PEFT's own
//! `save_pretrained`): every layout PEFT writes for LLaMA merges into the base model like PEFT's
//! `merge_and_unload`, compared on the merged model's loss and logits.
//! - `resized_pt2`: vocabulary resized 48 → 64 before PEFT, LoRA on q,k,v,o + `modules_to_save`
//!   embed_tokens/lm_head, saved with `*.modules_to_save.weight` and `*.original_module.weight`;
//! - `plain_r8`: r=8 on all seven projections with `rank_pattern`, `alpha_pattern`, `use_rslora`;
//! - `embed_lora_r2`: resized, `lora_embedding_A/B` on embed_tokens, LoRA on lm_head, q, v, and the
//!   resized base layers PEFT saves next to them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::Llama;
use zhllama::model::llama::Activations;
use zhllama::model::params::TrainSpec;
use zhllama::model::peft::{load_adapter, merge_into_dir};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

/// Loss and logits of the merged model in `dir` on the case's ids (labels = ids, HF's shift).
fn loss_and_logits(dir: &Path, case: &Value) -> (f32, Vec<f32>) {
    let rows: Vec<Vec<i32>> = case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap() as i32)
                .collect()
        })
        .collect();
    let (b, t) = (rows.len(), rows[0].len());
    let ids = rows.concat();
    let model = Llama::from_dir(Arc::new(CpuBackend::new()), dir, TrainSpec::frozen()).unwrap();
    assert_eq!(
        model.config().vocab_size as u64,
        case["vocab"].as_u64().unwrap(),
        "merged vocabulary"
    );
    let mut acts = Activations::new(&model, b, t).unwrap();
    let loss = model.forward(&mut acts, &ids, &ids).unwrap();
    (loss, acts.logits().clone())
}

// Tolerances: both sides merge in f32 (`W += (B·A)·s`, one rank-≤8 product per element, summed in
// a different order) and run the same f32 forward; ~1e-7 relative per op over a 2-layer model.
// - loss: rel 1e-5 (the acceptance bound);
// - logits: atol 1e-5 + rtol 1e-5 (logits are O(0.1..1); a wrong scaling, a missed module or a
//   transposed embedding delta moves them by > 1e-3).
const LOSS_RTOL: f64 = 1e-5;
const LOGIT_ATOL: f64 = 1e-5;
const LOGIT_RTOL: f64 = 1e-5;

fn check_merged(name: &str, merged: &Path) {
    let exp = expected();
    let case = &exp[name];
    let (loss, logits) = loss_and_logits(merged, case);
    let want_loss = case["loss"].as_f64().unwrap();
    let rel = (loss as f64 - want_loss).abs() / want_loss.abs();
    let want: Vec<f64> = case["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(logits.len(), want.len(), "{name}: logits size");
    let worst = logits
        .iter()
        .zip(&want)
        .map(|(&g, &w)| (g as f64 - w).abs() / (LOGIT_ATOL + LOGIT_RTOL * w.abs()))
        .fold(0.0, f64::max);
    eprintln!("{name}: loss {loss} vs PEFT {want_loss} (rel {rel:.1e}), logits worst {worst:.3}");
    assert!(rel <= LOSS_RTOL, "{name}: loss rel {rel:e}");
    assert!(
        worst <= 1.0,
        "{name}: logits off by {worst} tolerance units"
    );
}

fn merge_case(name: &str) {
    let fx = fixtures();
    let ad = load_adapter(&fx.join(name)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    merge_into_dir(&fx.join("base"), &[ad], &merged, 1 << 20).unwrap();
    check_merged(name, &merged);
}

#[test]
fn plain_keys_with_rank_alpha_patterns_and_rslora() {
    merge_case("plain_r8");
}

#[test]
fn embedding_lora_on_a_resized_vocabulary() {
    merge_case("embed_lora_r2");
}

/// The acceptance case, through the CLI: `zhllama merge-lora` on PEFT's adapter of a resized
/// model (modules_to_save + original_module keys).
#[test]
fn resized_modules_to_save_through_the_cli() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["merge-lora", "--base"])
        .arg(fx.join("base"))
        .arg("--adapter")
        .arg(fx.join("resized_pt2"))
        .arg("--output")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "merge-lora failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_merged("resized_pt2", &merged);
}

/// The layouts are what the loader claims to read: modules_to_save copies become the full
/// modules (original_module dropped), embedding LoRA factors keep their PEFT names, and the
/// per-module rank/scaling follows rank_pattern / alpha_pattern / rsLoRA as PEFT computes it.
#[test]
fn normalised_names_and_per_module_scaling() {
    let fx = fixtures();
    let a = load_adapter(&fx.join("resized_pt2")).unwrap();
    assert_eq!(a.tensors["lm_head.weight"].0, vec![64, 16]);
    assert_eq!(a.tensors["model.embed_tokens.weight"].0, vec![64, 16]);
    assert!(!a.tensors.keys().any(|k| k.contains("original_module")));

    let e = load_adapter(&fx.join("embed_lora_r2")).unwrap();
    assert_eq!(
        e.tensors["model.embed_tokens.lora_embedding_A"].0,
        vec![2, 64]
    );
    assert_eq!(
        e.tensors["model.embed_tokens.lora_embedding_B"].0,
        vec![16, 2]
    );

    let p = load_adapter(&fx.join("plain_r8")).unwrap();
    let c = &p.config;
    let q = "model.layers.0.self_attn.q_proj";
    let up1 = "model.layers.1.mlp.up_proj";
    let up0 = "model.layers.0.mlp.up_proj";
    let down = "model.layers.1.mlp.down_proj";
    assert_eq!(c.rank_of(q).unwrap(), 2);
    assert_eq!(c.rank_of(up1).unwrap(), 4);
    assert_eq!(c.rank_of(up0).unwrap(), 8);
    // rsLoRA: alpha / sqrt(r), PEFT's formula, computed independently here.
    assert_eq!(c.scaling_of(q).unwrap(), (16.0f64 / 2f64.sqrt()) as f32);
    assert_eq!(c.scaling_of(up0).unwrap(), (16.0f64 / 8f64.sqrt()) as f32);
    assert_eq!(c.scaling_of(down).unwrap(), (4.0f64 / 8f64.sqrt()) as f32);
    assert_eq!(p.tensors[&format!("{q}.lora_A.weight")].0, vec![2, 16]);
}

#[test]
fn save_adapter_writes_only_the_listed_full_modules() {
    // Both embed_tokens and lm_head train, but only the modules named in `modules_to_save` are
    // written in full (next to every LoRA factor); the rest stay with the base model.
    use zhllama::model::LlamaConfig;
    use zhllama::model::lora::{LoraConfig, Proj};
    let lora = LoraConfig::new(2, 4.0, 0.0, &[Proj::Q, Proj::V], 0).unwrap();
    let spec = TrainSpec {
        lm_head: true,
        lora: Some(lora),
        ..TrainSpec::embeddings_only()
    };
    let cfg = LlamaConfig::new(64, 16, 32, 1, 2, 2);
    let model = Llama::random(Arc::new(CpuBackend::new()), cfg, spec, 0).unwrap();
    let host = model.download_params().unwrap();
    for list in [
        &["embed_tokens"][..],
        &["lm_head"],
        &[],
        &["embed_tokens", "lm_head"],
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("adapter");
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        zhllama::model::peft::save_adapter(&dir, &host, model.lora(), &list, None).unwrap();
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        let full: Vec<&str> = ["embed_tokens", "lm_head"]
            .into_iter()
            .filter(|m| names.iter().any(|n| n.ends_with(&format!("{m}.weight"))))
            .collect();
        assert_eq!(
            full, list,
            "full modules written for modules_to_save {list:?}: {names:?}"
        );
        let factors = names.iter().filter(|n| n.contains(".lora_")).count();
        assert_eq!(factors, 4, "LoRA factors (q, v × A, B) in {names:?}");
    }
}
