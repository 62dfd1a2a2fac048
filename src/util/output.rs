//! Output safety, one mechanism for every command that writes a directory:
//! [`check_output`] before any work (refuse an output that is one of the inputs, a regular file,
//! or a non-empty directory of another kind unless `--overwrite`), then [`replace_dir`] to swap a
//! complete temp directory in (the old content stays until the new is complete).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// The kinds of output directory the commands write; each is recognised by its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// `merge-tokenizers`: tokenizer.model + HF tokenizer files.
    Tokenizer,
    /// `merge-lora`, `train` (full weights): config.json + safetensors.
    Model,
    /// A PEFT adapter: adapter_config.json + adapter_model.safetensors.
    Adapter,
    /// `data pretrain|sft`: token shards + manifest.json.
    Shards,
    /// `train --output`: checkpoints, metrics.jsonl, final adapter/model.
    Run,
}

impl OutputKind {
    pub fn name(self) -> &'static str {
        match self {
            OutputKind::Tokenizer => "tokenizer",
            OutputKind::Model => "model",
            OutputKind::Adapter => "adapter",
            OutputKind::Shards => "token-shard",
            OutputKind::Run => "training-run",
        }
    }

    /// Whether `dir` (an existing directory) holds this kind of output and nothing foreign.
    pub fn recognises(self, dir: &Path) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        let names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        let has = |f: &str| names.iter().any(|n| n == f);
        let all = |ok: &dyn Fn(&str) -> bool| names.iter().all(|n| ok(n));
        match self {
            OutputKind::Tokenizer => {
                has("tokenizer.model")
                    && all(&|n| {
                        matches!(
                            n,
                            "tokenizer.model"
                                | "tokenizer.json"
                                | "tokenizer_config.json"
                                | "special_tokens_map.json"
                        )
                    })
            }
            OutputKind::Model => {
                has("config.json")
                    && names.iter().any(|n| n.ends_with(".safetensors"))
                    && !has("adapter_config.json")
            }
            OutputKind::Adapter => has("adapter_config.json"),
            OutputKind::Shards => {
                has("manifest.json")
                    && all(&|n| n == "manifest.json" || n.ends_with(".tok") || n.ends_with(".sft"))
            }
            OutputKind::Run => is_run_dir(dir),
        }
    }
}

/// Whether `dir` holds a training run: metrics, a checkpoint or a final adapter/model.
pub fn is_run_dir(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n == "metrics.jsonl"
            || n == "run_identity.json"
            || n == "adapter"
            || n == "model"
            || n.strip_prefix("checkpoint-")
                .is_some_and(|s| s.chars().all(|c| c.is_ascii_digit()))
    })
}

/// `path` made absolute with symlinks resolved, also when it (or its tail) does not exist yet:
/// the longest existing ancestor is canonicalised and the rest appended.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for t in tail.iter().rev() {
                out.push(t);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(p), Some(n)) => {
                tail.push(n.to_os_string());
                cur = p;
            }
            _ => return abs,
        }
    }
}

/// Refuse an output that would destroy something. `inputs` are (flag, path) of everything the
/// command reads. Refused, naming the path:
/// - the output is, contains or lies inside one of the inputs (always, even with `overwrite`);
/// - the output exists and is not a directory (always);
/// - the output is a non-empty directory not recognised as `kind`, unless `overwrite`.
///
/// A missing, empty or recognised directory is accepted (it will be replaced atomically).
pub fn check_output(
    flag: &str,
    out: &Path,
    kind: OutputKind,
    inputs: &[(&str, &Path)],
    overwrite: bool,
) -> Result<()> {
    check_not_input(flag, out, inputs)?;
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("{flag} {}", out.display())),
    };
    if !meta.is_dir() {
        bail!(
            "{flag} {} exists and is not a directory; choose another path",
            out.display()
        );
    }
    let empty = std::fs::read_dir(out)
        .with_context(|| format!("{flag} {}: cannot list", out.display()))?
        .next()
        .is_none();
    if empty || overwrite || kind.recognises(out) {
        return Ok(());
    }
    bail!(
        "{flag} {} exists and does not hold a {} directory; choose another path or pass --overwrite",
        out.display(),
        kind.name()
    )
}

/// Refuse an output directory that is, contains or lies inside one of `inputs` ((flag, path)).
pub fn check_not_input(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out_r = resolve(out);
    for (iflag, input) in inputs {
        let in_r = resolve(input);
        let same = in_r == out_r;
        if same || in_r.starts_with(&out_r) || out_r.starts_with(&in_r) {
            bail!(
                "{flag} {} {} {iflag} {}: refusing to write into an input",
                out.display(),
                if same {
                    "is the same path as"
                } else {
                    "overlaps"
                },
                input.display()
            );
        }
    }
    Ok(())
}

/// Swap the complete directory `tmp` into `dir`. An existing `dir` is renamed aside first and
/// removed only after `tmp` is in place; if the second rename fails the old directory is put back.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(dir).is_err() {
        return std::fs::rename(tmp, dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()));
    }
    let old = dir.with_file_name(format!(
        ".{}.old.{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::rename(dir, &old).with_context(|| format!("cannot move {} aside", dir.display()))?;
    if let Err(e) = std::fs::rename(tmp, dir) {
        let _ = std::fs::rename(&old, dir);
        return Err(e)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()));
    }
    let rm = if std::fs::symlink_metadata(&old).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(&old)
    } else {
        std::fs::remove_file(&old)
    };
    rm.with_context(|| format!("cannot remove the replaced {}", old.display()))
}

/// Refuse a single-file output that would destroy something: one of the inputs (`inputs` are
/// (flag, path); an input directory counts for every file inside it) or an existing directory.
/// An existing regular file is replaced atomically by the writer (`write_atomic`).
pub fn check_output_file(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out_r = resolve(out);
    for (iflag, input) in inputs {
        if out_r.starts_with(resolve(input)) {
            bail!(
                "{flag} {} is the input {iflag} {} (or inside it): refusing to overwrite an input",
                out.display(),
                input.display()
            );
        }
    }
    if out.is_dir() {
        bail!("{flag} {} is a directory; give a file path", out.display());
    }
    Ok(())
}
