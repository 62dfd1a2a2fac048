//! Training checkpoints: a directory `checkpoint-<step>` written whole or not at all.
//!
//! Layout: the ZeRO-2 optimizer state (`zero2.json` + one shard file per rank: fp32 master copy
//! of the trainable weights, AdamW `m` and `v`, the update count), `trainer_state.json` (step,
//! schedule position, RNG state, data cursor, skip counters, the config), and `checkpoint.json`,
//! the manifest with the size and SHA-256 of every other file, written last.
//!
//! Atomicity: everything is written into a hidden temporary sibling (`.checkpoint-<step>.tmp`),
//! synced, and the directory is renamed into place; a crash leaves at most a temporary directory,
//! which is ignored and removed by the next save. The temporary directory is held by a
//! `util::TempGuard`: an error return or SIGINT/SIGTERM removes it. Old checkpoints are first renamed to a hidden
//! name, then deleted, so a crash while pruning never leaves a half-deleted `checkpoint-*`.

use super::config::TrainConfig;
use super::loss_scale::DynamicLossScaler;
use crate::distributed::{Comm, Zero2};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "checkpoint.json";
pub const STATE_FILE: &str = "trainer_state.json";
const FORMAT: &str = "zhllama-checkpoint";
const VERSION: u32 = 1;

/// Everything besides the optimizer state that a resumed run needs to continue bit-exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub stage: String,
    /// Optimizer steps taken (skipped ones included): the schedule position and, since step `s`
    /// reads stream positions `[s·G, (s+1)·G)` of the seeded example order, the data cursor.
    pub step: u64,
    /// Stream position of the next example (`step × global batch`), recorded for readers.
    pub next_example: u64,
    pub global_batch: usize,
    pub train_examples: usize,
    /// RNG state: the LoRA dropout masks come from a counter-based hash of `(seed, global
    /// micro-batch index)`, so the seed and the next micro-batch index are the whole state.
    pub rng_seed: u64,
    pub next_micro_batch: u64,
    pub skipped_steps: u64,
    pub consecutive_skips: u64,
    /// Target tokens seen so far (all ranks).
    pub tokens: u64,
    pub world_size: usize,
    /// Length of the flat trainable buffer (padding included).
    pub trainable_len: usize,
    pub vocab_size: usize,
    pub config: TrainConfig,
    /// fp16 mode: the dynamic loss scaler (absent in fp32 runs and in checkpoints written
    /// before the fp16 mode existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<DynamicLossScaler>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    step: u64,
    files: Vec<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    sha256: String,
}

/// `checkpoint-<step>` under `output`.
pub fn checkpoint_dir(output: &Path, step: u64) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not every filesystem supports it.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Save a checkpoint of `state` + `zero` as `checkpoint-<state.step>` under `output`. Every rank
/// calls this (collective); rank 0 writes everything but the per-rank shards. Returns the path.
pub fn save(comm: &dyn Comm, output: &Path, state: &TrainerState, zero: &Zero2) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output, state.step);
    let tmp = output.join(format!(".checkpoint-{}.tmp", state.step));
    // Rank 0 owns the temp directory: removed on any error return and on SIGINT/SIGTERM.
    let mut guard = None;
    if comm.rank() == 0 {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
        }
        guard = Some(crate::util::TempGuard::new(&tmp));
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
    }
    comm.barrier()?;
    zero.save(comm, &tmp)?;
    if comm.rank() == 0 {
        let state_json = serde_json::to_vec_pretty(state)?;
        crate::util::write_atomic(&tmp.join(STATE_FILE), &state_json)?;
        let mut files = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(&tmp)
            .with_context(|| format!("cannot list {}", tmp.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            let bytes = std::fs::read(tmp.join(&name))
                .with_context(|| format!("cannot read back {}", tmp.join(&name).display()))?;
            files.push(FileEntry {
                sha256: hex(&Sha256::digest(&bytes)),
                bytes: bytes.len() as u64,
                name,
            });
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            step: state.step,
            files,
        };
        crate::util::write_atomic(
            &tmp.join(MANIFEST_FILE),
            &serde_json::to_vec_pretty(&manifest)?,
        )?;
        sync_dir(&tmp);
        if final_dir.exists() {
            // Re-saving the same step (a resumed run that ends where it started): replace it.
            let old = output.join(format!(".checkpoint-{}.old", state.step));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&final_dir, &old)?;
            std::fs::rename(&tmp, &final_dir)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &final_dir).with_context(|| {
                format!("cannot rename {} to {}", tmp.display(), final_dir.display())
            })?;
        }
        if let Some(g) = guard.take() {
            g.disarm();
        }
        sync_dir(output);
    }
    comm.barrier()?;
    Ok(final_dir)
}

