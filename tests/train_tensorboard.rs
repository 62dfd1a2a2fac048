//! `report_to = tensorboard`: the event files under `OUTPUT/runs/` read back by TensorBoard's own
//! reader (`EventAccumulator`, the `tensorboard` PyPI package in `.venv/tb-oracle`, made by
//! tools/test.sh from tools/oracle/tensorboard_requirements.txt) with the values of
//! `metrics.jsonl`; a resumed run adds a new file and leaves the earlier one byte-identical, and
//! TensorBoard drops the earlier file's points after the checkpoint.

mod skip_common;
mod train_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::LocalComm;
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::data::Data;
use zhllama::train::metrics;
use zhllama::train::setup;
use zhllama::train::trainer::{RunOptions, Trainer};

/// TensorBoard's reader: every scalar tag → [(step, value)], after its orphan purge.
const READER: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0}, purge_orphaned_data=True)
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

fn tb_python() -> Option<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("ZHLLAMA_TB_PYTHON") {
        cands.push(p.into());
    }
    cands.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/tb-oracle/bin/python"));
    for c in cands {
        let ok = Command::new(&c)
            .args([
                "-c",
                "import tensorboard.backend.event_processing.event_accumulator",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(c);
        }
    }
    skip_common::skip(
        "no python with the tensorboard package (tools/test.sh makes .venv/tb-oracle from \
         tools/oracle/tensorboard_requirements.txt; or set ZHLLAMA_TB_PYTHON)",
    );
    None
}

/// tag → [(step, value)]; values as the float32 TensorBoard stores (its reader's doubles go
/// through decimal JSON, exact once rounded back to f32).
type Scalars = BTreeMap<String, Vec<(u64, f32)>>;

fn read_back(py: &Path, dir: &Path) -> Scalars {
    let out = Command::new(py)
        .args(["-c", READER])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "TensorBoard's reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: BTreeMap<String, Vec<(f64, f64)>> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter()
        .map(|(k, pts)| {
            (
                k,
                pts.into_iter().map(|(s, x)| (s as u64, x as f32)).collect(),
            )
        })
        .collect()
}

fn cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 2,
        micro_batch_size: 1,
        max_steps: 4,
        save_steps: 2,
        eval_steps: 2,
        learning_rate: 1e-2,
        warmup_steps: 1,
        lora_rank: 4,
        report_to: "tensorboard".into(),
        ..TrainConfig::preset(Stage::Pt2)
    }
}

fn run(model: &Path, data: &Data, out: &Path, resume: Option<&Path>, stop: Option<u64>) {
    let c = cfg();
    let m =
        setup::load_model(Arc::new(CpuBackend::new()), model, &c, Stage::Pt2, 65, None).unwrap();
    let mut t = Trainer::new(m, data, c, Stage::Pt2, &LocalComm, out, resume).unwrap();
    t.run(&RunOptions {
        resume_from: resume.map(Path::to_path_buf),
        stop_after: stop,
        ..RunOptions::default()
    })
    .unwrap();
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// The record's value of `tag` as TensorBoard stores it (a float32 `simple_value`).
fn expected(records: &[metrics::Record]) -> Scalars {
    let mut want = Scalars::new();
    for r in records {
        for (tag, v) in [
            ("train/loss", r.loss),
            ("train/learning_rate", r.lr),
            ("train/grad_norm", r.grad_norm),
            ("train/tokens_per_second", r.tokens_per_s),
            ("eval/loss", r.eval_loss),
        ] {
            if let Some(v) = v {
                want.entry(tag.to_string())
                    .or_default()
                    .push((r.step, v as f32));
            }
        }
    }
    want
}

#[test]
fn tensorboard_reads_the_event_files_and_a_resume_appends_a_new_one() {
    let Some(py) = tb_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = train_common::tiny_model(&tmp.path().join("m"), 65, 3);
    let data = Data::open(&train_common::pretrain_data(&tmp.path().join("d"), 64, 16)).unwrap();
    let out = tmp.path().join("o");
    let runs = out.join("runs");

    // Uninterrupted: every metrics line's scalars, under HF Trainer's tags, float32-exact.
    run(&model, &data, &out, None, None);
    assert_eq!(event_files(&runs).len(), 1);
    let records = metrics::read(&out.join(metrics::METRICS_FILE)).unwrap();
    let want = expected(&records);
    assert_eq!(want["train/loss"].len(), 4);
    assert_eq!(want["eval/loss"].len(), 2);
    let got = read_back(&py, &runs);
    assert_eq!(got, want, "TensorBoard's scalars vs metrics.jsonl");
    // fp32 mode: no loss scale.
    assert!(!got.contains_key("train/loss_scale"));

    // Interrupted after step 3 (checkpoint-2 is the last), then resumed from checkpoint-2: a
    // second file; the first stays as it was; TensorBoard shows steps 1..4 once each, step 3
    // from the resumed run (the interrupted run's step 3 is purged).
    let out2 = tmp.path().join("o2");
    let runs2 = out2.join("runs");
    run(&model, &data, &out2, None, Some(3));
    let first = event_files(&runs2);
    assert_eq!(first.len(), 1);
    let before = std::fs::read(&first[0]).unwrap();
    let interrupted = read_back(&py, &runs2);
    assert_eq!(
        interrupted["train/loss"]
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    run(&model, &data, &out2, Some(&out2.join("checkpoint-2")), None);
    let files = event_files(&runs2);
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0], first[0]);
    assert_eq!(
        std::fs::read(&files[0]).unwrap(),
        before,
        "the earlier file was rewritten"
    );
    let resumed = read_back(&py, &runs2);
    let records2 = metrics::read(&out2.join(metrics::METRICS_FILE)).unwrap();
    assert_eq!(resumed, expected(&records2));
    // Same data, same steps: the resumed run retraces the uninterrupted one's losses.
    assert_eq!(resumed["train/loss"], want["train/loss"]);
}
