//! The training loop: micro-batches → forward/backward → gradient accumulation → one ZeRO-2 step
//! (reduce-scatter, global norm, non-finite skip, clipping, AdamW on the shard, all-gather), the
//! cosine schedule, metrics, evaluation and checkpoints.
//!
//! Generic over the backend `B` and the communicator (`&dyn Comm`): world 1 runs the same code
//! path as world N ([`Zero2`] over a [`crate::distributed::LocalComm`]). Only rank 0 logs, writes
//! metrics and writes the checkpoint manifest.
//!
//! Loss semantics, `loss_reduction = micro-batch-mean` (the original scripts' Trainer, the
//! default): each micro-batch's loss is the mean over its non-ignored targets; the step's gradient
//! is the mean over the micro-batches of all ranks (`grad_scale = 1 / (accumulation × world)`);
//! the logged loss is the mean of the micro-batch losses, over the micro-batches that have a
//! target (`empty_micro_batches` in the record counts the others).
//!
//! `loss_reduction = token-mean` (current HF Trainer's `num_items_in_batch`): the step's loss is
//! the sum of every target's loss over all micro-batches of all ranks divided by their number
//! `N` (counted on the host from the labels, summed across ranks by one scalar all-reduce before
//! the micro-batches). Micro-batch `m` with `n_m` targets seeds its backward with the weight
//! `n_m · accumulation · world / N` (times the fp16 loss scale), so with the unchanged
//! `grad_scale` the gradient is `Σ_m n_m/N · ∇(mean loss of m)`; the weight is 1 when every
//! micro-batch has as many targets, and the per-token gradient keeps the micro-batch-mean
//! mode's magnitude (what the fp16 range cares about). No extra host↔device transfer: the
//! logged loss is built from the same per-micro-batch loss sums.
//!
//! The step stays on the backend: micro-batch gradients are summed on the device
//! ([`DeviceAccumulator`], the canonical pairwise order), and ZeRO-2 ([`DeviceZero2`]: reduce-
//! scatter, norm, clipping, AdamW writing the weights, all-gather) runs on backend buffers. What
//! crosses host↔device in a plain step is the token ids, one loss sum per micro-batch and the
//! norm's tree-node sums (see [`Trainer::step`]). On the last micro-batch of a step at world > 1, each
//! gradient range the backward finishes is summed and handed to the reduce-scatter at once
//! (overlap; see docs/DESIGN-NOTES.md).
//!
//! fp16 mode (`fp16 = true`, see [`super::loss_scale`]): each backward is seeded with the loss
//! scale `S` and ZeRO-2 unscales with `grad_scale = 1 / (accumulation × world × S)` before the
//! norm and clipping. As DeepSpeed's ZeRO-2 fp16 optimizer: a gradient with a NaN/Inf (an
//! overflow) skips the step on every rank (weights, Adam state and the AdamW step count
//! untouched), the scaler is updated after every step, and the LR scheduler advances only on
//! applied steps (DeepSpeed's engine does not step it on an overflow), so the LR follows the
//! number of applied updates rather than the step counter.

use super::checkpoint::{self, TrainerState};
use super::config::{Stage, TrainConfig};
use super::data::{Batch, Data};
use super::loss_scale::{DynamicLossScaler, ScaleUpdate};
use super::metrics::{MetricsWriter, Progress, Record};
use super::schedule::CosineSchedule;
use crate::backend::{AdamW, Backend};
use crate::distributed::shard::BatchSchedule;
use crate::distributed::zero::DeviceAccumulator;
use crate::distributed::{Comm, DeviceZero2, Zero2};
use crate::model::Llama;
use crate::model::llama::Activations;
use crate::util::hash::mix64;
use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// ZeRO-2 bucket: elements per reduce-scatter / all-gather call, all ranks together (the
/// recipe's DeepSpeed `reduce_bucket_size` / `allgather_bucket_size` of 1e8); the default of the
/// `reduce_bucket_size` config key.
pub const BUCKET_ELEMS: usize = 100_000_000;

