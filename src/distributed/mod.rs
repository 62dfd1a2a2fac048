//! Distributed runtime: the [`Comm`] trait, its transports, shard arithmetic and ZeRO-2.
//!
//! This module knows flat buffers (host `f32` slices or a backend's buffers) and nothing of
//! LLaMA. A training loop holds one `Box<dyn Comm>` (from [`init`]) and one [`DeviceZero2`] over
//! its flat *trainable* buffer, on the backend's buffers ([`BufComm`] runs the collectives there;
//! the host [`Zero2`] is the reference and owns the checkpoint format); frozen weights never reach
//! this module, so they are never communicated.
//!
//! Transports: [`LocalComm`] (one process), [`ThreadComm`] (N ranks as threads of one process —
//! how the ZeRO-2 logic is tested by plain `cargo test`), and `MpiComm` (feature `mpi`, the system
//! OpenMPI through the `mpi` crate). All of them move bytes only; the sums are done here, in
//! [`collective`], in one fixed order (see "Reduction order"), so every transport gives the same
//! bits. The exception is `NcclComm` (feature `cuda`, [`init_nccl`]): GPUs sum in NCCL's own order,
//! bit-identical to the others at world 1 only (see its module docs for the tolerance).
//!
//! # Reduction order
//! A sum over ranks `0..n` is the *canonical pairwise tree*: split at `h` = the largest power of
//! two below `n`, sum `0..h` and `h..n` the same way, add the two. The same rule over global
//! micro-batch indices, with each rank holding a contiguous block of a power-of-two number of
//! micro-batches summed by [`GradAccumulator`], composes into the same tree — so world 1 with
//! accumulation `A·N` and world `N` with accumulation `A` give bit-identical gradients (and, since
//! the norm is a tree over global element indices too, bit-identical steps). docs/DESIGN-NOTES.md has
//! the argument.

pub mod accumulate;
pub mod collective;
pub mod device;
pub mod env;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod shard;
pub mod thread;
pub mod toy;
pub mod zero;
pub mod zero_device;

pub use device::BufComm;
pub use env::{LaunchInfo, Launcher, launch_info};
pub use local::LocalComm;
pub use shard::{MemoryPlan, ShardLayout, memory_plan, rank_batch_indices};
pub use thread::ThreadComm;
pub use zero::{GradAccumulator, StepReport, Zero2};
pub use zero_device::DeviceZero2;

use anyhow::Result;

/// Whether this build can run several processes (`--features mpi`).
pub const MPI_ENABLED: bool = cfg!(feature = "mpi");
/// Whether this build has the NCCL transport (`--features cuda`).
pub const NCCL_ENABLED: bool = cfg!(feature = "cuda");

