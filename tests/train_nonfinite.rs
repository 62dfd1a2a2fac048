//! NaN/Inf in the loss or gradients: the step is skipped and counted, weights are untouched,
//! and after `max_consecutive_skips` in a row the run stops with the last good checkpoint intact.

mod train_common;

use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::LocalComm;
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::data::Data;
use zhllama::train::trainer::{RunOptions, Trainer};
use zhllama::train::{checkpoint, metrics, setup};

fn cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        micro_batch_size: 2,
        max_steps: 12,
        save_steps: 3,
        lora_rank: 4,
        learning_rate: 1e-2,
        max_consecutive_skips: 3,
        ..TrainConfig::preset(Stage::Pt2)
    }
}

#[test]
fn nonfinite_steps_are_skipped_then_the_run_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = train_common::tiny_model(&tmp.path().join("m"), 64, 3);
    let data = Data::open(&train_common::pretrain_data(&tmp.path().join("d"), 64, 16)).unwrap();
    let out = tmp.path().join("out");
    let comm = LocalComm;
    let be = Arc::new(CpuBackend::new());
    let model = setup::load_model(be, &model_dir, &cfg(), Stage::Pt2, 64, None).unwrap();
    let mut t = Trainer::new(model, &data, cfg(), Stage::Pt2, &comm, &out, None).unwrap();

    // Step 4 (0-based) is poisoned once: skipped, counted, weights untouched; training goes on.
    let opts = RunOptions {
        stop_after: Some(4),
        ..RunOptions::default()
    };
    t.run(&opts).unwrap();
    let before = t.params().to_vec();
    let rec = t.step(true).unwrap();
    assert_eq!(rec.skipped, Some(true));
    assert!(rec.loss.unwrap().is_nan());
    assert_eq!(t.state().skipped_steps, 1);
    assert!(
        before == t.params(),
        "a skipped step must not change any weight"
    );
    let rec = t.step(false).unwrap();
    assert_eq!(rec.skipped, Some(false));
    assert_eq!(t.state().consecutive_skips, 0);
    assert!(before != t.params());

    // Steps 6.. poisoned: after 3 in a row the run stops with an error; checkpoint-3 (the last
    // one saved; steps 4-5 above ran outside `run`) is intact and its weights are finite.
    let opts = RunOptions {
        inject_nonfinite_steps: (6..12).collect(),
        ..RunOptions::default()
    };
    let err = format!("{:#}", t.run(&opts).unwrap_err());
    assert!(
        err.contains("3 consecutive") && err.contains("checkpoint-3"),
        "{err}"
    );
    assert_eq!(t.state().step, 9);
    assert_eq!(t.state().skipped_steps, 4);
    let newest = checkpoint::list(&out).unwrap();
    assert_eq!(newest[0].0, 3, "no checkpoint written after the bad steps");
    let state = checkpoint::verify(&newest[0].1).unwrap();
    assert_eq!(state.skipped_steps, 0);
    let recs = metrics::read(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        recs.iter().filter(|r| r.skipped == Some(true)).count(),
        3,
        "skipped steps of run() are logged"
    );
    // Resuming from it works and reaches the end.
    let be = Arc::new(CpuBackend::new());
    let model = setup::load_model(be, &model_dir, &cfg(), Stage::Pt2, 64, None).unwrap();
    let mut t = Trainer::new(
        model,
        &data,
        cfg(),
        Stage::Pt2,
        &comm,
        &out,
        Some(&newest[0].1),
    )
    .unwrap();
    assert!(t.params().iter().all(|x| x.is_finite()));
    let s = t
        .run(&RunOptions {
            resume_from: Some(newest[0].1.clone()),
            ..RunOptions::default()
        })
        .unwrap();
    assert_eq!(s.step, 12);
}
