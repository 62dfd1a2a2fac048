//! The logged step loss is the mean of the micro-batch losses over the micro-batches that have a
//! target; one without (every label -100) is left out and counted in `empty_micro_batches`.

mod train_common;

use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::LocalComm;
use zhllama::model::llama::Activations;
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::data::{Batch, Data};
use zhllama::train::{setup, trainer::Trainer};

fn batch(seed: i32, empty: bool) -> Batch {
    let (b, t) = (2, 12);
    let ids: Vec<i32> = (0..(b * t) as i32)
        .map(|i| 3 + (i * 7 + seed * 13) % 60)
        .collect();
    let labels = if empty {
        vec![-100; b * t]
    } else {
        // prompt masked, response kept (SFT-style)
        ids.iter()
            .enumerate()
            .map(|(i, &x)| if i % t < 5 { -100 } else { x })
            .collect()
    };
    Batch {
        b,
        t,
        tokens: b * t,
        ids,
        labels,
    }
}

#[test]
fn micro_batches_without_targets_are_left_out_of_the_logged_mean() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = train_common::tiny_model(&tmp.path().join("m"), 65, 3);
    let data = Data::open(&train_common::pretrain_data(&tmp.path().join("d"), 64, 16)).unwrap();
    let cfg = TrainConfig {
        batch_size: 6,
        micro_batch_size: 2,
        max_steps: 2,
        lora_rank: 4,
        lora_targets: vec!["q_proj".into(), "v_proj".into()],
        ..TrainConfig::preset(Stage::Sft)
    };
    let be = Arc::new(CpuBackend::new());
    let model = setup::load_model(be, &model_dir, &cfg, Stage::Sft, 65, None).unwrap();
    let batches = vec![batch(1, false), batch(2, true), batch(3, false)];
    // Each micro-batch's loss on the weights before the step, computed independently.
    let mut acts = Activations::new(&model, 2, 12).unwrap();
    let l0 = model
        .forward(&mut acts, &batches[0].ids, &batches[0].labels)
        .unwrap() as f64;
    let l2 = model
        .forward(&mut acts, &batches[2].ids, &batches[2].labels)
        .unwrap() as f64;
    let comm = LocalComm;
    let mut t = Trainer::new(
        model,
        &data,
        cfg,
        Stage::Sft,
        &comm,
        &tmp.path().join("o"),
        None,
    )
    .unwrap();
    let rec = t.step_with(&batches, false).unwrap();
    let want = (l0 + l2) / 2.0;
    let got = rec.loss.unwrap();
    // Same forward on the same weights, summed in f64: only the f32 loss rounding differs.
    assert!(
        (got - want).abs() <= 1e-6 * want,
        "logged {got}, mean of the two with targets {want}"
    );
    assert_eq!(rec.empty_micro_batches, Some(1));
    // Counting the empty one (loss 0) would have logged 2/3 of it.
    assert!((got - (l0 + l2) / 3.0).abs() > 0.1);

    // All empty: no loss logged, three counted.
    let all_empty = vec![batch(4, true), batch(5, true), batch(6, true)];
    let rec = t.step_with(&all_empty, false).unwrap();
    assert_eq!(rec.loss, None);
    assert_eq!(rec.empty_micro_batches, Some(3));
}
