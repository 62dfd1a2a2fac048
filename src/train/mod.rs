//! Training: flat config + recipe presets, the LR schedule, the training loop, checkpoints and
//! resume, metrics, the loss-curve plot, and the dry-run memory plan. See ARCHITECTURE.md.

pub mod config;
pub mod dryrun;
pub mod schedule;
