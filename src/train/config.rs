//! Flat training configuration (nanoGPT style): defaults in code, one preset per recipe stage
//! (docs/RECIPE.md §3), then a TOML file, then `--key value` overrides, in that order.
//!
//! Every field is a plain scalar or a list of strings so that the TOML file and the command-line
//! overrides use the same keys (`lora_rank = 8` in the file, `--lora-rank 8` or `--lora_rank 8` on
//! the command line).

use super::loss_scale::DynamicLossScaler;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The recipe's three training stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Pre-training 1: the input embedding alone trains; everything else frozen.
    Pt1,
    /// Pre-training 2: LoRA on q,k,v,o + embedding + lm_head trained in full.
    Pt2,
    /// Instruction tuning: LoRA on all seven projections + embedding + lm_head, response-only loss.
    Sft,
}

impl std::str::FromStr for Stage {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pt1" => Ok(Stage::Pt1),
            "pt2" => Ok(Stage::Pt2),
            "sft" => Ok(Stage::Sft),
            _ => bail!("unknown stage {s:?}: expected pt1, pt2 or sft"),
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Pt1 => "pt1",
            Stage::Pt2 => "pt2",
            Stage::Sft => "sft",
        })
    }
}

/// All hyper-parameters of a run. Paths and the stage itself come from the command line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Global batch in sequences per optimizer step (= micro_batch_size × accumulation × world).
    pub batch_size: usize,
    /// Sequences per forward/backward pass on one rank.
    pub micro_batch_size: usize,
    /// Peak learning rate (after warmup).
    pub learning_rate: f64,
    /// Optimizer steps of the whole run (the schedule's length).
    pub max_steps: u64,
    /// Tokens per sequence (the pre-training block size; SFT truncation length).
    pub max_length: usize,
    /// Recompute each decoder layer's forward in the backward instead of keeping its activations
    /// (HF's `gradient_checkpointing`): ~1 more forward per step, activations ~1/layers.
    pub gradient_checkpointing: bool,
    /// Fraction of `max_steps` spent warming up; warmup steps = ceil(ratio × max_steps) as HF's
    /// `TrainingArguments.get_warmup_steps`.
    pub warmup_ratio: f64,
    /// Explicit warmup steps; when > 0 it wins over `warmup_ratio` (as in HF).
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Global gradient-norm clipping threshold (0 disables clipping).
    pub max_grad_norm: f64,
    /// LoRA rank r (0 = no LoRA).
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Projections that get LoRA adapters (HF module names).
    pub lora_targets: Vec<String>,
    /// Modules trained in full (PEFT's `modules_to_save`): `embed_tokens`, `lm_head`.
    pub modules_to_save: Vec<String>,
    /// Initialisation of embedding rows added by a vocab resize: `mean` (mean of the old rows of
    /// the pieces the original tokenizer splits the new piece into, see `model::resize`) or `hf`
    /// (HF's `_init_weights`: normal(0, initializer_range), seeded).
    pub new_token_init: String,
    /// Save a checkpoint every this many optimizer steps (0 = only at the end).
    pub save_steps: u64,
    /// Keep at most this many checkpoints (oldest deleted after a newer one is complete; 0 = all).
    pub save_total_limit: usize,
    /// Write a metrics line every this many optimizer steps.
    pub logging_steps: u64,
    /// Evaluate on the validation split every this many steps (0 = only at the end).
    pub eval_steps: u64,
    /// Validation micro-batches per evaluation (0 = the whole split).
    pub eval_batches: usize,
    /// Stop the run after this many consecutive skipped (non-finite) steps.
    pub max_consecutive_skips: u64,
    pub seed: u64,
    /// fp16 mode with DeepSpeed's dynamic loss scaling (see `train::loss_scale`): the backward
    /// pass is seeded with the loss scale, a gradient with a NaN/Inf skips the step and lowers
    /// the scale. Off by default: the CPU backend computes in fp32 and the CUDA backend's mixed
    /// precision is bf16, whose fp32-sized exponent range needs no loss scaling (DeepSpeed's
    /// bf16 mode has none either); turn it on to reproduce the recipe's fp16 run dynamics.
    pub fp16: bool,
    /// Initial loss scale `2^initial_scale_power` (DeepSpeed `fp16.initial_scale_power`).
    pub initial_scale_power: i32,
    /// Clean steps between two doublings of the loss scale (DeepSpeed `loss_scale_window`).
    pub loss_scale_window: u64,
    /// Overflows tolerated before the scale is halved (DeepSpeed `hysteresis`).
    pub hysteresis: u32,
    /// The loss scale never drops below this (DeepSpeed `min_loss_scale`).
    pub min_loss_scale: f64,
    /// Ranks the run is planned for (dry-run memory plan; the real world size comes from the Comm).
    pub world_size: usize,
    /// Elements per ZeRO-2 reduce-scatter / all-gather call, all ranks together (DeepSpeed's
    /// `reduce_bucket_size` / `allgather_bucket_size`; the recipe ran 1e8). Smaller buckets start
    /// the reduce-scatter earlier in the backward and need less scratch memory, at more calls per
    /// step; the numbers do not depend on it.
    pub reduce_bucket_size: usize,
    /// How a step's gradient and logged loss weigh the micro-batches. `micro-batch-mean` (the
    /// original scripts' Trainer): the mean over all micro-batches of all ranks of each
    /// micro-batch's mean target loss. `token-mean` (current HF Trainer's `num_items_in_batch`):
    /// the sum of every target's loss over the whole accumulated batch of all ranks, divided by
    /// the number of targets in it, so every target token weighs the same.
    pub loss_reduction: String,
    /// Where metrics go besides `metrics.jsonl` and `loss.png`: `none`, or `tensorboard` (event
    /// files under `OUTPUT/runs/`, written by rank 0; see `train::tensorboard`).
    pub report_to: String,
}