/// Collective communication between the ranks of one job.
///
/// Every rank calls the same collectives in the same order with the same lengths. Sums are
/// computed in the canonical pairwise order over ranks (see the module docs) by every CPU
/// transport, so the result is the same on every rank and independent of the transport; NCCL
/// (`nccl::NcclComm`) sums in its own order (equal at world 1, within rounding beyond).
/// `bytes_sent` counts the bytes this rank handed to the transport for other ranks (copies to
/// itself excluded), under the direct algorithm each collective is built from: reduce-scatter of
/// `n·N` elements sends `n·(N−1)` of them, all-gather of `n` per rank sends `n·(N−1)`.
pub trait Comm: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `buf =` the element-wise sum of every rank's `buf` (same on all ranks).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// `buf =` the element-wise sum of every rank's `buf`, in f64 (norms, counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// `recv =` block `rank` of the element-wise sum of every rank's `send`;
    /// `send.len() == recv.len() * world_size`, block `j` is `send[j*n..(j+1)*n]`.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `recv =` the concatenation of every rank's `send` in rank order;
    /// `recv.len() == send.len() * world_size`.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `buf =` root's `buf` (any length; resized on the other ranks).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// End the whole job with `code` (MPI: `MPI_Abort`). Prints nothing: say why before calling.
    fn abort(&self, code: i32) -> !;
    /// Bytes sent to other ranks so far (see the trait docs for what counts).
    fn bytes_sent(&self) -> u64;
    /// The concrete transport, for a transport with collectives on device buffers (NCCL:
    /// [`device::BufComm`] finds it here); `None` for the host transports.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// The communicator for this process: `MpiComm` when `launch` says the job has more than one
/// rank (or an MPI launcher started it), else [`LocalComm`].
///
/// `watchdog`: with MPI, a collective that waits longer than this (a barrier: ten times this)
/// prints a clear error and ends the process (so a hung rank cannot hang the job; a rank that
/// *dies* is already caught by `mpirun`/`srun`, which end the job). `None` disables it.
pub fn init(
    launch: Option<&LaunchInfo>,
    watchdog: Option<std::time::Duration>,
) -> Result<Box<dyn Comm>> {
    match launch {
        None => Ok(Box::new(LocalComm)),
        Some(info) => init_launched(info, watchdog),
    }
}

#[cfg(feature = "mpi")]
fn init_launched(
    info: &LaunchInfo,
    watchdog: Option<std::time::Duration>,
) -> Result<Box<dyn Comm>> {
    let comm = mpi::MpiComm::init(watchdog)?;
    if comm.rank() != info.rank || comm.world_size() != info.world_size {
        anyhow::bail!(
            "MPI says rank {} of {}, but the {:?} environment says rank {} of {}",
            comm.rank(),
            comm.world_size(),
            info.launcher,
            info.rank,
            info.world_size
        );
    }
    Ok(Box::new(comm))
}

#[cfg(not(feature = "mpi"))]
fn init_launched(
    info: &LaunchInfo,
    _watchdog: Option<std::time::Duration>,
) -> Result<Box<dyn Comm>> {
    if info.world_size == 1 {
        return Ok(Box::new(LocalComm));
    }
    anyhow::bail!(
        "launched as rank {} of {} by {:?}, but this zhllama was built without MPI: rebuild with \
         `cargo build --release --features mpi`",
        info.rank,
        info.world_size,
        info.launcher
    )
}

/// The NCCL communicator over `base`'s ranks (from [`init`]), on CUDA device `device` (the local
/// rank): what the binary uses with the CUDA backend at world > 1. Collective over `base`.
/// `nccl_lib_paths`: NCCL library files to try before `libnccl.so.2` / `libnccl.so`. Sums are in
/// NCCL's order, not the canonical tree (see `nccl`'s module docs). Fails with a clear error
/// without NCCL, a GPU, or in a build without `cuda`. `timeout` (`--comm-timeout`): a wait that
/// makes no progress that long aborts the communicator with an error (a failed peer is detected
/// through NCCL's asynchronous error without it).
pub fn init_nccl(
    base: Box<dyn Comm>,
    device: usize,
    nccl_lib_paths: &[std::path::PathBuf],
    timeout: Option<std::time::Duration>,
) -> Result<Box<dyn Comm>> {
    init_nccl_impl(base, device, nccl_lib_paths, timeout)
}

#[cfg(feature = "cuda")]
fn init_nccl_impl(
    base: Box<dyn Comm>,
    device: usize,
    nccl_lib_paths: &[std::path::PathBuf],
    timeout: Option<std::time::Duration>,
) -> Result<Box<dyn Comm>> {
    Ok(Box::new(
        nccl::NcclComm::new(base, device, nccl_lib_paths)?.with_timeout(timeout),
    ))
}

#[cfg(not(feature = "cuda"))]
fn init_nccl_impl(
    _base: Box<dyn Comm>,
    _device: usize,
    _nccl_lib_paths: &[std::path::PathBuf],
    _timeout: Option<std::time::Duration>,
) -> Result<Box<dyn Comm>> {
    anyhow::bail!(
        "NCCL needs the CUDA backend: rebuild with `cargo build --release --features cuda`"
    )
}
