//! The NCCL transport (feature `cuda`): collectives between GPUs, one rank per GPU.
//!
//! - Bootstrap: rank 0 creates NCCL's unique id, which is broadcast over an existing [`Comm`] (MPI's
//!   `broadcast_bytes`; [`super::LocalComm`] at world 1); every rank then joins with
//!   `ncclCommInitRank` on its device (the local rank). That base communicator stays in use for
//!   `broadcast_bytes`, `barrier` and `abort`.
//! - [`Comm`] on host slices: each call stages through device buffers on the communicator's own
//!   stream and waits for the result, so [`super::Zero2`] and the trainer work over NCCL unchanged.
//! - Device level: [`NcclComm::reduce_scatter_device`], [`NcclComm::all_gather_device`] and
//!   [`NcclComm::all_reduce_device`] on buffers of a [`CudaBackend`] (f32 or bf16). They are queued on
//!   the communicator's stream after everything already queued on the backend's stream (an event), and
//!   return at once, so the backward pass keeps running while gradients are reduced;
//!   [`NcclComm::join`] makes the backend's stream wait for them before it reads the results or
//!   overwrites the inputs.
//!
//! # Summation order
//! NCCL chooses its own algorithm (ring or tree, chunked, per message size and topology), so the order
//! in which ranks' values are added is not the canonical pairwise tree of [`super::collective`]. At
//! world 1 nothing is added, so results are bit-identical to [`super::LocalComm`]; beyond world 1 the
//! bit-identity across world sizes that the CPU transports guarantee does not hold. Each element of a
//! sum over `N` ranks is still a sum of the same `N` f32 values, in some order: it differs from the
//! canonical order by at most `(N−1)·ε·Σ|x_i|` (ε = 2⁻²⁴; bf16 buffers: ε = 2⁻⁸), which is the
//! tolerance a comparison across transports should use. The global gradient norm of [`super::Zero2`]
//! stays exact: its f64 all-reduce adds one non-zero value per slot, and `x + 0 = x` in any order.
//!
//! # Library
//! NCCL is opened at run time (`libnccl.so.2`, the name the CUDA images and PyTorch's
//! `nvidia-nccl-cu13` wheel ship, then `libnccl.so`, then any paths the caller adds first); none
//! found is an error that says so, never a panic.

use super::Comm;
use crate::backend::cuda::{CudaBackend, DView, DViewMut};
use crate::tensor::DType;
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, sys as drv_sys};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::cell::Cell;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Library names tried after the caller's paths.
pub const LIB_NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];

// NCCL's C signatures; `ncclResult_t`, the data type and the reduction are C enums, passed as ints
// (an unknown result code read into a Rust enum would be undefined behaviour).
type GetUniqueIdFn = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type CommFn = unsafe extern "C" fn(ncclComm_t) -> c_int;
type ReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    drv_sys::CUstream,
) -> c_int;
type GatherFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    ncclComm_t,
    drv_sys::CUstream,
) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type AsyncErrorFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;

const SUM: c_int = ncclRedOp_t::ncclSum as c_int;

/// The NCCL entry points, from a dynamically opened `libnccl`.
pub struct NcclLib {
    path: String,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    comm_destroy: CommFn,
    comm_abort: CommFn,
    comm_get_async_error: AsyncErrorFn,
    reduce_scatter: ReduceFn,
    all_reduce: ReduceFn,
    all_gather: GatherFn,
    error_string: ErrorStringFn,
    version: VersionFn,
    // Declared last: unloaded after every use above.
    _lib: libloading::Library,
}

