//! Training: flat config + recipe presets, the LR schedule, the training loop, checkpoints and
//! resume, metrics, the loss-curve plot, and the dry-run memory plan. See ARCHITECTURE.md.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dryrun;
pub mod identity;
pub mod loss_scale;
pub mod metrics;
pub mod plot;
pub mod rundir;
pub mod schedule;
pub mod setup;
pub mod tensorboard;
pub mod trainer;