/// The values of [`TrainConfig::loss_reduction`].
pub const LOSS_REDUCTIONS: [&str; 2] = ["micro-batch-mean", "token-mean"];
/// The values of [`TrainConfig::report_to`].
pub const REPORT_TO: [&str; 2] = ["none", "tensorboard"];

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 8,
            micro_batch_size: 1,
            learning_rate: 1e-4,
            max_steps: 1000,
            max_length: 512,
            gradient_checkpointing: false,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            // torch.optim.AdamW's defaults.
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            lora_rank: 0,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_targets: Vec::new(),
            modules_to_save: Vec::new(),
            new_token_init: "mean".into(),
            save_steps: 500,
            save_total_limit: 2,
            logging_steps: 1,
            eval_steps: 0,
            eval_batches: 0,
            max_consecutive_skips: 10,
            seed: 42,
            fp16: false,
            // DeepSpeed's fp16 defaults.
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            min_loss_scale: 1.0,
            world_size: 1,
            reduce_bucket_size: 100_000_000,
            loss_reduction: "micro-batch-mean".into(),
            report_to: "none".into(),
        }
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl TrainConfig {
    /// The recipe's settings for `stage` (docs/RECIPE.md §3, the released scripts' defaults).
    pub fn preset(stage: Stage) -> TrainConfig {
        let base = TrainConfig {
            micro_batch_size: 4,
            max_length: 512,
            lora_rank: 8,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            save_steps: 500,
            // The recipe's ds_zero2_no_offload.json fp16 section (used when `fp16` is on).
            initial_scale_power: 16,
            loss_scale_window: 100,
            hysteresis: 2,
            min_loss_scale: 1e-10,
            ..TrainConfig::default()
        };
        match stage {
            Stage::Pt1 => TrainConfig {
                batch_size: 1024,
                learning_rate: 2e-4,
                max_steps: 3000,
                warmup_ratio: 0.05,
                weight_decay: 0.01,
                lora_rank: 0,
                lora_targets: Vec::new(),
                modules_to_save: strings(&["embed_tokens"]),
                ..base
            },
            Stage::Pt2 => TrainConfig {
                batch_size: 1024,
                learning_rate: 1e-4,
                max_steps: 6000,
                warmup_ratio: 0.05,
                weight_decay: 0.01,
                lora_targets: strings(&["q_proj", "k_proj", "v_proj", "o_proj"]),
                modules_to_save: strings(&["embed_tokens", "lm_head"]),
                ..base
            },
            Stage::Sft => TrainConfig {
                batch_size: 512,
                learning_rate: 1e-4,
                max_steps: 6000,
                warmup_ratio: 0.03,
                weight_decay: 0.0,
                lora_targets: strings(&[
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ]),
                modules_to_save: strings(&["embed_tokens", "lm_head"]),
                ..base
            },
        }
    }

    /// Apply the keys of a TOML file (a flat table) on top of `self`.
    pub fn merge_toml_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
        for (k, v) in table {
            self.set_value(&k, v)
                .with_context(|| format!("config file {}", path.display()))?;
        }
        Ok(())
    }

    /// Set one key from its command-line text (`--lora-rank 8`, `--lora-targets q_proj,v_proj`).
    /// The text is parsed as the type the key already has.
    pub fn set(&mut self, key: &str, text: &str) -> Result<()> {
        let key = key.replace('-', "_");
        let current = self.to_table();
        let old = current
            .get(&key)
            .with_context(|| format!("unknown config key {key:?} (known: {})", Self::keys()))?;
        let bad = || format!("config key {key}: cannot parse {text:?}");
        let value = match old {
            toml::Value::Integer(_) => {
                toml::Value::Integer(text.trim().parse::<i64>().with_context(bad)?)
            }
            toml::Value::Float(_) => {
                toml::Value::Float(text.trim().parse::<f64>().with_context(bad)?)
            }
            toml::Value::Boolean(_) => {
                toml::Value::Boolean(text.trim().parse::<bool>().with_context(bad)?)
            }
            toml::Value::Array(_) => toml::Value::Array(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            _ => toml::Value::String(text.to_string()),
        };
        self.set_value(&key, value)
    }

    fn set_value(&mut self, key: &str, value: toml::Value) -> Result<()> {
        let mut table = self.to_table();
        if !table.contains_key(key) {
            bail!("unknown config key {key:?} (known: {})", Self::keys());
        }
        // TOML integers are accepted where a float is expected (`learning_rate = 1`).
        let value = match (&table[key], value) {
            (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
            (_, v) => v,
        };
        table.insert(key.to_string(), value);
        *self = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("config key {key}: wrong type"))?;
        Ok(())
    }

    fn to_table(&self) -> toml::Table {
        match toml::Value::try_from(self).expect("config serializes") {
            toml::Value::Table(t) => t,
            _ => unreachable!(),
        }
    }

    fn keys() -> String {
        TrainConfig::default()
            .to_table()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every numeric key against its valid range; the message names the key, the value and the
    /// range (`--key value` flags and TOML keys are the same names).
    pub fn check_ranges(&self) -> Result<()> {
        fn int(key: &str, v: u64, min: u64) -> Result<()> {
            if v < min {
                bail!("config key {key} = {v} is out of range: expected an integer ≥ {min}");
            }
            Ok(())
        }
        // `lo_open`/`hi_open`: whether the bound itself is excluded.
        fn real(key: &str, v: f64, lo: f64, lo_open: bool, hi: f64, hi_open: bool) -> Result<()> {
            let ok = v.is_finite()
                && (if lo_open { v > lo } else { v >= lo })
                && (if hi_open { v < hi } else { v <= hi });
            if !ok {
                let range = format!(
                    "{}{lo}, {}{}",
                    if lo_open { "(" } else { "[" },
                    if hi == f64::INFINITY {
                        "∞".to_string()
                    } else {
                        hi.to_string()
                    },
                    if hi_open { ")" } else { "]" }
                );
                bail!(
                    "config key {key} = {v} is out of range: expected a finite number in {range}"
                );
            }
            Ok(())
        }
        let inf = f64::INFINITY;
        int("batch_size", self.batch_size as u64, 1)?;
        int("micro_batch_size", self.micro_batch_size as u64, 1)?;
        int("max_steps", self.max_steps, 1)?;
        int("max_length", self.max_length as u64, 2)?;
        int("world_size", self.world_size as u64, 1)?;
        int("max_consecutive_skips", self.max_consecutive_skips, 1)?;
        int("logging_steps", self.logging_steps, 1)?;
        int("reduce_bucket_size", self.reduce_bucket_size as u64, 1)?;
        // 0 is allowed: a run at learning rate 0 returns its initial weights (`--init-adapter` checks).
        real("learning_rate", self.learning_rate, 0.0, false, inf, true)?;
        real("warmup_ratio", self.warmup_ratio, 0.0, false, 1.0, false)?;
        real("weight_decay", self.weight_decay, 0.0, false, inf, true)?;
        real("adam_beta1", self.adam_beta1, 0.0, false, 1.0, true)?;
        real("adam_beta2", self.adam_beta2, 0.0, false, 1.0, true)?;
        real("adam_epsilon", self.adam_epsilon, 0.0, true, inf, true)?;
        // 0 turns clipping off.
        real("max_grad_norm", self.max_grad_norm, 0.0, false, inf, true)?;
        real("lora_dropout", self.lora_dropout, 0.0, false, 1.0, true)?;
        if self.lora_rank > 0 {
            real("lora_alpha", self.lora_alpha, 0.0, true, inf, true)?;
        }
        Ok(())
    }

    /// Micro-batches per rank per optimizer step: `batch_size / (micro_batch_size × world)`;
    /// an error when the batch does not divide evenly.
    pub fn accumulation_steps(&self, world: usize) -> Result<usize> {
        let per_pass = self.micro_batch_size * world;
        if self.micro_batch_size == 0 || world == 0 || !self.batch_size.is_multiple_of(per_pass) {
            bail!(
                "batch_size {} is not a multiple of micro_batch_size {} × world size {}",
                self.batch_size,
                self.micro_batch_size,
                world
            );
        }
        Ok(self.batch_size / per_pass)
    }

    /// Warmup steps as HF `TrainingArguments.get_warmup_steps`: explicit steps if > 0, else
    /// `ceil(max_steps × warmup_ratio)`.
    pub fn warmup(&self) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.max_steps as f64 * self.warmup_ratio).ceil() as u64
        }
    }

    /// Whether the step weighs every target token equally (`loss_reduction = token-mean`).
    pub fn token_mean(&self) -> bool {
        self.loss_reduction == "token-mean"
    }

    /// Check values that would otherwise fail deep inside the run.
    pub fn validate(&self) -> Result<()> {
        self.check_ranges()?;
        if self.lora_rank == 0 && !self.lora_targets.is_empty() {
            bail!("lora_targets set but lora_rank is 0");
        }
        const PROJ: [&str; 7] = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        for t in &self.lora_targets {
            if !PROJ.contains(&t.as_str()) {
                bail!("unknown LoRA target {t:?} (known: {})", PROJ.join(", "));
            }
        }
        for m in &self.modules_to_save {
            if m != "embed_tokens" && m != "lm_head" {
                bail!("unknown module to train in full {m:?} (known: embed_tokens, lm_head)");
            }
        }
        if self.new_token_init != "mean" && self.new_token_init != "hf" {
            bail!(
                "new_token_init {:?}: expected \"mean\" or \"hf\"",
                self.new_token_init
            );
        }
        if !LOSS_REDUCTIONS.contains(&self.loss_reduction.as_str()) {
            bail!(
                "loss_reduction {:?}: expected one of {}",
                self.loss_reduction,
                LOSS_REDUCTIONS.join(", ")
            );
        }
        if !REPORT_TO.contains(&self.report_to.as_str()) {
            bail!(
                "report_to {:?}: expected one of {}",
                self.report_to,
                REPORT_TO.join(", ")
            );
        }
        if self.lora_targets.is_empty() && self.modules_to_save.is_empty() {
            bail!("nothing to train: lora_targets and modules_to_save are both empty");
        }
        if self.fp16 {
            self.loss_scaler()?;
        }
        self.accumulation_steps(self.world_size)?;
        Ok(())
    }

    /// The fp16 mode's loss scaler from the keys `initial_scale_power`, `loss_scale_window`,
    /// `hysteresis`, `min_loss_scale` (`consecutive_hysteresis` off, as in the recipe).
    pub fn loss_scaler(&self) -> Result<DynamicLossScaler> {
        DynamicLossScaler::new(
            self.initial_scale_power,
            self.loss_scale_window,
            self.hysteresis,
            self.min_loss_scale,
            false,
        )
    }
}