impl NcclLib {
    /// Open NCCL: each of `extra` (files), then [`LIB_NAMES`] through the loader's search path.
    pub fn open(extra: &[PathBuf]) -> Result<Self> {
        let mut tried = Vec::new();
        let candidates = extra
            .iter()
            .map(|p| p.as_os_str().to_owned())
            .chain(LIB_NAMES.iter().map(|n| n.into()));
        for c in candidates {
            // SAFETY: loading NCCL runs its (trusted) initialisers only.
            match unsafe { libloading::Library::new(&c) } {
                Ok(lib) => {
                    return Self::bind(lib, &Path::new(&c).display().to_string());
                }
                Err(e) => tried.push(format!("{} ({e})", Path::new(&c).display())),
            }
        }
        bail!(
            "NCCL not found: tried {}. Install NCCL 2 (the nvidia-nccl-cu13 wheel or libnccl2) and \
             put its lib directory on LD_LIBRARY_PATH",
            tried.join("; ")
        )
    }

    fn bind(lib: libloading::Library, path: &str) -> Result<Self> {
        /// A function pointer of type `T` named `name` in `lib`.
        unsafe fn sym<T: Copy>(lib: &libloading::Library, path: &str, name: &str) -> Result<T> {
            // SAFETY (caller): `T` is the C signature of `name`.
            let s = unsafe { lib.get::<T>(name.as_bytes()) }
                .map_err(|e| anyhow!("{path}: no symbol {name} ({e}): not an NCCL 2 library"))?;
            Ok(*s)
        }
        // SAFETY: each type above is the symbol's C signature in nccl.h (NCCL 2.x).
        unsafe {
            Ok(NcclLib {
                path: path.to_string(),
                get_unique_id: sym(&lib, path, "ncclGetUniqueId")?,
                comm_init_rank: sym(&lib, path, "ncclCommInitRank")?,
                comm_destroy: sym(&lib, path, "ncclCommDestroy")?,
                comm_abort: sym(&lib, path, "ncclCommAbort")?,
                comm_get_async_error: sym(&lib, path, "ncclCommGetAsyncError")?,
                reduce_scatter: sym(&lib, path, "ncclReduceScatter")?,
                all_reduce: sym(&lib, path, "ncclAllReduce")?,
                all_gather: sym(&lib, path, "ncclAllGather")?,
                error_string: sym(&lib, path, "ncclGetErrorString")?,
                version: sym(&lib, path, "ncclGetVersion")?,
                _lib: lib,
            })
        }
    }

    /// The file (or name) the library was opened from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// NCCL's version code (e.g. 23007 for 2.30.7).
    pub fn version(&self) -> Result<i32> {
        let mut v: c_int = 0;
        // SAFETY: valid out-pointer.
        self.check(unsafe { (self.version)(&mut v) }, "ncclGetVersion")?;
        Ok(v)
    }

    fn check(&self, code: c_int, what: &str) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static NUL-terminated string (or null) for any code.
        let msg = unsafe {
            let p = (self.error_string)(code);
            if p.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        bail!("{what} failed: NCCL error {code} ({msg})")
    }
}

/// Wait until `done()` says the queued work has finished, checking `async_error()` (NCCL's
/// `ncclCommGetAsyncError`: a dead or failed peer) between polls, and giving up after `timeout`
/// (`--comm-timeout`). A blocking wait would hang forever on a peer that died; this returns `Err`
/// naming `what` and the cause instead, and the caller aborts the communicator. Polls every `poll`.
pub fn wait_polling(
    what: &str,
    mut done: impl FnMut() -> Result<bool>,
    mut async_error: impl FnMut() -> Result<()>,
    timeout: Option<Duration>,
    poll: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if done()? {
            return Ok(());
        }
        async_error().with_context(|| format!("{what}: NCCL reported an error while waiting"))?;
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            bail!(
                "{what}: no progress for {:.0} s (--comm-timeout): a peer rank may have died or hung",
                t.as_secs_f64()
            );
        }
        std::thread::sleep(poll);
    }
}

/// How often a wait checks its stream and NCCL's asynchronous error.
const POLL: Duration = Duration::from_micros(200);