/// Run options that are not hyper-parameters.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint directory.
    pub resume_from: Option<PathBuf>,
    /// Show the progress bar (rank 0 only).
    pub progress: bool,
    /// Stop after this many optimizer steps in this process (the run itself is not shortened:
    /// a later `--resume` continues). For tests and time-boxed jobs.
    pub stop_after: Option<u64>,
    /// Fault injection for tests: make the loss of these (0-based) steps NaN on every rank.
    pub inject_nonfinite_steps: Vec<u64>,
    /// Fault injection for tests: make the summed gradient of these (0-based) steps overflow on
    /// this rank (an Inf; the loss stays finite), as an fp16 overflow does.
    pub inject_overflow_steps: Vec<u64>,
}

/// What a finished (or stopped) run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Optimizer steps done (skipped included).
    pub step: u64,
    /// Mean loss of each step run in this process, in order (NaN for a non-finite step).
    pub losses: Vec<f64>,
    pub skipped_steps: u64,
    pub last_checkpoint: Option<PathBuf>,
}

/// Key of the LoRA dropout masks of global micro-batch `k` (counter-based: the RNG state is
/// just `(seed, k)`).
pub fn dropout_key(seed: u64, k: u64) -> u64 {
    mix64(seed ^ mix64(k ^ 0x5eed_d409))
}

struct ActCache<B: Backend> {
    map: HashMap<(usize, usize), Activations<B>>,
}

impl<B: Backend> ActCache<B> {
    /// Activations for shape `(b, t)`, allocated once per shape (at most 8 kept).
    fn get(&mut self, model: &Llama<B>, b: usize, t: usize) -> Result<&mut Activations<B>> {
        if !self.map.contains_key(&(b, t)) {
            if self.map.len() >= 8 {
                self.map.clear();
            }
            self.map.insert((b, t), Activations::new(model, b, t)?);
        }
        Ok(self.map.get_mut(&(b, t)).expect("inserted"))
    }
}

