//! A miniature training loop over a toy objective, to test the distributed runtime without a
//! model: the same calls a real loop makes (batch schedule, micro-batch accumulation, ZeRO-2 step,
//! checkpoint, resume), on a least-squares problem whose gradients span several orders of
//! magnitude (so summation order shows up in the bits).

use super::Comm;
use super::shard::BatchSchedule;
use super::zero::{GradAccumulator, StepReport, Zero2};
pub use super::zero::{checkpoint_dir, latest_checkpoint};
use crate::backend::AdamW;
use anyhow::Result;
use std::path::PathBuf;

/// Least squares: example `i` has features `x_i` (trainable part, `n_params`) and `z_i` (frozen
/// part, `n_frozen`), target `y_i`; loss `½(w·x_i + f·z_i − y_i)²`. Everything is a hash of
/// `(seed, i, j)`, so every rank generates the same data without reading anything.
#[derive(Clone, Copy, Debug)]
pub struct ToyProblem {
    pub n_params: usize,
    pub n_frozen: usize,
    pub n_examples: usize,
    pub seed: u64,
}

fn hash3(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        .wrapping_add(c.wrapping_mul(0x1656_67B1_9E37_79F9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [-1, 1).
fn unit(h: u64) -> f32 {
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

impl ToyProblem {
    /// Feature `j` of example `i`; coordinate `j` is scaled by `10^(−3 … +1)` so the gradient's
    /// coordinates span four decades.
    pub fn feature(&self, i: usize, j: usize) -> f32 {
        let scale = 10f32.powf(-3.0 + 4.0 * ((j * 7919) % 97) as f32 / 96.0);
        unit(hash3(self.seed, i as u64, j as u64)) * scale
    }

    fn frozen_feature(&self, i: usize, k: usize) -> f32 {
        unit(hash3(self.seed ^ 0xF00D, i as u64, k as u64))
    }

    fn target(&self, i: usize) -> f32 {
        3.0 * unit(hash3(self.seed ^ 0x7A5, i as u64, 0))
    }

    /// The initial trainable weights.
    pub fn init_params(&self) -> Vec<f32> {
        (0..self.n_params)
            .map(|j| 0.1 * unit(hash3(self.seed ^ 0x1417, j as u64, 1)))
            .collect()
    }

    /// The frozen weights (replicated, never communicated).
    pub fn frozen(&self) -> Vec<f32> {
        (0..self.n_frozen)
            .map(|k| 0.5 * unit(hash3(self.seed ^ 0xF2, k as u64, 2)))
            .collect()
    }

    /// `grad +=` the loss gradient of each example in `examples` (in order); returns the summed
    /// loss.
    pub fn accumulate_grad(
        &self,
        grad: &mut [f32],
        params: &[f32],
        frozen: &[f32],
        examples: &[usize],
    ) -> f64 {
        let mut loss = 0.0;
        let mut x = vec![0f32; self.n_params];
        for &i in examples {
            for (j, xj) in x.iter_mut().enumerate() {
                *xj = self.feature(i, j);
            }
            let mut pred: f32 = x.iter().zip(params).map(|(a, b)| a * b).sum();
            for (k, f) in frozen.iter().enumerate() {
                pred += self.frozen_feature(i, k) * f;
            }
            let r = pred - self.target(i);
            loss += 0.5 * (r as f64) * (r as f64);
            for (g, xj) in grad.iter_mut().zip(&x) {
                *g += r * xj;
            }
        }
        loss
    }
}

/// How [`train`] runs.
#[derive(Clone, Debug)]
pub struct ToyRun {
    /// Stop after this many optimizer steps in all (resumed runs count the loaded ones).
    pub steps: u64,
    pub micro: usize,
    /// Micro-batches per rank per step.
    pub accum: usize,
    pub hp: AdamW,
    pub max_norm: Option<f32>,
    pub bucket_elems: usize,
    /// Sum micro-batches with [`GradAccumulator`] (pairwise) instead of a running `+=`.
    pub pairwise: bool,
    /// Save a checkpoint to `ckpt_root/step-NNNNNN` every this many steps.
    pub save_every: Option<u64>,
    pub ckpt_root: Option<PathBuf>,
    /// Resume from this checkpoint directory.
    pub resume: Option<PathBuf>,
}

/// The end state of a toy run on one rank.
pub struct ToyResult {
    pub params: Vec<f32>,
    pub reports: Vec<StepReport>,
    pub losses: Vec<f64>,
    pub zero: Zero2,
}

/// Run (or resume) a toy training on this rank. `after_step(step, comm, zero)` runs after every
/// optimizer step and checkpoint (tests use it to fail a rank on purpose).
pub fn train(
    comm: &dyn Comm,
    problem: &ToyProblem,
    run: &ToyRun,
    after_step: &mut dyn FnMut(u64, &dyn Comm, &Zero2) -> Result<()>,
) -> Result<ToyResult> {
    let (rank, world, p) = (comm.rank(), comm.world_size(), problem.n_params);
    let frozen = problem.frozen();
    let mut params = problem.init_params();
    let mut zero = match &run.resume {
        Some(dir) => {
            let mut z = Zero2::load(dir, rank, world, p, run.bucket_elems)?;
            z.gather_params(comm, &mut params)?;
            z
        }
        None => Zero2::new(rank, world, p, run.bucket_elems),
    };
    let mut sched = BatchSchedule::new(
        problem.n_examples,
        problem.seed,
        run.micro,
        run.accum,
        world,
    );
    let scale = 1.0 / sched.global_batch() as f32;
    let mut acc = GradAccumulator::new(p);
    let mut micro_grad = vec![0f32; p];
    let mut grads = vec![0f32; p];
    let (mut reports, mut losses) = (Vec::new(), Vec::new());
    for step in zero.updates()..run.steps {
        grads.fill(0.0);
        let mut loss = [0f64];
        for mb in sched.rank_micro_batches(step, rank) {
            if run.pairwise {
                micro_grad.fill(0.0);
                loss[0] += problem.accumulate_grad(&mut micro_grad, &params, &frozen, &mb);
                acc.push(&micro_grad)?;
            } else {
                loss[0] += problem.accumulate_grad(&mut grads, &params, &frozen, &mb);
            }
        }
        if run.pairwise {
            acc.finish(&mut grads)?;
        }
        comm.all_reduce_sum_f64(&mut loss)?;
        losses.push(loss[0] / sched.global_batch() as f64);
        let hp = AdamW {
            step: zero.updates() + 1,
            ..run.hp
        };
        reports.push(zero.step(comm, &mut params, &mut grads, scale, run.max_norm, hp)?);
        if let (Some(every), Some(root)) = (run.save_every, &run.ckpt_root)
            && (step + 1) % every == 0
        {
            let state = serde_json::json!({ "step": step + 1, "losses": losses });
            zero.save_checkpoint(comm, &checkpoint_dir(root, step + 1), |tmp| {
                crate::util::write_atomic(&tmp.join("loop.json"), state.to_string().as_bytes())
            })?;
        }
        after_step(step + 1, comm, &zero)?;
    }
    Ok(ToyResult {
        params,
        reports,
        losses,
        zero,
    })
}