/// One rank of an NCCL communicator (one GPU). See the module docs.
pub struct NcclComm {
    lib: NcclLib,
    comm: ncclComm_t,
    rank: usize,
    world: usize,
    device: usize,
    stream: Arc<CudaStream>,
    base: Box<dyn Comm>,
    sent: Cell<u64>,
    /// `--comm-timeout`: how long a wait may make no progress before the communicator is aborted.
    timeout: Option<Duration>,
    /// Set once `ncclCommAbort` has freed the communicator: every later call fails at once.
    aborted: Cell<bool>,
    /// Host-staging device buffers, grown as needed and reused by every host-slice collective.
    staging:
        std::cell::RefCell<Option<(cudarc::driver::CudaSlice<u8>, cudarc::driver::CudaSlice<u8>)>>,
}

// SAFETY: the NCCL communicator and the stream are used by one thread at a time (`NcclComm` is
// `!Sync` through `Cell`); NCCL allows a communicator to be used from any thread, one call at a time.
unsafe impl Send for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.aborted.get() {
            return;
        }
        // A peer that died would block a plain synchronize forever: wait with the error checks, and
        // abort (instead of destroying, which waits for the peers) when the wait fails.
        match self.wait("dropping the NCCL communicator") {
            // SAFETY: created in `new`, destroyed once, no work pending on our stream.
            Ok(()) => unsafe {
                (self.lib.comm_destroy)(self.comm);
            },
            Err(e) => eprintln!("{e:#}"),
        }
    }
}

fn nccl_type(d: DType) -> Result<c_int> {
    Ok(match d {
        DType::F32 => ncclDataType_t::ncclFloat32 as c_int,
        DType::BF16 => ncclDataType_t::ncclBfloat16 as c_int,
        DType::F16 => ncclDataType_t::ncclFloat16 as c_int,
    })
}

