//! The logged step loss is the mean of the micro-batch losses over the micro-batches that have a
//! target; one without (every label -100) is left out and counted in `empty_micro_batches`.
//! `loss_reduction = token-mean` weighs every target token of the step alike, across ranks.

mod train_common;

use std::sync::Arc;
use std::time::Duration;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::{LocalComm, ThreadComm};
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

/// A micro-batch with `keep` response tokens per row (the rest of each row is prompt, -100).
fn uneven_batch(seed: i32, keep: usize) -> Batch {
    let mut b = batch(seed, false);
    for (i, l) in b.labels.iter_mut().enumerate() {
        *l = if i % b.t >= b.t - keep {
            b.ids[i]
        } else {
            -100
        };
    }
    b
}

fn token_mean_cfg(world: usize, reduction: &str) -> TrainConfig {
    TrainConfig {
        batch_size: 8,
        micro_batch_size: 2,
        max_steps: 3,
        learning_rate: 1e-2,
        lora_rank: 4,
        lora_dropout: 0.0,
        lora_targets: vec!["q_proj".into(), "v_proj".into()],
        world_size: world,
        loss_reduction: reduction.into(),
        ..TrainConfig::preset(Stage::Sft)
    }
}

/// (per-step logged losses, final trainable weights) of three steps over `steps` (each the
/// global micro-batches of one step; rank r takes its `accumulation` of them in order).
fn run_steps(
    comm: &dyn zhllama::distributed::Comm,
    model_dir: &std::path::Path,
    data: &Data,
    reduction: &str,
    steps: &[Vec<Batch>],
) -> (Vec<f64>, Vec<f32>) {
    let world = comm.world_size();
    let cfg = token_mean_cfg(world, reduction);
    let be = Arc::new(CpuBackend::new());
    let model = setup::load_model(be, model_dir, &cfg, Stage::Sft, 65, None).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(model, data, cfg, Stage::Sft, comm, out.path(), None).unwrap();
    let accum = steps[0].len() / world;
    let rank = comm.rank();
    let losses = steps
        .iter()
        .map(|s| {
            let mine = &s[rank * accum..(rank + 1) * accum];
            t.step_with(mine, false).unwrap().loss.unwrap()
        })
        .collect();
    (losses, t.params().to_vec())
}

/// `--loss-reduction token-mean`: the logged loss is every target's loss over the whole
/// accumulated batch of all ranks, averaged; the target count is summed across ranks, so world 2
/// (two micro-batches per rank) gives world 1's (four micro-batches) losses and weights bit for
/// bit (same seeds `n_m · 4 / N` on both; a rank dividing by its own count would not).
#[test]
fn token_mean_weighs_every_target_alike_across_micro_batches_and_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = train_common::tiny_model(&tmp.path().join("m"), 65, 5);
    let data = Data::open(&train_common::pretrain_data(&tmp.path().join("d"), 64, 16)).unwrap();
    // Target counts per micro-batch very unequal (2 rows × 1, 9, 3, 6 response tokens, the
    // shifted loss reads them all), and ranks holding different totals.
    let keeps = [1usize, 9, 3, 6];
    let steps: Vec<Vec<Batch>> = (0..3)
        .map(|s| {
            keeps
                .iter()
                .enumerate()
                .map(|(i, &k)| uneven_batch(10 * s + i as i32, k))
                .collect()
        })
        .collect();

    // Independent reference for step 1: forward each micro-batch on the initial weights.
    let cfg = token_mean_cfg(1, "token-mean");
    let model = setup::load_model(
        Arc::new(CpuBackend::new()),
        &model_dir,
        &cfg,
        Stage::Sft,
        65,
        None,
    )
    .unwrap();
    let mut acts = Activations::new(&model, 2, 12).unwrap();
    let (mut sum, mut count, mut means) = (0.0f64, 0usize, 0.0f64);
    for b in &steps[0] {
        means += model.forward(&mut acts, &b.ids, &b.labels).unwrap() as f64;
        sum += acts.loss_sum();
        count += acts.num_targets();
    }
    assert_eq!(count, 2 * (1 + 9 + 3 + 6));
    let (want_token, want_micro) = (sum / count as f64, means / 4.0);

    let (l1, w1) = run_steps(&LocalComm, &model_dir, &data, "token-mean", &steps);
    // Same forward, same f64 sum: only the order of adding the per-micro-batch sums differs.
    assert!(
        (l1[0] - want_token).abs() <= 1e-12 * want_token,
        "logged {} vs Σ loss / Σ targets {want_token}",
        l1[0]
    );
    // The two reductions differ on these batches by far more than that.
    assert!(
        (want_token - want_micro).abs() > 1e-3,
        "{want_token} vs {want_micro}"
    );
    let (m1, wm) = run_steps(&LocalComm, &model_dir, &data, "micro-batch-mean", &steps);
    assert!((m1[0] - want_micro).abs() <= 1e-6 * want_micro);
    assert!(wm != w1, "the reductions gave the same weights");

    let res = ThreadComm::run(2, Duration::from_secs(60), |comm| {
        Ok(run_steps(&comm, &model_dir, &data, "token-mean", &steps))
    });
    for (rank, r) in res.into_iter().enumerate() {
        let (l, w) = r.unwrap();
        assert_eq!(l, l1, "world 2 rank {rank}: losses differ from world 1");
        assert!(w == w1, "world 2 rank {rank}: weights differ from world 1");
    }
}
