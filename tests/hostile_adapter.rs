//! Inconsistent or unsupported PEFT adapters are refused by `zhllama merge-lora` with a non-zero
//! exit and a one-line error naming the key or tensor at fault; the inputs stay unchanged and no
//! output is written. Each case is a real PEFT adapter (tests/fixtures/peft/resized_pt2, r = 4
//! on q,k,v,o + modules_to_save embed_tokens/lm_head) with one thing broken.

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), Dtype::F32);
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), d))
        })
        .collect()
}

fn write_tensors(path: &Path, t: &Tensors) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, (s, d))| {
            (
                n.clone(),
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Every file under `dir` with its bytes (to prove the inputs are unchanged).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const V_A: &str = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";

/// A copy of the fixture adapter in a fresh temp dir, changed by `edit`: (temp dir, adapter dir).
fn edited_adapter(edit: impl FnOnce(&mut Value, &mut Tensors)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("adapter");
    std::fs::create_dir(&ad).unwrap();
    let src = fixtures().join("resized_pt2");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    let mut t = read_tensors(&src.join("adapter_model.safetensors"));
    edit(&mut cfg, &mut t);
    std::fs::write(ad.join("adapter_config.json"), cfg.to_string()).unwrap();
    write_tensors(&ad.join("adapter_model.safetensors"), &t);
    (tmp, ad)
}

/// `zhllama merge-lora` of adapter `ad` into the fixture base, written to `merged`.
fn merge_lora(ad: &Path, merged: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["merge-lora", "--base"])
        .arg(fixtures().join("base"))
        .arg("--adapter")
        .arg(ad)
        .arg("--output")
        .arg(merged)
        .output()
        .unwrap()
}

/// Copy the fixture adapter, let `edit` break it, run merge-lora and expect a refusal whose
/// message contains every string of `names`.
fn refused(edit: impl FnOnce(&mut Value, &mut Tensors), names: &[&str]) {
    let (tmp, ad) = edited_adapter(edit);
    let base = fixtures().join("base");
    let (before_ad, before_base) = (snapshot(&ad), snapshot(&base));
    let merged = tmp.path().join("merged");
    let out = merge_lora(&ad, &merged);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "accepted; stderr: {err}");
    for n in names {
        assert!(err.contains(n), "the error does not name {n:?}: {err}");
    }
    assert!(
        err.lines().filter(|l| !l.trim().is_empty()).count() <= 2,
        "not a short error: {err}"
    );
    assert!(!merged.exists(), "an output was written");
    assert_eq!(snapshot(&ad), before_ad, "the adapter changed");
    assert_eq!(snapshot(&base), before_base, "the base changed");
}

#[test]
fn config_rank_above_the_tensor_ranks() {
    refused(
        |c, _| c["r"] = 8.into(),
        &["lora_", "rank 4", "r = 8", "key r"],
    );
}

#[test]
fn rank_zero() {
    refused(
        |c, _| c["r"] = 0.into(),
        &["adapter_config.json", "key r = 0"],
    );
}

#[test]
fn rank_pattern_disagrees_with_a_tensor() {
    refused(
        |c, _| c["rank_pattern"] = serde_json::json!({"layers.0.self_attn.q_proj": 2}),
        &[Q_A, "rank 4", "r = 2", "rank_pattern"],
    );
}

#[test]
fn tensor_of_an_untargeted_module() {
    refused(
        |c, _| c["target_modules"] = serde_json::json!(["q_proj", "k_proj", "o_proj"]),
        &["v_proj.lora_", "target_modules"],
    );
}

#[test]
fn target_module_without_tensors() {
    refused(
        |c, _| {
            c["target_modules"] =
                serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
        },
        &["target_modules", "\"gate_proj\""],
    );
}

#[test]
fn non_finite_value() {
    refused(
        |_, t| t.get_mut(V_A).unwrap().1[3] = f32::NAN,
        &[V_A, "non-finite"],
    );
}