/// The trainer: a model, its data, the optimizer state, and where the run lives.
pub struct Trainer<'a, B: Backend> {
    pub model: Llama<B>,
    pub data: &'a Data,
    pub cfg: TrainConfig,
    pub stage: Stage,
    pub comm: &'a dyn Comm,
    pub output: PathBuf,
    zero: DeviceZero2<B>,
    sched: CosineSchedule,
    batches: BatchSchedule,
    accum: usize,
    acc: DeviceAccumulator<B>,
    /// [`Trainer::params`]'s host copy (empty until asked for).
    params_host: Vec<f32>,
    acts: ActCache<B>,
    state: TrainerState,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Set up a run of `model` on `data`; with `resume_from`, restore the optimizer state, the
    /// trainable weights, the schedule position, the RNG state and the data cursor.
    pub fn new(
        model: Llama<B>,
        data: &'a Data,
        cfg: TrainConfig,
        stage: Stage,
        comm: &'a dyn Comm,
        output: &Path,
        resume_from: Option<&Path>,
    ) -> Result<Self> {
        cfg.validate()?;
        let world = comm.world_size();
        let accum = cfg.accumulation_steps(world)?;
        let vocab = model.config().vocab_size;
        ensure!(
            data.vocab_size() <= vocab,
            "the data was tokenized with a vocabulary of {} ids, the model has {vocab}",
            data.vocab_size()
        );
        ensure!(data.train_len() > 0, "the data has no training examples");
        ensure!(
            data.max_seq_len() <= cfg.max_length,
            "the data's sequences are up to {} tokens, max_length is {}",
            data.max_seq_len(),
            cfg.max_length
        );
        let be = model.backend().clone();
        let p = model.layout().trainable_len();
        let sched = CosineSchedule {
            base_lr: cfg.learning_rate,
            warmup_steps: cfg.warmup(),
            total_steps: cfg.max_steps,
        };
        let batches = BatchSchedule::new(
            data.train_len(),
            cfg.seed,
            cfg.micro_batch_size,
            accum,
            world,
        );
        let mut state = TrainerState {
            stage: stage.to_string(),
            step: 0,
            next_example: 0,
            global_batch: batches.global_batch(),
            train_examples: data.train_len(),
            rng_seed: cfg.seed,
            next_micro_batch: 0,
            skipped_steps: 0,
            consecutive_skips: 0,
            tokens: 0,
            world_size: world,
            trainable_len: p,
            vocab_size: vocab,
            config: cfg.clone(),
            loss_scaler: if cfg.fp16 {
                Some(cfg.loss_scaler()?)
            } else {
                None
            },
        };
        let bucket = cfg.reduce_bucket_size;
        let mut zero = DeviceZero2::new(&*be, comm.rank(), world, p, bucket)?;
        let mut model = model;
        model.set_gradient_checkpointing(cfg.gradient_checkpointing);
        if let Some(dir) = resume_from {
            let saved = checkpoint::verify(dir)
                .with_context(|| format!("refusing to resume from {}", dir.display()))?;
            checkpoint::check_compatible(&saved.config, &cfg)?;
            ensure!(
                saved.stage == state.stage
                    && saved.trainable_len == p
                    && saved.vocab_size == vocab
                    && saved.train_examples == state.train_examples,
                "{}: checkpoint of stage {} with {} trainable elements, vocab {}, {} examples; \
                 this run: stage {}, {p}, vocab {vocab}, {} examples",
                dir.display(),
                saved.stage,
                saved.trainable_len,
                saved.vocab_size,
                saved.train_examples,
                state.stage,
                state.train_examples
            );
            ensure!(
                saved.global_batch == state.global_batch,
                "{}: global batch {} in the checkpoint, {} now",
                dir.display(),
                saved.global_batch,
                state.global_batch
            );
            let host = Zero2::load(dir, comm.rank(), world, p, bucket)?;
            zero = DeviceZero2::from_host(&*be, &host, bucket)?;
            zero.gather_params(comm, &*be, model.trainable_mut())?;
            ensure!(
                saved.loss_scaler.is_some() == cfg.fp16,
                "{}: checkpoint {} a loss scaler, this run has fp16 = {}",
                dir.display(),
                if saved.loss_scaler.is_some() {
                    "has"
                } else {
                    "has no"
                },
                cfg.fp16
            );
            state = TrainerState {
                world_size: world,
                config: cfg.clone(),
                ..saved
            };
        }
        Ok(Trainer {
            acc: DeviceAccumulator::new(p),
            params_host: Vec::new(),
            acts: ActCache {
                map: HashMap::new(),
            },
            model,
            data,
            cfg,
            stage,
            comm,
            output: output.to_path_buf(),
            zero,
            sched,
            batches,
            accum,
            state,
        })
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    pub fn zero(&self) -> &DeviceZero2<B> {
        &self.zero
    }

    /// The trainable flat buffer as the forward reads it, downloaded into a host copy on each
    /// call (not part of a step; on the CPU backend these are the master weights' bits).
    pub fn params(&mut self) -> &[f32] {
        let be = self.model.backend();
        self.params_host
            .resize(be.buf_len(self.model.trainable()), 0.0);
        be.download(self.model.trainable(), &mut self.params_host)
            .expect("downloading the trainable weights");
        &self.params_host
    }

    /// One micro-batch: forward (training mode, dropout key of global micro-batch `k`) and
    /// backward, seeded with `seed` (1, or the fp16 loss scale), into a zeroed gradient buffer
    /// pushed onto the device accumulator; returns the loss (NaN when `poison`). With `last` (the
    /// step's last micro-batch at world > 1) the sum is finished range by range as the backward
    /// finalizes it, and each range goes to ZeRO-2's reduce-scatter at once (overlap); the
    /// step's summed gradient is returned (else it stays in the accumulator).
    fn micro_step(
        &mut self,
        batch: &Batch,
        k: u64,
        poison: bool,
        seed: f32,
        last: bool,
    ) -> Result<(f32, f64, Option<B::Buf>)> {
        let be = self.model.backend().clone();
        let acts = self.acts.get(&self.model, batch.b, batch.t)?;
        acts.training = true;
        acts.rng_key = dropout_key(self.cfg.seed, k);
        let loss = self.model.forward(acts, &batch.ids, &batch.labels)?;
        let (loss, loss_sum) = if poison {
            (f32::NAN, f64::NAN)
        } else {
            (loss, acts.loss_sum())
        };
        let mut grad = self.acc.take(&be)?;
        if !last {
            self.model.backward(acts, &mut grad, seed)?;
            self.acc.push(&be, grad)?;
            return Ok((loss, loss_sum, None));
        }
        let (acc, zero, comm) = (&mut self.acc, &mut self.zero, self.comm);
        let mut done: Vec<Range<usize>> = Vec::new();
        let mut failed: Option<anyhow::Error> = None;
        let mut on_ready = |g: &B::Buf, range: Range<usize>| {
            if failed.is_some() {
                return;
            }
            let r = (|| -> Result<()> {
                for piece in uncovered(&done, range.clone()) {
                    acc.finish_range(&*be, g, piece)?;
                }
                insert_merged(&mut done, range.clone());
                zero.grads_ready(comm, &*be, acc.final_buf(g), range)?;
                Ok(())
            })();
            if let Err(e) = r {
                failed = Some(e);
            }
        };
        self.model
            .backward_with(acts, &mut grad, seed, &mut on_ready)?;
        if let Some(e) = failed {
            return Err(e.context("reduce-scatter during the backward"));
        }
        let sum = self.acc.push_last(&be, grad, &done)?;
        Ok((loss, loss_sum, Some(sum)))
    }

    /// One optimizer step (all micro-batches of this rank, then the ZeRO-2 step). Returns the
    /// metrics record (loss = mean over every rank's micro-batches).
    pub fn step(&mut self, inject_nonfinite: bool) -> Result<Record> {
        self.step_injected(inject_nonfinite, false)
    }

    /// [`Trainer::step`] with fault injection: `nonfinite` makes the loss NaN, `overflow` puts
    /// an Inf into the summed gradient of every rank (the loss stays finite), on every rank.
    pub fn step_injected(&mut self, nonfinite: bool, overflow: bool) -> Result<Record> {
        let rank = self.comm.rank();
        let micro = self.batches.rank_micro_batches(self.state.step, rank);
        let batches: Vec<Batch> = micro.iter().map(|idx| self.data.batch(idx)).collect();
        self.step_impl(&batches, nonfinite, overflow)
    }

    /// [`Trainer::step`] on explicit micro-batches (this rank's `accumulation` of them, in
    /// global order): parity tests feed a reference implementation's batches through here.
    pub fn step_with(&mut self, batches: &[Batch], inject_nonfinite: bool) -> Result<Record> {
        self.step_impl(batches, inject_nonfinite, false)
    }

    fn step_impl(
        &mut self,
        batches: &[Batch],
        inject_nonfinite: bool,
        inject_overflow: bool,
    ) -> Result<Record> {
        let t0 = Instant::now();
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let step = self.state.step;
        ensure!(
            batches.len() == self.accum,
            "step {step}: {} micro-batches given, accumulation is {}",
            batches.len(),
            self.accum
        );
        // fp16: the loss scale S seeds the backward; exact for a power-of-two S (see
        // `loss_scale`), and the unscale below divides it back out.
        let loss_scale = self
            .state
            .loss_scaler
            .as_ref()
            .map(DynamicLossScaler::scale);
        let scale = loss_scale.unwrap_or(1.0);
        let n_micro = (self.accum * world) as f64;
        // token-mean: every micro-batch's target count, and their sum over all ranks.
        let targets: Vec<usize> = batches.iter().map(target_count).collect();
        let token_mean = self.cfg.token_mean();
        let global_targets = if token_mean {
            let mut n = [targets.iter().sum::<usize>() as f64];
            self.comm.all_reduce_sum_f64(&mut n)?;
            n[0]
        } else {
            0.0
        };
        // mean-loss sum, tokens, non-finite micro-batches, micro-batches without a target,
        // token-loss sum
        let mut local = [0.0f64; 5];
        let mut summed = None;
        for (a, batch) in batches.iter().enumerate() {
            let k = (step * world as u64 + rank as u64) * self.accum as u64 + a as u64;
            let last = world > 1 && a + 1 == batches.len();
            let weight = if token_mean && global_targets > 0.0 {
                targets[a] as f64 * n_micro / global_targets
            } else {
                1.0
            };
            let seed = (scale * weight) as f32;
            let (loss, loss_sum, sum) = self.micro_step(batch, k, inject_nonfinite, seed, last)?;
            summed = summed.or(sum);
            if loss.is_finite() {
                local[0] += loss as f64;
                local[4] += loss_sum;
            } else {
                local[2] += 1.0;
            }
            local[1] += batch.tokens as f64;
            if targets[a] == 0 {
                local[3] += 1.0;
            }
        }
        let be = self.model.backend().clone();
        let mut grads = match summed {
            Some(g) => g,
            None => self.acc.finish_buf(&be)?,
        };
        // A non-finite loss (or an injected overflow) on any rank makes the global norm
        // non-finite on every rank, so the step is skipped everywhere.
        let poison = if local[2] > 0.0 {
            Some(f32::NAN)
        } else if inject_overflow {
            Some(f32::INFINITY)
        } else {
            None
        };
        // DeepSpeed steps the LR scheduler only on applied steps in fp16 mode.
        let lr_pos = if loss_scale.is_some() {
            self.zero.updates()
        } else {
            step
        };
        let lr = self.sched.lr(lr_pos);
        let hp = AdamW {
            lr: lr as f32,
            beta1: self.cfg.adam_beta1 as f32,
            beta2: self.cfg.adam_beta2 as f32,
            eps: self.cfg.adam_epsilon as f32,
            weight_decay: self.cfg.weight_decay as f32,
            step: self.zero.updates() + 1,
        };
        let max_norm = (self.cfg.max_grad_norm > 0.0).then_some(self.cfg.max_grad_norm as f32);
        // Unscale before the norm and clipping (ZeRO-2 applies `grad_scale` first).
        let mut grad_scale = 1.0 / (self.accum * world) as f32;
        if let Some(s) = loss_scale {
            grad_scale /= s as f32;
        }
        let report = self.zero.step(
            self.comm,
            &*be,
            self.model.trainable_mut(),
            &mut grads,
            grad_scale,
            max_norm,
            hp,
            poison,
        );
        self.acc.recycle(grads);
        let report = report?;
        self.comm.all_reduce_sum_f64(&mut local)?;
        // micro-batch-mean: the logged loss is the mean over the micro-batches that have a
        // target: one without (an SFT batch whose responses were all cut off) has loss 0 by
        // convention, and counting it would draw a false dip. The gradient scale above is
        // unchanged. token-mean: the loss of every target of the step, averaged.
        let with_targets = n_micro - local[3];
        let loss = if local[2] > 0.0 {
            Some(f64::NAN)
        } else if token_mean {
            (global_targets > 0.0).then(|| local[4] / global_targets)
        } else {
            (with_targets > 0.0).then(|| local[0] / with_targets)
        };
        self.state.step += 1;
        self.state.next_example = self.state.step * self.state.global_batch as u64;
        self.state.next_micro_batch = self.state.step * n_micro as u64;
        self.state.tokens += local[1] as u64;
        let update = self
            .state
            .loss_scaler
            .as_mut()
            .map(|s| s.update(report.skipped));
        if report.skipped {
            self.state.skipped_steps += 1;
            if counts_toward_abort(local[2] > 0.0, update) {
                self.state.consecutive_skips += 1;
            }
        } else {
            self.state.consecutive_skips = 0;
        }
        let secs = t0.elapsed().as_secs_f64();
        Ok(Record {
            step: self.state.step,
            loss,
            empty_micro_batches: Some(local[3] as u64),
            lr: Some(lr),
            grad_norm: Some(report.grad_norm),
            skipped: Some(report.skipped),
            loss_scale,
            skipped_steps: Some(self.state.skipped_steps),
            tokens: Some(self.state.tokens),
            tokens_per_s: Some(local[1] / secs.max(1e-9)),
            ..Record::default()
        })
    }

    /// Mean loss over the validation blocks (`eval_batches` micro-batches at most), split across
    /// ranks; `None` without a validation split.
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        let n = self.data.validation_len();
        if n == 0 {
            return Ok(None);
        }
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let mb = self.cfg.micro_batch_size;
        let mut starts: Vec<usize> = (0..n).step_by(mb).collect();
        if self.cfg.eval_batches > 0 {
            starts.truncate(self.cfg.eval_batches);
        }
        let mut local = [0.0f64; 2]; // loss sum over tokens, target count
        for (j, &s) in starts.iter().enumerate() {
            if j % world != rank {
                continue;
            }
            let idx: Vec<usize> = (s..(s + mb).min(n)).collect();
            let batch = self.data.validation_batch(&idx);
            let acts = self.acts.get(&self.model, batch.b, batch.t)?;
            acts.training = false;
            self.model.forward(acts, &batch.ids, &batch.labels)?;
            local[0] += acts.loss_sum();
            local[1] += acts.num_targets() as f64;
        }
        self.comm.all_reduce_sum_f64(&mut local)?;
        Ok((local[1] > 0.0).then(|| local[0] / local[1]))
    }

    /// Save `checkpoint-<step>` (collective); refuses non-finite weights.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let be = self.model.backend().clone();
        let n = be.buf_len(self.model.trainable());
        let ss = be.sum_squares(be.view(self.model.trainable(), 0..n))?;
        ensure!(
            ss.is_finite(),
            "refusing to save a checkpoint at step {}: the trainable weights are not finite",
            self.state.step
        );
        let host = self.zero.to_host(&*be)?;
        let dir = checkpoint::save(self.comm, &self.output, &self.state, &host)?;
        if self.comm.rank() == 0 {
            checkpoint::prune(&self.output, self.cfg.save_total_limit)?;
        }
        self.comm.barrier()?;
        Ok(dir)
    }

    /// Train until `max_steps` (or `opts.stop_after` steps in this call), logging, evaluating and
    /// checkpointing; a checkpoint is always written at the end of the run.
    pub fn run(&mut self, opts: &RunOptions) -> Result<Summary> {
        let rank0 = self.comm.rank() == 0;
        if rank0 {
            std::fs::create_dir_all(&self.output)
                .with_context(|| format!("cannot create {}", self.output.display()))?;
        }
        self.comm.barrier()?;
        let start = self.state.step;
        let mut metrics = if rank0 {
            let resumed = opts.resume_from.as_ref().map(|_| start);
            Some(MetricsWriter::open(&self.output, resumed)?.report_to(
                &self.cfg.report_to,
                &self.output,
                resumed,
            )?)
        } else {
            None
        };
        let progress = Progress::new(self.cfg.max_steps, start, rank0 && opts.progress);
        let t_run = Instant::now();
        let mut summary = Summary {
            step: start,
            losses: Vec::new(),
            skipped_steps: self.state.skipped_steps,
            last_checkpoint: None,
        };
        let mut done_here = 0u64;
        while self.state.step < self.cfg.max_steps {
            if opts.stop_after.is_some_and(|n| done_here >= n) {
                break;
            }
            let inject = opts.inject_nonfinite_steps.contains(&self.state.step);
            let overflow = opts.inject_overflow_steps.contains(&self.state.step);
            let mut rec = self.step_injected(inject, overflow)?;
            done_here += 1;
            let step = self.state.step;
            summary.losses.push(rec.loss.unwrap_or(f64::NAN));
            rec.elapsed_s = Some(t_run.elapsed().as_secs_f64());
            let log_now =
                step.is_multiple_of(self.cfg.logging_steps.max(1)) || step == self.cfg.max_steps;
            if let Some(m) = metrics.as_mut()
                && (log_now || rec.skipped == Some(true))
            {
                m.write(&rec)?;
            }
            progress.update(
                step,
                rec.loss.unwrap_or(f64::NAN),
                rec.lr.unwrap_or(0.0),
                rec.tokens_per_s.unwrap_or(0.0),
            );
            if self.state.consecutive_skips >= self.cfg.max_consecutive_skips.max(1) {
                progress.finish();
                let last = checkpoint::list(&self.output)?
                    .first()
                    .map(|(_, d)| d.display().to_string())
                    .unwrap_or_else(|| "none yet".into());
                bail!(
                    "stopping at step {step}: {} consecutive steps had a non-finite loss or \
                     gradient{} (skipped, weights untouched); last good checkpoint: {last}",
                    self.state.consecutive_skips,
                    if self.cfg.fp16 {
                        " (fp16: a non-finite loss, or an overflow at the minimum loss scale)"
                    } else {
                        ""
                    }
                );
            }
            let eval_now = self.cfg.eval_steps > 0 && step.is_multiple_of(self.cfg.eval_steps);
            if (eval_now || step == self.cfg.max_steps)
                && let Some(eval_loss) = self.evaluate()?
            {
                if let Some(m) = metrics.as_mut() {
                    m.write(&Record {
                        step,
                        eval_loss: Some(eval_loss),
                        ..Record::default()
                    })?;
                }
                if rank0 {
                    progress.println(&format!("step {step}: eval loss {eval_loss:.4}"));
                }
            }
            let save_now = self.cfg.save_steps > 0 && step.is_multiple_of(self.cfg.save_steps);
            if save_now || step == self.cfg.max_steps {
                summary.last_checkpoint = Some(self.save_checkpoint()?);
            }
        }
        progress.finish();
        summary.step = self.state.step;
        summary.skipped_steps = self.state.skipped_steps;
        Ok(summary)
    }
}

