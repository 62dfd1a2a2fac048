//! How a binary starts and reads the CUDA backend: the same types in every build (the stub built without
//! `cuda` takes them too and returns its error), so binaries fill them without a `cfg`.

use crate::tensor::DType;
use std::path::PathBuf;

/// How to start the backend. The binary fills it (it alone reads the environment).
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// Device ordinal (the local rank).
    pub device: usize,
    /// Directories with the CUDA headers (`cuda_bf16.h`); see [`crate::backend::cuda::kernels::cuda_include_dirs`].
    pub include_dirs: Vec<PathBuf>,
    /// Where compiled cubins are cached (none: compile every start).
    pub cache_dir: Option<PathBuf>,
    /// Time every launch with CUDA events from the start.
    pub profile: bool,
    /// Storage of `Role::Weight` / `Role::Activation` buffers: bf16 (the default) or f16 (the
    /// recipe's fp16 mode; pair it with loss scaling: f16's range ends at 65504).
    pub half: Half,
    /// An NVTX range around every kernel launch and cuBLAS call, named after the kernel (for Nsight;
    /// see `backend::cuda::nvtx`). Off: no NVTX call per launch. Layer ranges ([`super::Backend::range_push`]) are on
    /// regardless (one indirect call each without a profiler).
    pub nvtx: bool,
}

/// The 16-bit storage type of weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Half {
    #[default]
    Bf16,
    F16,
}

impl Half {
    /// The element type of buffers stored in this format.
    pub fn dtype(self) -> DType {
        match self {
            Half::Bf16 => DType::BF16,
            Half::F16 => DType::F16,
        }
    }
}

/// Vocabulary columns per chunk of the CUDA backend's fused lm_head + cross-entropy in training (the
/// chunk is `[n, 8192]` at bf16: 32 MiB at n = 2048 instead of 195 MiB of logits at V = 49954; the
/// size `tools/cuda_bench.rs` measures). Here so the dry-run's memory plan can use it in every build.
pub const LM_HEAD_CE_CHUNK_COLS: usize = 8192;

/// Time of one kernel (or cuBLAS call) name over the profiled launches.
#[derive(Clone, Debug)]
pub struct KernelTime {
    pub name: String,
    pub calls: usize,
    pub total_ms: f64,
}

/// The device ordinal for the process with local rank `local_rank` when `visible` CUDA devices are
/// visible to it: `local_rank % visible`. Launchers that bind one GPU per rank (Slurm's
/// `--gpus-per-task` / `--gpu-bind`, a container per rank) leave each rank one visible device, which
/// is then device 0 for every rank; with all of a node's GPUs visible, rank `r` gets GPU `r`. More
/// ranks than devices share them round-robin. No visible device is an error.
pub fn device_for_local_rank(local_rank: usize, visible: usize) -> anyhow::Result<usize> {
    anyhow::ensure!(
        visible > 0,
        "no CUDA device visible to local rank {local_rank} (check CUDA_VISIBLE_DEVICES and the launcher's GPU binding)"
    );
    Ok(local_rank % visible)
}