impl NcclComm {
    /// Join the NCCL communicator of `base`'s ranks on CUDA device `device` (normally the local
    /// rank). Collective: every rank of `base` must call it. `lib_paths`: NCCL library files to try
    /// before the default names (the binary may take them from the environment).
    pub fn new(base: Box<dyn Comm>, device: usize, lib_paths: &[PathBuf]) -> Result<Self> {
        let lib = NcclLib::open(lib_paths)?;
        // SAFETY: only dlopens the library.
        if !unsafe { drv_sys::is_culib_present() } {
            bail!(
                "CUDA driver library (libcuda.so) not found: NCCL needs an NVIDIA GPU and driver"
            );
        }
        let ctx = CudaContext::new(device)
            .map_err(|e| anyhow!("NCCL: no usable CUDA device {device} ({e:?})"))?;
        crate::backend::cuda::keep_pool_memory(&ctx)?;
        // Everything on this stream is ordered by explicit events and synchronizations.
        // SAFETY: no buffer or stream has been created through this handle yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("NCCL: creating a CUDA stream: {e:?}"))?;
        ctx.bind_to_thread()
            .map_err(|e| anyhow!("NCCL: binding the CUDA context: {e:?}"))?;
        let (rank, world) = (base.rank(), base.world_size());
        let mut id_bytes = Vec::new();
        if rank == 0 {
            let mut id = ncclUniqueId { internal: [0; 128] };
            // SAFETY: valid out-pointer.
            lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
            id_bytes = id.internal.iter().map(|&c| c as u8).collect();
        }
        base.broadcast_bytes(&mut id_bytes, 0)
            .context("broadcasting the NCCL unique id")?;
        ensure!(
            id_bytes.len() == 128,
            "NCCL unique id: received {} bytes, expected 128",
            id_bytes.len()
        );
        let mut id = ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&id_bytes) {
            *d = *s as c_char;
        }
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; every rank passes the same id and world, its own rank.
        lib.check(
            unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) },
            &format!("ncclCommInitRank (rank {rank} of {world}, device {device})"),
        )?;
        Ok(NcclComm {
            lib,
            comm,
            rank,
            world,
            device,
            stream,
            base,
            sent: Cell::new(0),
            timeout: None,
            aborted: Cell::new(false),
            staging: std::cell::RefCell::new(None),
        })
    }

    /// Give up a wait that makes no progress for `timeout` (`--comm-timeout`), aborting the
    /// communicator. `None` (the default): wait as long as NCCL reports no error.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// NCCL's asynchronous error for this communicator (a peer died, a network failure). `Err` once
    /// aborted.
    fn async_error(&self) -> Result<()> {
        ensure!(
            !self.aborted.get(),
            "the NCCL communicator was aborted after an earlier error"
        );
        let mut code: c_int = 0;
        // SAFETY: live communicator, valid out-pointer.
        self.lib.check(
            unsafe { (self.lib.comm_get_async_error)(self.comm, &mut code) },
            "ncclCommGetAsyncError",
        )?;
        // ncclInProgress (7) is a non-blocking communicator still working, not an error.
        if code == 0 || code == 7 {
            return Ok(());
        }
        self.lib.check(code, "NCCL communicator")
    }

    /// Abort the communicator (`ncclCommAbort`: frees it without waiting for the peers), once.
    fn abort_comm(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: live communicator; it is not used again (`aborted`).
            unsafe {
                (self.lib.comm_abort)(self.comm);
            }
        }
    }

    /// Wait until everything queued on our stream has finished, polling NCCL's asynchronous error
    /// and the timeout ([`wait_polling`]); on failure the communicator is aborted and the cause
    /// returned.
    fn wait(&self, what: &str) -> Result<()> {
        ensure!(
            !self.aborted.get(),
            "{what}: the NCCL communicator was aborted after an earlier error"
        );
        let ev = self
            .stream
            .record_event(None)
            .map_err(|e| anyhow!("cuEventRecord: {e:?}"))?;
        let done = || {
            // SAFETY: `ev` is a live event of this context.
            match unsafe { cudarc::driver::result::event::query(ev.cu_event()) } {
                Ok(()) => Ok(true),
                Err(e) if e.0 == drv_sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
                Err(e) => Err(anyhow!("NCCL stream: {e:?}")),
            }
        };
        let r = wait_polling(what, done, || self.async_error(), self.timeout, POLL);
        if r.is_err() {
            self.abort_comm();
        }
        r
    }

    /// The CUDA device this rank's communicator is on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The opened library (path, version).
    pub fn lib(&self) -> &NcclLib {
        &self.lib
    }

    /// The communicator's own stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn bind(&self) -> Result<()> {
        ensure!(
            !self.aborted.get(),
            "the NCCL communicator was aborted after an earlier error"
        );
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("NCCL: binding the CUDA context: {e:?}"))
    }

    fn add_sent(&self, elems: usize, elem_bytes: usize) {
        self.sent
            .set(self.sent.get() + (elems * (self.world - 1) * elem_bytes) as u64);
    }

    /// Queue `f` on our stream after everything queued so far on `gpu`'s stream.
    fn after(&self, gpu: &CudaBackend) -> Result<()> {
        let ev = gpu
            .stream()
            .record_event(None)
            .map_err(|e| anyhow!("cuEventRecord: {e:?}"))?;
        self.stream
            .wait(&ev)
            .map_err(|e| anyhow!("cuStreamWaitEvent: {e:?}"))
    }

    /// Make `gpu`'s stream wait for every collective queued on this communicator so far (call before
    /// the backend reads a result or overwrites an input of a device collective).
    pub fn join(&self, gpu: &CudaBackend) -> Result<()> {
        let ev = self
            .stream
            .record_event(None)
            .map_err(|e| anyhow!("cuEventRecord: {e:?}"))?;
        gpu.stream()
            .wait(&ev)
            .map_err(|e| anyhow!("cuStreamWaitEvent: {e:?}"))
    }

    /// Wait on the host until every collective queued so far has finished; a peer's failure or the
    /// timeout aborts the communicator and returns the cause instead of hanging.
    pub fn synchronize(&self) -> Result<()> {
        self.wait("NCCL synchronize")
    }

    /// `recv =` block `rank` of the element-wise sum over ranks of `send` (`send.len() ==
    /// recv.len() · world`, same dtype). Queued (see the module docs); [`NcclComm::join`] before use.
    pub fn reduce_scatter_device(
        &self,
        gpu: &CudaBackend,
        send: DView<'_>,
        recv: DViewMut<'_>,
    ) -> Result<()> {
        let ((sp, sn, sd), (rp, rn, rd)) = (send.raw(), recv.raw());
        ensure!(
            sd == rd && sn == rn * self.world,
            "reduce_scatter_device: send {sn} × {sd:?}, recv {rn} × {rd:?}, world {}",
            self.world
        );
        self.after(gpu)?;
        self.raw_reduce_scatter(sp, rp, rn, nccl_type(sd)?)?;
        self.add_sent(rn, sd.size());
        Ok(())
    }

    /// `recv =` every rank's `send` in rank order (`recv.len() == send.len() · world`). Queued; see
    /// [`NcclComm::reduce_scatter_device`].
    pub fn all_gather_device(
        &self,
        gpu: &CudaBackend,
        send: DView<'_>,
        recv: DViewMut<'_>,
    ) -> Result<()> {
        let ((sp, sn, sd), (rp, rn, rd)) = (send.raw(), recv.raw());
        ensure!(
            sd == rd && rn == sn * self.world,
            "all_gather_device: send {sn} × {sd:?}, recv {rn} × {rd:?}, world {}",
            self.world
        );
        self.after(gpu)?;
        self.raw_all_gather(sp, rp, sn, nccl_type(sd)?)?;
        self.add_sent(sn, sd.size());
        Ok(())
    }

    /// `buf =` the element-wise sum over ranks of `buf`, in place. Queued; see
    /// [`NcclComm::reduce_scatter_device`].
    pub fn all_reduce_device(&self, gpu: &CudaBackend, buf: DViewMut<'_>) -> Result<()> {
        let (p, n, d) = buf.raw();
        self.after(gpu)?;
        self.raw_all_reduce(p, p, n, nccl_type(d)?)?;
        self.add_sent(2 * n.div_ceil(self.world), d.size());
        Ok(())
    }

    fn raw_reduce_scatter(&self, send: u64, recv: u64, count: usize, ty: c_int) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `send` holds `count·world` and `recv` `count` elements of `ty` on this device.
        let r = unsafe {
            (self.lib.reduce_scatter)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                ty,
                SUM,
                self.comm,
                self.stream.cu_stream(),
            )
        };
        self.lib.check(r, "ncclReduceScatter")
    }

    fn raw_all_gather(&self, send: u64, recv: u64, count: usize, ty: c_int) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `send` holds `count` and `recv` `count·world` elements of `ty` on this device.
        let r = unsafe {
            (self.lib.all_gather)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                ty,
                self.comm,
                self.stream.cu_stream(),
            )
        };
        self.lib.check(r, "ncclAllGather")
    }

    fn raw_all_reduce(&self, send: u64, recv: u64, count: usize, ty: c_int) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both hold `count` elements of `ty` on this device (in place is allowed).
        let r = unsafe {
            (self.lib.all_reduce)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                ty,
                SUM,
                self.comm,
                self.stream.cu_stream(),
            )
        };
        self.lib.check(r, "ncclAllReduce")
    }

    /// Host staging: `send` to the device, `op(send_ptr, recv_ptr)` on our stream, `out.len()`
    /// elements back into `out`; waits (polling for a failed peer, see [`Self::synchronize`]). The
    /// two device buffers are kept and reused (grown when a call needs more), so a step's many
    /// small collectives do not allocate.
    fn staged<T>(
        &self,
        send: &[T],
        out: &mut [T],
        op: impl FnOnce(u64, u64) -> Result<()>,
    ) -> Result<()>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default,
    {
        self.bind()?;
        let err = |e| anyhow!("NCCL staging: {e:?}");
        let (send_bytes, out_bytes) = (std::mem::size_of_val(send), std::mem::size_of_val(out));
        let mut staging = self.staging.borrow_mut();
        let fits = |b: &cudarc::driver::CudaSlice<u8>, n: usize| b.len() >= n.max(16);
        if !staging
            .as_ref()
            .is_some_and(|(s, r)| fits(s, send_bytes) && fits(r, out_bytes))
        {
            let (old_s, old_r) = staging.as_ref().map_or((0, 0), |(s, r)| (s.len(), r.len()));
            let s = self
                .stream
                .alloc_zeros::<u8>(send_bytes.max(old_s).max(16))
                .map_err(err)?;
            let r = self
                .stream
                .alloc_zeros::<u8>(out_bytes.max(old_r).max(16))
                .map_err(err)?;
            *staging = Some((s, r));
        }
        let (d_send, d_recv) = staging.as_mut().expect("staging buffers allocated above");
        if send_bytes > 0 {
            // SAFETY: `T` is a plain numeric type (f32, f64): its bytes are its value.
            let bytes =
                unsafe { std::slice::from_raw_parts(send.as_ptr() as *const u8, send_bytes) };
            self.stream
                .memcpy_htod(bytes, &mut d_send.slice_mut(0..send_bytes))
                .map_err(err)?;
        }
        {
            let (sp, _gs) = d_send.device_ptr(&self.stream);
            let (rp, _gr) = d_recv.device_ptr_mut(&self.stream);
            op(sp, rp)?;
        }
        // Wait (polling) before the copy back: a copy into pageable host memory blocks until the
        // collective ends, which it never does when a peer has died.
        self.wait("NCCL collective")?;
        if out_bytes > 0 {
            // SAFETY: as above; every byte pattern is a valid f32/f64.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, out_bytes) };
            self.stream
                .memcpy_dtoh(&d_recv.slice(0..out_bytes), bytes)
                .map_err(err)?;
            self.stream.synchronize().map_err(err)?;
        }
        Ok(())
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        let src = buf.to_vec();
        self.staged(&src, buf, |s, r| {
            self.raw_all_reduce(s, r, n, nccl_type(DType::F32)?)
        })?;
        self.add_sent(2 * n.div_ceil(self.world), 4);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let n = buf.len();
        let src = buf.to_vec();
        self.staged(&src, buf, |s, r| {
            self.raw_all_reduce(s, r, n, ncclDataType_t::ncclFloat64 as c_int)
        })?;
        self.add_sent(2 * n.div_ceil(self.world), 8);
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let n = recv.len();
        ensure!(
            send.len() == n * self.world,
            "reduce_scatter: send has {} elements, expected recv ({n}) × world ({})",
            send.len(),
            self.world
        );
        self.staged(send, recv, |s, r| {
            self.raw_reduce_scatter(s, r, n, nccl_type(DType::F32)?)
        })?;
        self.add_sent(n, 4);
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let n = send.len();
        ensure!(
            recv.len() == n * self.world,
            "all_gather: recv has {} elements, expected send ({n}) × world ({})",
            recv.len(),
            self.world
        );
        self.staged(send, recv, |s, r| {
            self.raw_all_gather(s, r, n, nccl_type(DType::F32)?)
        })?;
        self.add_sent(n, 4);
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.base.broadcast_bytes(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        self.synchronize()?;
        self.base.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.abort_comm();
        self.base.abort(code)
    }
    fn bytes_sent(&self) -> u64 {
        self.sent.get() + self.base.bytes_sent()
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