/// The targets of `batch`: labels other than -100 at positions the shifted loss reads
/// (`labels[t]` for `t >= 1` of each row), what [`Llama::forward`] averages over and HF counts
/// as `num_items_in_batch`.
fn target_count(batch: &Batch) -> usize {
    batch
        .labels
        .chunks(batch.t.max(1))
        .map(|row| row.iter().skip(1).filter(|&&l| l != -100).count())
        .sum()
}

/// Whether a skipped step counts toward the `max_consecutive_skips` abort.
///
/// Outside fp16 mode every skip counts. In fp16 mode a gradient overflow with a finite loss is
/// the loss scaler's normal working (DeepSpeed skips such steps silently, often several at the
/// start of a run while the scale comes down from 2^16), so it does not count — unless the scale
/// is already at `min_loss_scale` with no hysteresis left ([`ScaleUpdate::AtMinimum`]), where
/// lowering it can no longer help: DeepSpeed raises on the first such overflow; here those
/// overflows count like NaN losses, so a run stops after `max_consecutive_skips` of them in a
/// row (set it to 1 for DeepSpeed's behaviour). A non-finite loss always counts: it comes from
/// the forward pass, which the loss scale does not touch (the scaler still sees it as an
/// overflow, as DeepSpeed's would).
fn counts_toward_abort(nonfinite_loss: bool, update: Option<ScaleUpdate>) -> bool {
    match update {
        None => true,
        Some(u) => nonfinite_loss || u == ScaleUpdate::AtMinimum,
    }
}

/// The parts of `range` not covered by `done` (sorted, disjoint), in order.
fn uncovered(done: &[Range<usize>], range: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = range.start;
    for d in done {
        if d.end <= at {
            continue;
        }
        if d.start >= range.end {
            break;
        }
        if d.start > at {
            out.push(at..d.start);
        }
        at = at.max(d.end);
    }
    if at < range.end {
        out.push(at..range.end);
    }
    out
}

/// Add `range` to `done`, keeping it sorted and disjoint (touching ranges merge).
fn insert_merged(done: &mut Vec<Range<usize>>, range: Range<usize>) {
    if range.is_empty() {
        return;
    }
    done.push(range);
    done.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(done.len());
    for r in done.drain(..) {
        match merged.last_mut() {
            Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    *done = merged;
}
