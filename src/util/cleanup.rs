//! Temp paths that must not outlive a failure: a [`TempGuard`] removes its file or directory when
//! dropped (every error path) unless disarmed after the final rename, and
//! [`install_signal_cleanup`] (called by the binaries) removes every live guard's path on SIGINT
//! or SIGTERM before the process exits with status 128 + signal.
//!
//! Deliberately absent: cleanup after SIGKILL or a power cut (nothing can run); those temp paths
//! carry the writer's pid and are removed by the next writer of the same output.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove_path(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// A temp file or directory that is removed on drop unless [`TempGuard::disarm`]ed.
#[must_use = "the temp path is removed when the guard is dropped"]
pub struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl TempGuard {
    /// Register `path` (which need not exist yet) for removal on failure or signal.
    pub fn new(path: &Path) -> TempGuard {
        live().push(path.to_path_buf());
        TempGuard {
            path: path.to_path_buf(),
            armed: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path has been renamed into place (or is otherwise kept): do not remove it.
    pub fn disarm(mut self) {
        self.armed = false;
        self.unregister();
    }

    fn unregister(&self) {
        let mut l = live();
        if let Some(i) = l.iter().rposition(|p| *p == self.path) {
            l.swap_remove(i);
        }
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            self.unregister();
            remove_path(&self.path);
        }
    }
}

/// Remove every registered temp path now (the signal path). The thread that owns a path may still
/// be writing into it, so one `remove_dir_all` can lose the race (a file created after the listing
/// makes the final `rmdir` fail with "not empty"): each path is removed again until it is gone,
/// for at most about a second.
pub fn remove_all_live() {
    let paths: Vec<PathBuf> = std::mem::take(&mut *live());
    for p in paths.iter().rev() {
        for _ in 0..100 {
            remove_path(p);
            if std::fs::symlink_metadata(p).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// On SIGINT or SIGTERM: remove every live temp path, then exit with status 128 + signal.
/// Idempotent; an error only when the handler cannot be installed.
pub fn install_signal_cleanup() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(
        || match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
            Ok(mut signals) => {
                std::thread::spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        remove_all_live();
                        std::process::exit(128 + sig);
                    }
                });
            }
            Err(e) => result = Err(anyhow::anyhow!("cannot install signal handlers: {e}")),
        },
    );
    result
}
