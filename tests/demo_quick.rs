//! `zhllama demo --quick` end to end: the whole recipe on built-in data. The properties checked are
//! the demo's claims, measured on data the run never trained on:
//! - instruction tuning teaches the held-out tasks: exact-match accuracy after SFT is clearly above
//!   before (the tasks are unseen (task, arguments) combinations, see `demo::corpus`);
//! - pre-training on Chinese text lowers the held-out Chinese loss below the resized base model's;
//! - SFT keeps the language model: held-out Chinese loss after SFT within 10% of after pt2;
//! - the run folder holds what the README promises.

use std::path::Path;
use std::process::Command;

#[test]
fn quick_demo_runs_the_recipe_and_sft_teaches_the_held_out_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["demo", "--quick", "--quiet", "--output"])
        .arg(&run)
        .output()
        .expect("run zhllama demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| stage | held-out zh loss"),
        "no results table:\n{stdout}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    let before = report["accuracy_before_sft"].as_f64().unwrap();
    let after = report["accuracy_after_sft"].as_f64().unwrap();
    let n = report["heldout_tasks"].as_u64().unwrap();
    assert!(n >= 50, "too few held-out tasks to measure ({n})");
    // "Clearly above": at least 25 percentage points (≥ 25 more tasks right out of 100). The run
    // is seeded and deterministic; its measured gain is 0% → 56% (docs/PERF.md). Less than half of
    // that leaves room for platform differences in floating-point rounding, which change a few
    // greedy answers, but not for a weakened SFT: 300 instead of 450 steps gives 20%.
    assert!(
        after >= before + 0.25,
        "SFT did not clearly improve held-out accuracy: before {before}, after {after}"
    );

    let stages = report["stages"].as_array().unwrap();
    let loss = |name: &str| {
        stages
            .iter()
            .find(|s| s["stage"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no stage {name} in {stages:?}"))["heldout_loss"]
            .as_f64()
            .unwrap()
    };
    assert!(
        loss("pt2") < loss("base"),
        "pre-training on Chinese did not lower the held-out loss: {stages:?}"
    );
    // SFT keeps the language model (the pre-training paragraphs mixed into its data): held-out
    // Chinese loss after SFT within 10% of after pt2.
    assert!(
        loss("sft") <= 1.10 * loss("pt2"),
        "SFT lost the language model: held-out zh loss {} after SFT vs {} after pt2",
        loss("sft"),
        loss("pt2")
    );
    assert!(stdout.contains("held-out zh loss after SFT vs after pt2"));

    for f in [
        "report.md",
        "samples.txt",
        "tokenizers/merged/tokenizer.model",
        "tokenizers/merged_pad/tokenizer.json",
        "base/model/config.json",
        "pt1/model/config.json",
        "pt2/adapter/adapter_config.json",
        "sft/adapter/adapter_model.safetensors",
        "sft/merged/config.json",
        "sft/metrics.jsonl",
        "sft/loss.png",
    ] {
        assert!(Path::new(&run.join(f)).is_file(), "run folder lacks {f}");
    }
}
