//! `train --init-adapter DIR` starts from a PEFT adapter: with `--learning-rate 0 --max-steps 1`
//! the adapter written at the end is the one it started from, bit for bit (every LoRA factor and
//! every module saved in full), for pt2 and sft; the adapter's r / alpha / targets become the
//! run's; what cannot start from an adapter is refused by name.

mod train_common;

use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn zh(args: &[&str], paths: &[(&str, &Path)]) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zhllama"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// name → (shape, raw little-endian bytes)
fn tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

const SMALL: [&str; 8] = [
    "--batch-size",
    "4",
    "--micro-batch-size",
    "2",
    "--eval-steps",
    "0",
    "--save-steps",
    "0",
];

fn round_trip(stage: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = train_common::tiny_model(&root.join("base"), 65, 2);
    let data = if stage == "sft" {
        train_common::sft_data(&root.join("d"), 64, 200)
    } else {
        train_common::pretrain_data(&root.join("d"), 64, 16)
    };
    // A trained adapter (r = 4, alpha 8): LoRA B non-zero, embed/lm_head moved.
    let o1 = root.join("o1");
    let mut args = vec!["train", "--stage", stage, "--max-steps", "3"];
    args.extend(SMALL);
    args.extend(["--lora-rank", "4", "--lora-alpha", "8"]);
    let (ok, err) = zh(
        &args,
        &[("--model", &model), ("--data", &data), ("--output", &o1)],
    );
    assert!(ok, "{err}");
    let a1 = o1.join("adapter");
    // Start from it with another rank and alpha on the command line: the adapter's win; LR 0.
    let o2 = root.join("o2");
    let mut args = vec!["train", "--stage", stage, "--max-steps", "1"];
    args.extend(SMALL);
    args.extend([
        "--learning-rate",
        "0",
        "--lora-rank",
        "8",
        "--lora-alpha",
        "16",
    ]);
    let (ok, err) = zh(
        &args,
        &[
            ("--model", &model),
            ("--data", &data),
            ("--output", &o2),
            ("--init-adapter", &a1),
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("lora_rank 8 -> 4"), "{err}");
    let (t1, t2) = (tensors(&a1), tensors(&o2.join("adapter")));
    assert_eq!(
        t1.keys().collect::<Vec<_>>(),
        t2.keys().collect::<Vec<_>>(),
        "{stage}: same tensors"
    );
    assert!(t1.keys().any(|k| k.ends_with("lora_B.weight")));
    assert!(t1.keys().any(|k| k.ends_with("embed_tokens.weight")));
    for (n, (shape, bytes)) in &t1 {
        assert_eq!(shape, &t2[n].0, "{stage} {n}");
        assert!(bytes == &t2[n].1, "{stage} {n}: not bit for bit");
    }
    // B trained away from its zero init, so the round trip is not trivially zero == zero.
    let b = t1
        .iter()
        .find(|(k, _)| k.ends_with("lora_B.weight"))
        .unwrap();
    assert!(b.1.1.iter().any(|&x| x != 0), "B is non-zero");
    let c1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a1.join("adapter_config.json")).unwrap())
            .unwrap();
    let c2: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(o2.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    for k in ["r", "lora_alpha", "target_modules", "modules_to_save"] {
        assert_eq!(c1[k], c2[k], "{stage}: adapter_config {k}");
    }
}

#[test]
fn pt2_learning_rate_zero_returns_the_adapter_bit_for_bit() {
    round_trip("pt2");
}

#[test]
fn sft_learning_rate_zero_returns_the_adapter_bit_for_bit() {
    round_trip("sft");
}

/// pt1 has no LoRA; an adapter with per-module ranks cannot be trained; an adapter for another
/// model shape names the tensor.
#[test]
fn refusals_name_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = train_common::tiny_model(&root.join("base"), 65, 2);
    let data = train_common::pretrain_data(&root.join("d"), 64, 16);
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    let run = |stage: &str, adapter: &Path, out: &str| {
        let mut args = vec!["train", "--stage", stage, "--max-steps", "1"];
        args.extend(SMALL);
        let o = root.join(out);
        let (ok, err) = zh(
            &args,
            &[
                ("--model", &model),
                ("--data", &data),
                ("--output", &o),
                ("--init-adapter", adapter),
            ],
        );
        assert!(!ok, "accepted");
        assert!(!o.join("adapter").exists());
        err
    };
    let err = run("pt1", &fx.join("resized_pt2"), "a");
    assert!(err.contains("pt1"), "{err}");
    let err = run("pt2", &fx.join("plain_r8"), "b");
    assert!(err.contains("rank_pattern"), "{err}");
    // resized_pt2 is for hidden size 16; the tiny model's is 32
    let err = run("pt2", &fx.join("resized_pt2"), "c");
    assert!(
        err.contains("lora_A.weight") || err.contains("embed_tokens"),
        "{err}"
    );
}
