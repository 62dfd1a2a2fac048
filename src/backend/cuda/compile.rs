//! Kernel compilation: every embedded `kernels/*.cu` compiled by NVRTC ([`super::nvrtc`]) for the
//! device's architecture, in parallel threads, with an on-disk cache of cubins keyed by source,
//! headers, options and NVRTC version.

use super::{kernels, nvrtc};
use anyhow::{Result, anyhow, ensure};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

pub type CompiledFile = (String, Vec<u8>, Vec<String>);

/// Compile (or read from the cache) every kernel file for `arch`, in parallel threads: what
/// [`CudaBackend::with_options`] loads. Needs NVRTC, no GPU. The kernel names come from each
/// cubin's symbol table ([`nvrtc::entry_points`]), so a program NVRTC serves from its own cache
/// (no ptxas report in the log) loads the same kernels.
pub fn compile_all(
    arch: &str,
    include_dirs: &[PathBuf],
    cache_dir: Option<&std::path::Path>,
) -> Result<Vec<CompiledFile>> {
    ensure!(
        !kernels::SOURCES.is_empty(),
        "this binary embeds no kernel sources (its build script read no kernels/ directory): rebuild it"
    );
    let (maj, min) = nvrtc::version()?;
    let opts = nvrtc::options(arch, include_dirs, false);
    let headers: String = kernels::HEADERS
        .iter()
        .map(|(n, s)| format!("{n}\n{s}"))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = kernels::SOURCES
            .iter()
            .map(|(file, src)| {
                let (opts, headers) = (&opts, &headers);
                s.spawn(move || -> Result<CompiledFile> {
                    let mut h = Sha256::new();
                    h.update(src.as_bytes());
                    h.update(headers.as_bytes());
                    // The include directory's path does not change the code; its headers' version is
                    // covered by the NVRTC version in the key.
                    for o in opts.iter().filter(|o| !o.starts_with("--include-path")) {
                        h.update(o.as_bytes());
                    }
                    let hash: String = h
                        .finalize()
                        .iter()
                        .take(8)
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    let stem = file.trim_end_matches(".cu");
                    let key = format!("{stem}-{arch}-nvrtc{maj}.{min}-{hash}");
                    if let Some(dir) = cache_dir {
                        let (cb, names) = (
                            dir.join(format!("{key}.cubin")),
                            dir.join(format!("{key}.kernels")),
                        );
                        if let (Ok(c), Ok(n)) =
                            (std::fs::read(&cb), std::fs::read_to_string(&names))
                            && !c.is_empty()
                        {
                            return Ok((
                                file.to_string(),
                                c,
                                n.lines().map(str::to_string).collect(),
                            ));
                        }
                    }
                    let c = nvrtc::compile(file, arch, include_dirs, false)?;
                    let names = c.entry_points;
                    ensure!(
                        !names.is_empty(),
                        "{file}: the cubin holds no kernel entry point"
                    );
                    if let Some(dir) = cache_dir {
                        // A cache that cannot be written only costs a recompile next time.
                        if std::fs::create_dir_all(dir).is_ok() {
                            let _ = crate::util::write_atomic(
                                &dir.join(format!("{key}.kernels")),
                                names.join("\n").as_bytes(),
                            );
                            let _ = crate::util::write_atomic(
                                &dir.join(format!("{key}.cubin")),
                                &c.cubin,
                            );
                        }
                    }
                    Ok((file.to_string(), c.cubin, names))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("compile thread panicked"))?)
            .collect()
    })
}