#[test]
fn missing_partner_factor() {
    refused(
        |_, t| {
            t.remove("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
        },
        &[V_A, "v_proj.lora_B.weight"],
    );
}

#[test]
fn unsupported_config_key() {
    refused(|c, _| c["use_dora"] = true.into(), &["use_dora"]);
}

#[test]
fn unsupported_tensor_key() {
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    refused(
        |_, t| {
            t.insert(key.into(), (vec![16], vec![1.0; 16]));
        },
        &[key, "not supported"],
    );
}

#[test]
fn modules_to_save_copies_that_differ() {
    refused(
        |_, t| {
            t.get_mut("base_model.model.lm_head.modules_to_save.weight")
                .unwrap()
                .1[0] += 1.0
        },
        &["lm_head.modules_to_save.weight", "lm_head.weight", "differ"],
    );
}

#[test]
fn modules_to_save_copy_of_an_unlisted_module() {
    refused(
        |c, _| c["modules_to_save"] = serde_json::json!(["embed_tokens"]),
        &["lm_head.modules_to_save.weight", "modules_to_save"],
    );
}

#[test]
fn factor_that_does_not_fit_the_base() {
    // a consistent adapter (ranks and targets agree) whose A has the wrong input width
    refused(
        |_, t| {
            let (s, d) = t.get_mut(Q_A).unwrap();
            *s = vec![4, 8];
            d.truncate(32);
        },
        &["q_proj.lora_A.weight", "do not fit"],
    );
}

/// Copy the fixture adapter, let `edit` change it, and expect merge-lora to accept it.
fn accepted(edit: impl FnOnce(&mut Value, &mut Tensors)) {
    let (tmp, ad) = edited_adapter(edit);
    let merged = tmp.path().join("merged");
    let out = merge_lora(&ad, &merged);
    assert!(
        out.status.success(),
        "refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(merged.join("config.json").is_file(), "no merged model");
}

#[test]
fn keys_of_no_known_layout() {
    // Keys that end like a LoRA factor or a module but are not one (a factor of a factor, a
    // factor inside a modules_to_save copy, a DoRA magnitude vector): refused by name, never
    // treated as a base tensor.
    for key in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.modules_to_save.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight",
    ] {
        refused(
            |_, t| {
                let v = t[Q_A].clone();
                t.insert(key.to_string(), v);
            },
            &[key, "not a LoRA factor"],
        );
    }
}

#[test]
fn rank_pattern_that_is_not_an_object() {
    refused(
        |c, _| c["rank_pattern"] = serde_json::json!([8]),
        &["adapter_config.json", "an object of pattern"],
    );
}

#[test]
fn unsupported_keys_are_refused_only_when_set() {
    // PEFT writes these keys with neutral values (false, null, [] or {}); a set value is refused.
    refused(
        |c, _| c["layer_replication"] = serde_json::json!([[0, 1]]),
        &["layer_replication", "not supported"],
    );
    refused(
        |c, _| c["megatron_config"] = serde_json::json!({"tensor_model_parallel_size": 2}),
        &["megatron_config", "not supported"],
    );
    accepted(|c, _| {
        c["layer_replication"] = serde_json::json!([]);
        c["megatron_config"] = serde_json::json!({});
        c["use_dora"] = serde_json::json!(false);
    });
}

#[test]
fn a_config_without_bias_means_none() {
    // PEFT's LoraConfig defaults `bias` to "none"; an older adapter_config.json may lack the key.
    accepted(|c, _| {
        c.as_object_mut().unwrap().remove("bias");
    });
}

#[test]
fn finite_factors_whose_product_overflows() {
    // Every value of the q_proj pair is finite (1e30) but B·A·s is far beyond f32's range.
    let q_b = Q_A.replace("lora_A", "lora_B");
    refused(
        |_, t| {
            for key in [Q_A, q_b.as_str()] {
                t.get_mut(key).unwrap().1.iter_mut().for_each(|x| *x = 1e30);
            }
        },
        &["merged tensor", "q_proj.weight", "non-finite"],
    );
}