/// Check every file of the checkpoint in `dir` against its manifest (presence, size, SHA-256)
/// and return its trainer state. The ZeRO-2 shards are verified again when loaded.
pub fn verify(dir: &Path) -> Result<TrainerState> {
    let mpath = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&mpath).with_context(|| {
        format!(
            "{}: missing, the checkpoint is incomplete or not a checkpoint",
            mpath.display()
        )
    })?;
    let m: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{}: corrupt checkpoint manifest", mpath.display()))?;
    ensure!(
        m.format == FORMAT && m.version == VERSION,
        "{}: format {:?} version {}, this build reads {FORMAT:?} version {VERSION}",
        mpath.display(),
        m.format,
        m.version
    );
    ensure!(
        m.files.iter().any(|f| f.name == STATE_FILE),
        "{}: lists no {STATE_FILE}",
        mpath.display()
    );
    for f in &m.files {
        let path = dir.join(&f.name);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("{}: missing from the checkpoint", path.display()))?;
        if bytes.len() as u64 != f.bytes {
            bail!(
                "{}: {} bytes, the manifest says {} (truncated?)",
                path.display(),
                bytes.len(),
                f.bytes
            );
        }
        let sum = hex(&Sha256::digest(&bytes));
        if sum != f.sha256 {
            bail!(
                "{}: checksum {sum} differs from the manifest's {} (corrupt)",
                path.display(),
                f.sha256
            );
        }
    }
    let spath = dir.join(STATE_FILE);
    let state: TrainerState = serde_json::from_slice(&std::fs::read(&spath)?)
        .with_context(|| format!("{}: not a trainer state", spath.display()))?;
    ensure!(
        state.step == m.step,
        "{}: step {} but the manifest says {}",
        spath.display(),
        state.step,
        m.step
    );
    Ok(state)
}

/// `(step, dir)` of every `checkpoint-<step>` directory under `output`, newest first.
pub fn list(output: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(output) else {
        return Ok(out);
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
            && e.path().is_dir()
        {
            out.push((step, e.path()));
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

/// The checkpoint to resume from under `output`: the newest one, verified. If the newest is
/// damaged this is an error (it names the damage and the newest intact older checkpoint to pass
/// instead); `None` when there is no checkpoint at all.
pub fn latest(output: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let all = list(output)?;
    let Some((_, newest)) = all.first() else {
        return Ok(None);
    };
    match verify(newest) {
        Ok(state) => Ok(Some((newest.clone(), state))),
        Err(e) => {
            let older = all[1..]
                .iter()
                .find(|(_, d)| verify(d).is_ok())
                .map(|(_, d)| d.display().to_string());
            match older {
                Some(o) => bail!(
                    "refusing to resume from {}: {e:#}; the previous checkpoint {o} is intact \
                     (pass --resume-from {o}, or remove the damaged one)",
                    newest.display()
                ),
                None => bail!(
                    "refusing to resume from {}: {e:#}; no intact older checkpoint",
                    newest.display()
                ),
            }
        }
    }
}

/// Delete all but the newest `keep` checkpoints (0 keeps all). Rank 0 only.
pub fn prune(output: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    for (step, dir) in list(output)?.into_iter().skip(keep) {
        let doomed = output.join(format!(".checkpoint-{step}.deleting"));
        std::fs::rename(&dir, &doomed)
            .with_context(|| format!("cannot retire {}", dir.display()))?;
        std::fs::remove_dir_all(&doomed)
            .with_context(|| format!("cannot delete {}", doomed.display()))?;
    }
    // Leftovers of a crash mid-save or mid-prune.
    if let Ok(rd) = std::fs::read_dir(output) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".checkpoint-")
                && (name.ends_with(".deleting") || name.ends_with(".tmp"))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// The keys a resumed run may change (they do not affect the numbers).
const RESUME_MUTABLE: [&str; 8] = [
    "gradient_checkpointing",
    "reduce_bucket_size",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "eval_steps",
    "eval_batches",
    "report_to",
];

/// An error naming the first key whose value differs between the checkpoint and this run.
pub fn check_compatible(saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    let a = toml::Value::try_from(saved)?;
    let b = toml::Value::try_from(now)?;
    let (Some(a), Some(b)) = (a.as_table(), b.as_table()) else {
        bail!("config is not a table");
    };
    for (k, va) in a {
        if RESUME_MUTABLE.contains(&k.as_str()) || k == "world_size" {
            continue;
        }
        if b.get(k) != Some(va) {
            bail!(
                "cannot resume: config key {k} was {va} in the checkpoint, is {} now (a resumed \
                 run must keep the settings that change the numbers)",
                b.get(k).map(|v| v.to_string()).unwrap_or_default()
            );
        }
    }
    Ok(())
}
