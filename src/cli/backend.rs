//! `--backend cpu|cuda` for every subcommand that runs a model, and the one place a binary turns the
//! environment into [`CudaOptions`] (also used by `tools/cuda_bench.rs` through `#[path]`).
//!
//! Each subcommand keeps its work in one generic `run_on<B: Backend>(Arc<B>, ...)` and dispatches
//! with [`BackendKind`]; built without the `cuda` feature, [`open_cuda`] returns the stub's clear
//! error, so no `cfg` is needed here.

use anyhow::{Context, Result};
use std::path::PathBuf;
use zhllama::backend::cuda::{CudaBackend, CudaOptions, Half};

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// The CPU reference backend (f32, rayon threads).
    Cpu,
    /// The CUDA backend (bf16 weights and activations, fp32 master/statistics; needs `--features cuda`).
    Cuda,
}

/// The kernel cache directory: `ZHLLAMA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/zhllama/kernels`, else
/// `$HOME/.cache/zhllama/kernels`; none when neither is set (compile at every start).
fn kernel_cache_dir(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let nonempty = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(d) = nonempty("ZHLLAMA_KERNEL_CACHE") {
        return Some(d.into());
    }
    if let Some(d) = nonempty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("zhllama/kernels"));
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".cache/zhllama/kernels"))
}

/// True when the variable is set to something other than empty or `0`.
fn nonempty_flag(env: &impl Fn(&str) -> Option<String>, key: &str) -> bool {
    env(key).is_some_and(|v| !v.is_empty() && v != "0")
}

/// [`CudaOptions`] from the environment: CUDA headers by [`zhllama::backend::cuda::kernels::cuda_include_dirs`]
/// (`ZHLLAMA_CUDA_INCLUDE`, `CUDA_HOME`/`CUDA_PATH`, the NVRTC wheel on `LD_LIBRARY_PATH`), the
/// kernel cache by [`kernel_cache_dir`], per-launch NVTX ranges by `ZHLLAMA_NVTX=1`.
pub fn cuda_options(device: usize, profile: bool) -> CudaOptions {
    let env = |k: &str| std::env::var(k).ok();
    CudaOptions {
        device,
        include_dirs: zhllama::backend::cuda::kernels::cuda_include_dirs(env),
        cache_dir: kernel_cache_dir(&env),
        profile,
        // An NVTX range per kernel launch, for Nsight (layer ranges are always on).
        nvtx: nonempty_flag(&env, "ZHLLAMA_NVTX"),
        ..CudaOptions::default()
    }
}

/// The local rank of this process (0 without a launcher), which picks its GPU.
pub fn local_rank() -> Result<usize> {
    let vars: std::collections::HashMap<String, String> = std::env::vars().collect();
    Ok(zhllama::distributed::launch_info(&vars)?.map_or(0, |l| l.local_rank))
}

/// The CUDA device of the process with local rank `local_rank`: the local rank mapped onto the
/// devices this process sees ([`zhllama::backend::cuda::device_for_local_rank`]: one visible GPU per
/// rank under Slurm's `--gpus-per-task` is device 0 for all). Prints the choice to stderr.
pub fn cuda_device(local_rank: usize) -> Result<usize> {
    let visible = CudaBackend::device_count().context("cannot count the CUDA devices")?;
    let device = zhllama::backend::cuda::device_for_local_rank(local_rank, visible)?;
    let cvd = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
    eprintln!(
        "local rank {local_rank}: CUDA device {device} of {visible} visible (CUDA_VISIBLE_DEVICES={cvd})"
    );
    Ok(device)
}

/// Start the CUDA backend for local rank `local_rank` on the device [`cuda_device`] picks (see
/// [`cuda_options`]); `profile` times every launch from the start; `fp16` stores weights and
/// activations as f16 (the recipe's fp16 mode, trained with loss scaling) instead of bf16. Without
/// the `cuda` feature: the stub's "built without" error.
pub fn open_cuda(local_rank: usize, profile: bool, fp16: bool) -> Result<CudaBackend> {
    let device = cuda_device(local_rank)?;
    let mut opts = cuda_options(device, profile);
    if fp16 {
        opts.half = Half::F16;
    }
    CudaBackend::with_options(opts).with_context(|| {
        format!("cannot start the CUDA backend on device {device} (local rank {local_rank})")
    })
}
