//! Small shared helpers: atomic file writes, output-directory safety (`output`), temp-path
//! cleanup on error and on SIGINT/SIGTERM (`cleanup`), and the run lock (`lock`).

pub mod cleanup;
pub mod hash;
pub mod lock;
pub mod output;

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use cleanup::TempGuard;
pub use output::{OutputKind, check_output, replace_dir};

/// The temporary sibling path used while `path` is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, fsync, then rename.
/// A crash leaves either the old file or the new one, never a torn one; a failure (full disk,
/// read-only directory) or SIGINT/SIGTERM removes the temp file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let guard = TempGuard::new(&tmp);
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    guard.disarm();
    Ok(())
}

/// An error as the one line the binaries print: the context chain joined by ": ", with the
/// line breaks some parsers put in their messages (TOML, JSON excerpts) folded into " | ".
pub fn error_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}
