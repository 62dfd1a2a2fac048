//! The user-facing outputs end to end through the binary: pt1 → model/, pt2 and sft → PEFT
//! adapter/, `merge-lora` with two adapters in order, metrics.jsonl with eval lines, loss.png and
//! `zhllama plot`.

mod train_common;

use std::path::Path;
use std::process::Command;

/// `zhllama ARGS[..3] PATHS ARGS[3..]` (config overrides come after the named options).
fn zh(args: &[&str], paths: &[(&str, &Path)]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zhllama"));
    let k = args.len().min(3);
    c.args(&args[..k]);
    for (flag, p) in paths {
        if !flag.is_empty() {
            c.arg(flag);
        }
        c.arg(p);
    }
    c.args(&args[k..]);
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

const SMALL: [&str; 10] = [
    "--max-steps",
    "4",
    "--batch-size",
    "4",
    "--micro-batch-size",
    "2",
    "--lora-rank",
    "4",
    "--eval-steps",
    "2",
];

#[test]
fn stages_outputs_merge_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // vocab 65 = the SFT data's 64 pieces + [PAD], so every stage shares one base model
    let model = train_common::tiny_model(&root.join("base"), 65, 2);
    let pt = train_common::pretrain_data(&root.join("pt"), 64, 16);
    let sft = train_common::sft_data(&root.join("sft"), 64, 200);

    // pt1: the whole model with its trained embedding, loadable as a model directory
    let o1 = root.join("o1");
    let mut args = vec!["train", "--stage", "pt1"];
    args.extend(SMALL);
    zh(
        &args,
        &[("--model", &model), ("--data", &pt), ("--output", &o1)],
    );
    let m1 = zhllama::model::weights::Checkpoint::open(&o1.join("model")).unwrap();
    let base = zhllama::model::weights::Checkpoint::open(&model).unwrap();
    let e1 = m1.read("model.embed_tokens.weight").unwrap().1;
    assert_ne!(
        e1,
        base.read("model.embed_tokens.weight").unwrap().1,
        "embedding trained"
    );
    assert_eq!(
        m1.read("lm_head.weight").unwrap().1,
        base.read("lm_head.weight").unwrap().1,
        "lm_head frozen in pt1"
    );
    let recs = zhllama::train::metrics::read(&o1.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.iter().filter(|r| r.loss.is_some()).count(), 4);
    assert_eq!(recs.iter().filter(|r| r.eval_loss.is_some()).count(), 2);
    assert!(
        recs.iter()
            .all(|r| r.loss.is_none() || r.lr.is_some() && r.tokens_per_s.is_some())
    );
    let png = std::fs::read(o1.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // pt2 on the pt1 model, then sft on the pt2-merged model; merge both adapters in order.
    let o2 = root.join("o2");
    let mut args = vec!["train", "--stage", "pt2"];
    args.extend(SMALL);
    zh(
        &args,
        &[
            ("--model", &o1.join("model")),
            ("--data", &pt),
            ("--output", &o2),
        ],
    );
    let o3 = root.join("o3");
    let mut args = vec!["train", "--stage", "sft"];
    args.extend(SMALL);
    zh(
        &args,
        &[
            ("--model", &o1.join("model")),
            ("--data", &sft),
            ("--output", &o3),
        ],
    );
    let merged = root.join("merged");
    zh(
        &["merge-lora"],
        &[
            ("--base", &o1.join("model")),
            ("--adapter", &o2.join("adapter")),
            ("--adapter", &o3.join("adapter")),
            ("--output", &merged),
        ],
    );
    assert!(merged.join("model.safetensors.index.json").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["vocab_size"], 65);
    // embed_tokens / lm_head come from the last adapter (sft); q_proj got both LoRA deltas.
    let mm = zhllama::model::weights::Checkpoint::open(&merged).unwrap();
    let a3 = zhllama::model::peft::load_adapter(&o3.join("adapter")).unwrap();
    assert_eq!(
        mm.read("lm_head.weight").unwrap().1,
        a3.tensors["lm_head.weight"].1
    );
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(mm.read(q).unwrap().1, m1.read(q).unwrap().1);

    // zhllama plot RUN_DIR --output FILE
    let png2 = root.join("curve.png");
    zh(&["plot"], &[("", &o3), ("--output", &png2)]);
    assert_eq!(&std::fs::read(&png2).unwrap()[..4], b"\x89PNG");
}

/// Not a test: writes the LoRA-SFT benchmark's data (64 examples of exactly 256 tokens, the
/// first ~156 of them prompt) to `<temp dir>/zhllama-bench-sft` for docs/PERF.md's command.
/// Run with `cargo test --release --test train_cli -- --ignored make_bench_sft_data`.
#[test]
#[ignore]
fn make_bench_sft_data() {
    let d = std::env::temp_dir().join("zhllama-bench-sft");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let src = d.join("a.json");
    let recs: Vec<serde_json::Value> = (0..64)
        .map(|i| {
            serde_json::json!({"instruction": format!("写一首诗 {i}"), "input": "",
                               "output": "x".repeat(400 + i)})
        })
        .collect();
    std::fs::write(&src, serde_json::to_string(&recs).unwrap()).unwrap();
    let cfg = zhllama::data::SftConfig {
        max_len: 256,
        ..Default::default()
    };
    let m = zhllama::data::sft::build_sft(
        &train_common::ByteEncoder { vocab: 64 },
        &[src],
        &d.join("sft"),
        &cfg,
    )
    .unwrap();
    assert_eq!(m.tokens, 64 * 256);
    println!("{}", d.join("sft").display());
}
