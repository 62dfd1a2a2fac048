//! The run directory's safety rules, applied before any work: never an input, never a foreign
//! directory (unless `--overwrite`), never a second run at once (the run lock), and a fresh run
//! never mixes with an earlier one: a directory that already holds a run is refused unless the
//! run resumes it or `--overwrite` starts it over (then the earlier run's files are removed first,
//! after the lock is taken).

use crate::util::lock::{LOCK_FILE, RunLock};
use crate::util::output::{check_not_input, is_run_dir};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// How the run treats what `output` already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A fresh run: refuse a directory that holds a run.
    Fresh,
    /// `--resume`/`--resume-from`: continue the run the directory holds.
    Resume,
    /// `--overwrite`: remove the earlier run's files, then start fresh.
    Overwrite,
}

/// On the writing rank: check `output` against the rules, take the lock and clear an earlier run
/// under [`Start::Overwrite`] (every rank checks that the output is not an input). The lock lives as long as the value.
pub fn prepare(
    output: &Path,
    inputs: &[(&str, &Path)],
    start: Start,
    writer: bool,
) -> Result<Option<RunLock>> {
    check_not_input("--output", output, inputs)?;
    if !writer {
        // Only the writing rank judges the directory: under mpirun it may already have created the
        // lock file and the run identity by the time another rank looks, which would read as an
        // earlier run. A refusal on the writer ends the job on every rank.
        return Ok(None);
    }
    match std::fs::symlink_metadata(output) {
        Ok(m) if !m.is_dir() => bail!(
            "--output {} exists and is not a directory; choose another path",
            output.display()
        ),
        Ok(_) => {
            let foreign = std::fs::read_dir(output)
                .with_context(|| format!("--output {}: cannot list", output.display()))?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name() != LOCK_FILE);
            let run = is_run_dir(output);
            if foreign && !run && start != Start::Overwrite {
                bail!(
                    "--output {} exists and does not hold a training run; choose another path or pass --overwrite",
                    output.display()
                );
            }
            if run && start == Start::Fresh {
                bail!(
                    "--output {} already holds a training run; pass --resume to continue it or --overwrite to start over",
                    output.display()
                );
            }
        }
        Err(_) => {}
    }
    let lock = RunLock::acquire(output)?;
    if start == Start::Overwrite {
        for e in std::fs::read_dir(output)
            .with_context(|| format!("cannot list {}", output.display()))?
        {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let earlier = name == "metrics.jsonl"
                || name == "loss.png"
                || name == super::tensorboard::RUNS_DIR
                || name == super::identity::IDENTITY_FILE
                || name == "adapter"
                || name == "model"
                || name.starts_with("checkpoint-")
                || name.starts_with(".checkpoint-");
            if earlier {
                let p = e.path();
                let r = if e.file_type()?.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.with_context(|| format!("--overwrite: cannot remove {}", p.display()))?;
            }
        }
    }
    Ok(Some(lock))
}
