//! What users watch: `metrics.jsonl` (one JSON object per line: training steps and evaluations)
//! and a progress bar with step, loss, LR, tokens/s and ETA. Only rank 0 creates these.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`. Training lines carry `loss`; evaluation lines `eval_loss`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Optimizer steps done when the line was written (1-based after the first step).
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    /// Micro-batches of the step (all ranks) without a target, left out of `loss`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub empty_micro_batches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skipped: Option<bool>,
    /// fp16 mode: the loss scale this step's backward was seeded with (before its update).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skipped_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub elapsed_s: Option<f64>,
}

/// Appends records to `metrics.jsonl` (and, with `report_to = tensorboard`, to an event file).
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
    tensorboard: Option<super::tensorboard::EventWriter>,
}

impl MetricsWriter {
    /// Open `dir/metrics.jsonl` for appending. `keep_until`: on resume, lines of steps after the
    /// checkpoint (written before the interruption, about to be redone) are dropped first, so the
    /// file reads as one uninterrupted run; `None` starts a fresh file.
    pub fn open(dir: &Path, keep_until: Option<u64>) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let kept = match keep_until {
            // A torn or foreign line is dropped with a warning; the rest of the history is kept.
            Some(step) if path.exists() => {
                let (records, dropped) = read_lenient(&path)?;
                for (line, why) in dropped {
                    eprintln!(
                        "warning: {}:{line}: dropped a line that is not a metrics record ({why})",
                        path.display()
                    );
                }
                records.into_iter().filter(|r| r.step <= step).collect()
            }
            _ => Vec::new(),
        };
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        crate::util::write_atomic(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsWriter {
            path,
            file,
            tensorboard: None,
        })
    }

    /// With `report_to = "tensorboard"`, every record also goes to a new event file under
    /// `dir/runs/` (`resumed_at`: the checkpoint step a resumed run starts from).
    pub fn report_to(
        mut self,
        report_to: &str,
        dir: &Path,
        resumed_at: Option<u64>,
    ) -> Result<Self> {
        if report_to == "tensorboard" {
            let runs = dir.join(super::tensorboard::RUNS_DIR);
            self.tensorboard = Some(super::tensorboard::EventWriter::create(&runs, resumed_at)?);
        }
        Ok(self)
    }

    pub fn write(&mut self, r: &Record) -> Result<()> {
        let mut line = serde_json::to_string(r)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.scalars(r.step, &record_scalars(r))?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every record of a `metrics.jsonl`; a torn last line (a crash mid-write) is ignored, any other
/// bad line is an error naming the line.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("{}:{}: bad metrics line", path.display(), i + 1));
            }
        }
    }
    Ok(out)
}

/// (1-based line number, why it is not a record) of each line [`read_lenient`] dropped.
pub type DroppedLines = Vec<(usize, String)>;

/// Every parseable record of a `metrics.jsonl`, and the lines that are not one (a torn last line,
/// a line some other program appended).
pub fn read_lenient(path: &Path) -> Result<(Vec<Record>, DroppedLines)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut out = Vec::new();
    let mut dropped = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(e) => dropped.push((i + 1, e.to_string())),
        }
    }
    Ok((out, dropped))
}

/// The progress bar: `step/total`, loss, LR, tokens/s, ETA (hidden when stderr is no terminal).
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total: u64, start: u64, visible: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if visible {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} step {pos}/{len} [{bar:30}] {msg} eta {eta_precise}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_position(start);
        bar.reset_eta();
        Progress { bar }
    }

    pub fn update(&self, step: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        self.bar.set_position(step);
        self.bar.set_message(format!(
            "loss {loss:.4} lr {lr:.3e} {:.0} tok/s",
            tokens_per_s
        ));
    }

    pub fn println(&self, msg: &str) {
        self.bar.println(msg);
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}

/// The scalars of a metrics record under HF Trainer's TensorBoard tags.
fn record_scalars(r: &Record) -> Vec<(&'static str, f32)> {
    let mut out = Vec::new();
    let mut put = |tag, v: Option<f64>| {
        if let Some(v) = v {
            out.push((tag, v as f32));
        }
    };
    put("train/loss", r.loss);
    put("train/learning_rate", r.lr);
    put("train/grad_norm", r.grad_norm);
    put("train/tokens_per_second", r.tokens_per_s);
    put("train/loss_scale", r.loss_scale);
    put("eval/loss", r.eval_loss);
    out
}
