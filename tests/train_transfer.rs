//! What crosses host↔device in a plain training step (`Trainer::step`, no eval, checkpoint or
//! logging), counted by the backend (`Backend::host_transfer_bytes`), at worlds 1 and 2:
//! per micro-batch the token ids and labels going in (4 bytes each per token) and the loss sum
//! coming out (one `f64`), plus one `f64` per tree node of the gradient norm this rank owns —
//! and nothing that grows with the number of trainable parameters (no gradient, optimizer state
//! or weights). The expected count is computed here from the batches and the shard arithmetic.

mod train_common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::{Comm, LocalComm, ShardLayout, ThreadComm};
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::data::{Batch, Data};
use zhllama::train::setup;
use zhllama::train::trainer::Trainer;

/// Bound on what a plain step moves besides its data (the tokens in): the loss sums and the norm's
/// scalars, whatever the model size.
const BUDGET: u64 = 4096;

fn cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        micro_batch_size: 1,
        max_steps: 10,
        lora_rank: 4,
        lora_dropout: 0.1,
        learning_rate: 1e-2,
        ..TrainConfig::preset(Stage::Sft)
    }
}

/// The maximal nodes of the canonical pairwise tree over `[0, p)` inside `[a, b)` (split at the
/// largest power of two strictly below the length), counted.
fn tree_nodes_inside(p: usize, a: usize, b: usize) -> u64 {
    fn rec(lo: usize, hi: usize, a: usize, b: usize) -> u64 {
        if hi <= a || lo >= b || lo >= hi {
            return 0;
        }
        if a <= lo && hi <= b {
            return 1;
        }
        let n = hi - lo;
        let mut h = 1;
        while h * 2 < n {
            h *= 2;
        }
        rec(lo, lo + h, a, b) + rec(lo + h, hi, a, b)
    }
    rec(0, p, a, b)
}

/// Per step: (counted bytes, expected bytes, the data's share) on this rank, for three steps.
fn run(comm: &dyn Comm, model_dir: &Path, data: &Data) -> Vec<(u64, u64, u64)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let c = cfg();
    let be = Arc::new(CpuBackend::new());
    let m = setup::load_model(be.clone(), model_dir, &c, Stage::Sft, 65, None).unwrap();
    let p = m.layout().trainable_len();
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(m, data, c, Stage::Sft, comm, tmp.path(), None).unwrap();
    let accum = 4 / world;
    let shard = ShardLayout::new(p, world).range(rank);
    let nodes = tree_nodes_inside(p, shard.start, shard.end);
    let mut out = Vec::new();
    for step in 0..3usize {
        let batches: Vec<Batch> = (0..accum)
            .map(|a| data.batch(&[(step * 4 + rank * accum + a) % data.train_len()]))
            .collect();
        let tokens: u64 = batches.iter().map(|b| (b.b * b.t) as u64).sum();
        let before = be.host_transfer_bytes();
        let rec = t.step_with(&batches, false).unwrap();
        assert_eq!(rec.skipped, Some(false));
        // ids up, labels up; one f64 loss sum per micro-batch and one per owned norm-tree node down.
        let counted = be.host_transfer_bytes() - before;
        let scalars = 8 * accum as u64 + 8 * nodes;
        out.push((counted, 8 * tokens + scalars, 8 * tokens));
    }
    out
}

#[test]
fn a_plain_step_moves_only_tokens_and_scalars() {
    let tmp = tempfile::tempdir().unwrap();
    let model = train_common::tiny_model(&tmp.path().join("m"), 65, 9);
    let data = Data::open(&train_common::sft_data(&tmp.path().join("d"), 64, 200)).unwrap();
    let check = |world: usize, rank: usize, steps: Vec<(u64, u64, u64)>| {
        for (i, (got, want, data)) in steps.into_iter().enumerate() {
            assert_eq!(got, want, "world {world} rank {rank} step {i}: bytes moved");
            assert!(
                got - data <= BUDGET,
                "world {world} rank {rank} step {i}: {} bytes besides the data > {BUDGET}",
                got - data
            );
        }
    };
    check(1, 0, run(&LocalComm, &model, &data));
    let res = ThreadComm::run(2, Duration::from_secs(60), |comm| {
        Ok(run(&comm, &model, &data))
    });
    for (rank, r) in res.into_iter().enumerate() {
        check(2, rank, r.unwrap());
    }
}
