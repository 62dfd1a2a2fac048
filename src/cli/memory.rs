//! The memory check before a CPU-backend command loads a model: the estimate from config.json
//! (`train::dryrun`) against `MemAvailable`, or against `ZHLLAMA_MEMORY_LIMIT` (bytes; `off`
//! skips the check).

use anyhow::{Result, bail};
use std::path::Path;
use zhllama::train::dryrun;

/// The budget: `Some((bytes, where it comes from))`, None when the check is off or unknowable.
fn budget() -> Result<Option<(u64, String)>> {
    match std::env::var("ZHLLAMA_MEMORY_LIMIT") {
        Ok(v) if v == "off" => Ok(None),
        Ok(v) => match v.parse::<u64>() {
            Ok(b) => Ok(Some((b, "ZHLLAMA_MEMORY_LIMIT".into()))),
            Err(_) => bail!("ZHLLAMA_MEMORY_LIMIT={v:?}: expected a number of bytes or \"off\""),
        },
        Err(_) => Ok(dryrun::mem_available().map(|b| (b, "MemAvailable in /proc/meminfo".into()))),
    }
}

/// Refuse `model_dir` when `need(dims)` bytes exceed the budget; nothing is allocated before.
pub fn check(
    model_dir: &Path,
    purpose: &str,
    need: impl FnOnce(&dryrun::Dims) -> Result<u64>,
) -> Result<()> {
    let Some((available, source)) = budget()? else {
        return Ok(());
    };
    let dims = dryrun::Dims::from_model_dir(model_dir)?;
    dryrun::check_fits(model_dir, purpose, need(&dims)?, available, &source)
}

/// Refuse `model_dir` when `need(dims)` bytes exceed a GPU's `free` memory (`ZHLLAMA_MEMORY_LIMIT`
/// overrides as for the host check); `device` names the GPU in the message.
pub fn check_device(
    model_dir: &Path,
    purpose: &str,
    device: &str,
    free: u64,
    need: impl FnOnce(&dryrun::Dims) -> Result<u64>,
) -> Result<()> {
    let (available, source) = match std::env::var("ZHLLAMA_MEMORY_LIMIT") {
        Ok(v) if v == "off" => return Ok(()),
        Ok(_) => match budget()? {
            Some(b) => b,
            None => return Ok(()),
        },
        Err(_) => (free, format!("free memory on {device}")),
    };
    let dims = dryrun::Dims::from_model_dir(model_dir)?;
    dryrun::check_fits(model_dir, purpose, need(&dims)?, available, &source)
}

/// The inference estimate on one token (the weights dominate).
pub fn check_inference(model_dir: &Path, purpose: &str) -> Result<()> {
    check(model_dir, purpose, |d| {
        Ok(dryrun::inference_bytes(d, d.vocab_size, 1))
    })
}
