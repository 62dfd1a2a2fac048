//! Run identity: the sha256 of the base model's files, the tokenizer and the data manifest,
//! recorded in `<run>/run_identity.json` when a run starts and compared when it resumes, so a
//! resume with a different model of the same shapes, or different data of the same size, is
//! refused naming what differs. Also: a tokenizer that is not the one the data was made with.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

pub const IDENTITY_FILE: &str = "run_identity.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// Model file name → sha256 (config.json, the safetensors files and their index).
    pub model: BTreeMap<String, String>,
    /// sha256 of the tokenizer model, when one was given.
    pub tokenizer: Option<String>,
    /// sha256 of the data directory's manifest.json (it records the shards' sizes and the
    /// tokenizer the data was made with).
    pub data_manifest: String,
}

/// Streaming sha256 of a file (model shards can be many GB).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl RunIdentity {
    pub fn compute(model_dir: &Path, tokenizer: Option<&Path>, data_dir: &Path) -> Result<Self> {
        let mut model = BTreeMap::new();
        for e in std::fs::read_dir(model_dir)
            .with_context(|| format!("cannot list {}", model_dir.display()))?
        {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "config.json"
                || name.ends_with(".safetensors")
                || name.ends_with(".index.json")
            {
                model.insert(name, sha256_file(&e.path())?);
            }
        }
        let tokenizer = match tokenizer {
            Some(t) => Some(sha256_file(&crate::vocab::encode::resolve_model_path(t)?)?),
            None => None,
        };
        Ok(RunIdentity {
            model,
            tokenizer,
            data_manifest: sha256_file(&data_dir.join("manifest.json"))?,
        })
    }

    /// What differs between the recorded identity (`self`) and `now`, one phrase each.
    pub fn differences(&self, now: &RunIdentity) -> Vec<String> {
        let mut d = Vec::new();
        let names: std::collections::BTreeSet<&String> =
            self.model.keys().chain(now.model.keys()).collect();
        for n in names {
            if self.model.get(n) != now.model.get(n) {
                d.push(format!("--model file {n}"));
            }
        }
        if self.tokenizer != now.tokenizer {
            d.push("--tokenizer".to_string());
        }
        if self.data_manifest != now.data_manifest {
            d.push("--data (manifest.json)".to_string());
        }
        d
    }
}

/// Fresh run: record `now` in `run_dir`. Resume: compare with the record and refuse a mismatch
/// (a run from before identities were recorded gets one now).
pub fn record_or_check(run_dir: &Path, now: &RunIdentity, resuming: bool) -> Result<()> {
    let path = run_dir.join(IDENTITY_FILE);
    if resuming && path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let was: RunIdentity = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a run identity", path.display()))?;
        let diff = was.differences(now);
        if !diff.is_empty() {
            bail!(
                "refusing to resume {}: {} differ from the run's start (recorded in {})",
                run_dir.display(),
                diff.join(", "),
                path.display()
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    crate::util::write_atomic(&path, &serde_json::to_vec_pretty(now)?)
}

/// The tokenizer given to `train` must be the one the data was made with, when the data's
/// manifest records it.
pub fn check_tokenizer_matches_data(tokenizer: &Path, data_dir: &Path) -> Result<()> {
    let mpath = data_dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath)
        .with_context(|| format!("cannot read {}", mpath.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", mpath.display()))?;
    let Some(recorded) = v.get("tokenizer_sha256").and_then(|s| s.as_str()) else {
        return Ok(());
    };
    if recorded.is_empty() {
        return Ok(());
    }
    let file = crate::vocab::encode::resolve_model_path(tokenizer)?;
    let actual = sha256_file(&file)?;
    if actual != recorded {
        bail!(
            "--tokenizer {} (sha256 {actual}) is not the tokenizer {} was made with (sha256 {recorded})",
            file.display(),
            data_dir.display()
        );
    }
    Ok(())
}
