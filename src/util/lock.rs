//! The run lock: an exclusive advisory lock (`flock`) on `<run dir>/.lock`, held for the whole
//! training run, so two runs never write one output directory. The kernel drops the lock when its
//! process dies, so a stale lock file of a dead run is simply taken over. The file stays empty and
//! is never rewritten (a resumed run leaves it byte-identical); it is removed only when the run
//! that created it wrote nothing else.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".lock";

/// Held for as long as the value lives. Dropped before the run wrote anything (an input failed
/// its checks), it removes the lock file, and the directory if the lock created it, so a refused
/// run leaves nothing behind.
pub struct RunLock {
    _file: std::fs::File,
    path: PathBuf,
    dir: PathBuf,
    created_dir: bool,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let only_lock = std::fs::read_dir(&self.dir)
            .is_ok_and(|mut it| it.all(|e| e.is_ok_and(|e| e.file_name() == LOCK_FILE)));
        if only_lock {
            let _ = std::fs::remove_file(&self.path);
            if self.created_dir {
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }
}

impl RunLock {
    /// Create `dir` if needed and lock it, or fail naming the directory and the holder's pid.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!(
                    "{} is in use by another training run; wait for it to finish or choose another --output",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        Ok(RunLock {
            _file: file,
            path,
            dir: dir.to_path_buf(),
            created_dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
