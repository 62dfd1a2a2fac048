//! `zhllama train --dry-run` on LLaMA-7B's public config.json (no weights): the trainable shares
//! docs/RECIPE.md §3 reports (2.97 / 6.06 / 6.22 %) and the per-rank memory plan.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// LLaMA-7B's HF config (public numbers: hidden 4096, 32 layers, 32 heads, ffn 11008, vocab 32000).
const LLAMA_7B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
  "num_attention_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-6,
  "hidden_act": "silu", "max_position_embeddings": 2048, "tie_word_embeddings": false
}"#;

fn dry_run(dir: &Path, stage: &str, vocab: usize, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["train", "--stage", stage, "--dry-run", "--model"])
        .arg(dir)
        .args(["--vocab-size", &vocab.to_string()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dry run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON line expected: {stdout}"
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), LLAMA_7B).unwrap();
    dir
}

#[test]
fn llama_7b_trainable_shares_match_the_recipe() {
    let dir = model_dir();
    // Expected values are docs/RECIPE.md §3's derivations, written out independently of the code.
    let emb_49953 = 49953u64 * 4096;
    let emb_49954 = 49954u64 * 4096;
    let base_49953 = 6_885_486_592u64; // published parameter count at vocab 49953
    let lora_pt2 = 32 * 4 * (4096 * 8 + 8 * 4096u64);
    let lora_sft = 32 * (4 * 65536 + 3 * (4096 * 8 + 8 * 11008u64));
    let cases = [
        ("pt1", 49953, base_49953, emb_49953, 2.97),
        (
            "pt2",
            49953,
            base_49953 + lora_pt2,
            2 * emb_49953 + lora_pt2,
            6.06,
        ),
        (
            "sft",
            49954,
            base_49953 + 2 * 4096 + lora_sft,
            2 * emb_49954 + lora_sft,
            6.22,
        ),
    ];
    for (stage, vocab, total, trainable, pct) in cases {
        let v = dry_run(dir.path(), stage, vocab, &[]);
        assert_eq!(v["total_params"].as_u64(), Some(total), "{stage}: {v}");
        assert_eq!(
            v["trainable_params"].as_u64(),
            Some(trainable),
            "{stage}: {v}"
        );
        assert_eq!(v["trainable_percent"].as_f64(), Some(pct), "{stage}: {v}");
        // Memory plan present and consistent with the counts (f32: 4 bytes per weight).
        assert_eq!(v["weights_bytes"].as_u64(), Some(total * 4));
        assert_eq!(v["gradient_bytes"].as_u64(), Some(trainable * 4));
        // ZeRO-2 keeps an fp32 master copy, m and v of the trainable parameters (12 bytes each).
        assert_eq!(v["optimizer_bytes"].as_u64(), Some(trainable * 12));
        assert!(v["activation_bytes_per_micro_batch"].as_u64().unwrap() > 0);
    }
}

#[test]
fn per_rank_state_shrinks_with_world_size() {
    let dir = model_dir();
    let p = 2 * 49954u64 * 4096 + 32 * (4 * 65536 + 3 * (4096 * 8 + 8 * 11008u64));
    for world in [1usize, 2, 3, 8] {
        // the global batch must divide by the world size: 512, or 513 for world 3
        let batch = if world == 3 { 513 } else { 512 };
        let v = dry_run(
            dir.path(),
            "sft",
            49954,
            &[
                "--world-size",
                &world.to_string(),
                "--micro-batch-size",
                "1",
                "--batch-size",
                &batch.to_string(),
            ],
        );
        let shard = p.div_ceil(world as u64);
        // fp32 master + AdamW m + v for this rank's shard; the averaged gradient shard in fp32.
        assert_eq!(
            v["optimizer_bytes_per_rank"].as_u64(),
            Some(shard * 12),
            "{v}"
        );
        assert_eq!(
            v["gradient_bytes_per_rank"].as_u64(),
            Some(shard * 4),
            "{v}"
        );
        assert_eq!(v["accumulation_steps"].as_u64(), Some(batch / world as u64));
    }
    // bf16 mixed precision: 2-byte weights, the same fp32 optimizer state.
    let v = dry_run(
        dir.path(),
        "sft",
        49954,
        &[
            "--world-size",
            "8",
            "--precision",
            "bf16",
            "--micro-batch-size",
            "1",
        ],
    );
    assert_eq!(
        v["optimizer_bytes_per_rank"].as_u64(),
        Some(p.div_ceil(8) * 12)
    );
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let dir = model_dir();
    // world 3 does not divide the sft batch of 512 with micro-batch 4
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args([
            "train",
            "--stage",
            "sft",
            "--dry-run",
            "--world-size",
            "3",
            "--model",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("batch_size 512"), "{err}");
    // missing config.json names the file
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["train", "--stage", "pt1", "--dry-run", "--model"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
