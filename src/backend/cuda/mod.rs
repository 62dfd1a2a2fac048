//! The CUDA backend (feature `cuda`): the `Backend` trait over device buffers, with the kernels of
//! `kernels/` (compiled at start-up by NVRTC for the device's architecture, cached on disk) and
//! cuBLAS GEMMs (bf16, f16 or fp32 inputs, fp32 accumulation).
//!
//! - Storage by [`Role`]: `Weight` and `Activation` buffers are bf16, or f16 with
//!   [`CudaOptions::half`] = [`Half::F16`] (the recipe's fp16 mode), `Fp32` buffers fp32. Host
//!   transfers are f32 (converted on the host, round to nearest even).
//! - One explicit stream per backend; every op is queued on it and returns at once. The trait's ops
//!   return `()`, so a failed launch is recorded and returned by the next [`Backend::synchronize`]
//!   (or any call that returns `Result`).
//! - Each op picks its kernel variant from the dtypes of its arguments: the mixed-precision
//!   combination (bf16/f16 data, fp32 statistics and gradient accumulators) has a `_bf16`/`_f16`
//!   kernel, an all-fp32 call the `_f32` kernel; any other combination is staged through fp32
//!   scratch (slow but exact, so a caller's unusual `Role` never gives a wrong result).
//! - No driver, no GPU or no NVRTC: [`CudaBackend::new`] returns an error saying which, never panics.
//!
//! Fused ops beyond the trait (the model may call them directly): attention with RoPE applied on the
//! fly ([`CudaBackend::attention_rope_forward`]), the chunked lm_head + cross-entropy
//! ([`CudaBackend::lm_head_cross_entropy_forward`]), the LoRA low-rank path
//! ([`CudaBackend::lora_forward`]) and AdamW writing a bf16 copy ([`CudaBackend::adamw_step_with_copy`]).
//! Profiling: [`CudaBackend::set_profiling`] + [`CudaBackend::profile_report`] (CUDA events per launch).

pub mod nvrtc;
pub mod nvtx;
mod optim;

use super::{AdamW, Backend, LmHeadCeBuffers, Role};
use crate::kernels;
use crate::tensor::DType;
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PushKernelArg, result as drv, sys as drv_sys,
};
use half::{bf16, f16};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// True in builds with the `cuda` feature.
pub const ENABLED: bool = true;

pub use super::cuda_options::{CudaOptions, Half, KernelTime, device_for_local_rank};

/// A device buffer: `len` elements stored as `dtype`.
pub struct CudaBuf {
    mem: CudaSlice<u8>,
    ptr: u64,
    len: usize,
    dtype: DType,
}

/// Token ids or labels on the device, plus the CSR grouping of positions by id that the
/// deterministic embedding backward reads (built on the host by `upload_ids`).
pub struct CudaIds {
    ids: CudaSlice<i32>,
    ptr: u64,
    len: usize,
    uniq: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    n_uniq: usize,
}

/// A read-only range of a buffer.
#[derive(Clone, Copy)]
pub struct DView<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    _p: PhantomData<&'a ()>,
}
/// A writable range of a buffer.
pub struct DViewMut<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    _p: PhantomData<&'a mut ()>,
}
impl<'a> DView<'a> {
    /// Elements `off..off + len` of this view.
    fn sub(self, off: usize, len: usize) -> DView<'a> {
        debug_assert!(off + len <= self.len, "sub-view out of range");
        DView {
            ptr: self.ptr + (off * self.dtype.size()) as u64,
            len,
            dtype: self.dtype,
            _p: PhantomData,
        }
    }
}
impl DViewMut<'_> {
    fn ro(&self) -> DView<'_> {
        DView {
            ptr: self.ptr,
            len: self.len,
            dtype: self.dtype,
            _p: PhantomData,
        }
    }
    /// Elements `off..off + len` of this view, borrowed for one call.
    fn sub_mut(&mut self, off: usize, len: usize) -> DViewMut<'_> {
        debug_assert!(off + len <= self.len, "sub-view out of range");
        DViewMut {
            ptr: self.ptr + (off * self.dtype.size()) as u64,
            len,
            dtype: self.dtype,
            _p: PhantomData,
        }
    }
    /// The whole view, borrowed for one call (a view is consumed by the op it is passed to).
    fn reborrow(&mut self) -> DViewMut<'_> {
        self.sub_mut(0, self.len)
    }
}

struct Profiler {
    enabled: bool,
    records: Vec<(String, CudaEvent, CudaEvent)>,
}

/// How an argument is used by a kernel (decides the copies when it is staged through fp32).
#[derive(Clone, Copy, PartialEq)]
enum Io {
    In,
    Out,
    InOut,
}

/// A kernel argument.
#[derive(Clone, Copy)]
enum KArg {
    P(u64),
    I(i32),
    L(i64),
    U(u32),
    Q(u64),
    F(f32),
}

const GRID_CAP: u32 = 65535;

use super::cuda_options::LM_HEAD_CE_CHUNK_COLS;

/// The CUDA backend. See the module docs.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: blas_sys::cublasHandle_t,
    _modules: Vec<Arc<CudaModule>>,
    funcs: HashMap<String, CudaFunction>,
    arch: String,
    sm_count: u32,
    device_name: String,
    /// Storage type of `Weight` / `Activation` buffers (bf16 or f16).
    half: DType,
    scratch: Mutex<HashMap<String, CudaSlice<u8>>>,
    error: Mutex<Option<anyhow::Error>>,
    profiler: Mutex<Profiler>,
    /// [`CudaOptions::nvtx`].
    nvtx_ops: bool,
    /// [`Backend::host_transfer_bytes`].
    transferred: std::sync::atomic::AtomicU64,
}

// SAFETY: the cuBLAS handle is used only on this backend's stream, and every use goes through `&self`
// methods that the trait requires to be callable from any thread; cuBLAS handles may be shared across
// threads as long as calls are not concurrent, which the single queueing stream and the `blas` calls
// below (never re-entrant) respect for the way the trainer drives a backend (one thread at a time).
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        // SAFETY: created in `with_options`, destroyed once.
        unsafe {
            let _ = blas_result::destroy_handle(self.blas);
        }
    }
}

// ---- raw access for other device code (the NCCL transport in `crate::distributed::nccl`) ----------
impl DView<'_> {
    /// `(device address, elements, dtype)`; valid while the view's buffer lives.
    pub fn raw(&self) -> (u64, usize, DType) {
        (self.ptr, self.len, self.dtype)
    }
}
impl DViewMut<'_> {
    /// `(device address, elements, dtype)`; valid while the view's buffer lives.
    pub fn raw(&self) -> (u64, usize, DType) {
        (self.ptr, self.len, self.dtype)
    }
}
impl CudaBackend {
    /// The stream every op is queued on (its context is the device's primary context). Work on
    /// another stream that reads or writes this backend's buffers must be ordered with events.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// The storage type of a buffer of `role` when weights and activations are stored as `half`.
fn dt(role: Role, half: DType) -> DType {
    match role {
        Role::Weight | Role::Activation => half,
        Role::Fp32 => DType::F32,
    }
}

fn suffix(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F16 => "f16",
    }
}

/// True when every dtype is the same 16-bit storage type (bf16 or f16): the ops' `_bf16`/`_f16`
/// kernels take exactly that combination.
fn uni16(ds: &[DType]) -> bool {
    matches!(ds.first(), Some(DType::BF16 | DType::F16)) && ds.iter().all(|&d| d == ds[0])
}

/// Vectorised kernels read 16 bytes (f32) or 8 bytes (bf16) at a time; a view that does not start
/// on a 16-byte boundary takes the staged path instead.
fn aligned(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

fn blocks(len: usize, threads: u32) -> u32 {
    (len.div_ceil(threads as usize)).clamp(1, (GRID_CAP as usize) * 16) as u32
}

impl CudaBackend {
    /// The backend on device `device_ordinal`, with the default header search
    /// (`/usr/local/cuda/include`) and no compile cache. Binaries should prefer
    /// [`CudaBackend::with_options`] with [`crate::kernels::cuda_include_dirs`].
    pub fn new(device_ordinal: usize) -> Result<Self> {
        Self::with_options(CudaOptions {
            device: device_ordinal,
            include_dirs: kernels::cuda_include_dirs(|_| None),
            cache_dir: None,
            profile: false,
            half: Half::Bf16,
            nvtx: false,
        })
    }

    /// How many CUDA devices this process sees (after `CUDA_VISIBLE_DEVICES` and the launcher's
    /// binding). `Err` without a driver.
    pub fn device_count() -> Result<usize> {
        // SAFETY: only dlopens the library.
        if !unsafe { drv_sys::is_culib_present() } {
            bail!("CUDA driver library (libcuda.so) not found: no NVIDIA driver on this machine");
        }
        drv::init()
            .map_err(|e| anyhow!("cuInit failed ({e:?}): no usable NVIDIA GPU or driver"))?;
        let n = drv::device::get_count().map_err(|e| anyhow!("cuDeviceGetCount failed: {e:?}"))?;
        Ok(n.max(0) as usize)
    }

    /// Start the backend: driver, device, stream, cuBLAS, then compile (or load from the cache) and
    /// load every kernel file for this device's architecture.
    pub fn with_options(opts: CudaOptions) -> Result<Self> {
        // SAFETY: only dlopens the library.
        if !unsafe { drv_sys::is_culib_present() } {
            bail!("CUDA driver library (libcuda.so) not found: no NVIDIA driver on this machine");
        }
        nvrtc::ensure_present()?;
        // SAFETY: only dlopens the library.
        if !unsafe { blas_sys::is_culib_present() } {
            bail!(
                "cuBLAS (libcublas.so) not found: install the CUDA toolkit or the nvidia-cublas wheel"
            );
        }
        drv::init()
            .map_err(|e| anyhow!("cuInit failed ({e:?}): no usable NVIDIA GPU or driver"))?;
        let count =
            drv::device::get_count().map_err(|e| anyhow!("cuDeviceGetCount failed: {e:?}"))?;
        ensure!(count > 0, "no CUDA device found");
        ensure!(
            (opts.device as i32) < count,
            "CUDA device {} requested but only {count} present",
            opts.device
        );
        let ctx = CudaContext::new(opts.device)
            .map_err(|e| anyhow!("creating a CUDA context on device {}: {e:?}", opts.device))?;
        keep_pool_memory(&ctx)?;
        // One explicit stream orders everything; per-buffer event tracking would only add overhead.
        // SAFETY: called before any buffer or stream is created.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("creating a CUDA stream: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))?;
        let arch = format!("sm_{major}{minor}");
        let sm_count = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("{e:?}"))? as u32;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let blas =
            blas_result::create_handle().map_err(|e| anyhow!("cublasCreate failed: {e:?}"))?;
        // SAFETY: valid handle and stream.
        unsafe { blas_result::set_stream(blas, stream.cu_stream() as _) }
            .map_err(|e| anyhow!("cublasSetStream: {e:?}"))?;

        ensure!(
            !opts.include_dirs.is_empty(),
            "no CUDA include directory with cuda_bf16.h (set CUDA_HOME, or ZHLLAMA_CUDA_INCLUDE to .../nvidia/cu13/include)"
        );
        let cubins = compile_all(&arch, &opts.include_dirs, opts.cache_dir.as_deref())?;
        let mut modules = Vec::new();
        let mut funcs = HashMap::new();
        for (file, cubin, names) in cubins {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                .map_err(|e| anyhow!("loading {file} for {arch}: {e:?}"))?;
            for name in names {
                let f = module
                    .load_function(&name)
                    .map_err(|e| anyhow!("{file}: kernel {name}: {e:?}"))?;
                funcs.insert(name, f);
            }
            modules.push(module);
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            _modules: modules,
            funcs,
            arch,
            sm_count,
            device_name,
            half: opts.half.dtype(),
            scratch: Mutex::new(HashMap::new()),
            error: Mutex::new(None),
            profiler: Mutex::new(Profiler {
                enabled: opts.profile,
                records: Vec::new(),
            }),
            nvtx_ops: opts.nvtx,
            transferred: Default::default(),
        })
    }

    /// `sm_90`, ...
    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// The storage type of `Role::Weight` / `Role::Activation` buffers.
    pub fn half_dtype(&self) -> DType {
        self.half
    }
    /// The device's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }
    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| anyhow!("{e:?}"))
    }

    // ---- profiling --------------------------------------------------------------------------------
    /// Turn per-launch CUDA-event timing on or off (off by default: events cost a little per launch).
    pub fn set_profiling(&self, on: bool) {
        self.profiler.lock().unwrap().enabled = on;
    }
    /// Forget the launches timed so far.
    pub fn profile_reset(&self) {
        self.profiler.lock().unwrap().records.clear();
    }
    /// Per kernel name (cuBLAS calls as `cublas_gemm_<dtypes>`): calls and total milliseconds since the
    /// last reset, largest first. Synchronizes the stream.
    pub fn profile_report(&self) -> Result<Vec<KernelTime>> {
        self.synchronize()?;
        let p = self.profiler.lock().unwrap();
        let mut map: HashMap<&str, (usize, f64)> = HashMap::new();
        for (name, a, b) in &p.records {
            let ms = a
                .elapsed_ms(b)
                .map_err(|e| anyhow!("cuEventElapsedTime: {e:?}"))? as f64;
            let e = map.entry(name.as_str()).or_default();
            e.0 += 1;
            e.1 += ms;
        }
        let mut out: Vec<KernelTime> = map
            .into_iter()
            .map(|(n, (c, t))| KernelTime {
                name: n.to_string(),
                calls: c,
                total_ms: t,
            })
            .collect();
        out.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        Ok(out)
    }
    /// Milliseconds of GPU time the work `f` queues on the stream (CUDA events around it; waits for
    /// it to finish). For benchmarks; returns the first queued error, if any.
    pub fn time_ms(&self, f: impl FnOnce()) -> Result<f32> {
        let ev = || {
            self.stream
                .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| anyhow!("cuEventRecord: {e:?}"))
        };
        let a = ev()?;
        f();
        let b = ev()?;
        b.synchronize()
            .map_err(|e| anyhow!("cuEventSynchronize: {e:?}"))?;
        self.take_error()?;
        a.elapsed_ms(&b)
            .map_err(|e| anyhow!("cuEventElapsedTime: {e:?}"))
    }
    fn prof_start(&self) -> Option<CudaEvent> {
        if !self.profiler.lock().unwrap().enabled {
            return None;
        }
        self.stream
            .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
    }
    fn prof_end(&self, name: &str, start: Option<CudaEvent>) {
        if let Some(s) = start
            && let Ok(e) = self
                .stream
                .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
        {
            self.profiler
                .lock()
                .unwrap()
                .records
                .push((name.to_string(), s, e));
        }
    }

    // ---- errors, scratch, launches ----------------------------------------------------------------
    /// Make this backend's context current on the calling thread (raw driver and cuBLAS calls need
    /// it; cudarc's launches do it themselves).
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
    }
    fn record(&self, r: Result<()>) {
        if let Err(e) = r {
            let mut g = self.error.lock().unwrap();
            if g.is_none() {
                *g = Some(e);
            }
        }
    }
    fn take_error(&self) -> Result<()> {
        match self.error.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A device pointer to at least `bytes` bytes of scratch named `slot` (grow-only, reused; stream
    /// ordering makes reuse safe since every use is queued on the one stream).
    fn scratch(&self, slot: &str, bytes: usize) -> Result<u64> {
        let mut s = self.scratch.lock().unwrap();
        let need = bytes.max(16);
        if s.get(slot).is_none_or(|b| b.len() < need) {
            let mem = self
                .stream
                .alloc_zeros::<u8>(need)
                .map_err(|e| anyhow!("scratch alloc of {need} B: {e:?}"))?;
            s.insert(slot.to_string(), mem);
        }
        let (p, _g) = s[slot].device_ptr(&self.stream);
        Ok(p)
    }

    /// The device table `inv_freq[i] = theta^(−2i/d)`, `i < d/2` (`ops::rope::inv_freq`: correctly
    /// rounded, as the CPU backend uses), uploaded once per (theta, d) and kept; `0` (a null
    /// pointer: no RoPE) for `theta = 0`. The kernels take the table rather than computing the
    /// frequencies with CUDA's `powf`, which is not correctly rounded.
    fn rope_inv_freq(&self, theta: f32, d: usize) -> Result<u64> {
        if theta == 0.0 {
            return Ok(0);
        }
        ensure!(
            theta.is_finite() && theta > 0.0,
            "rope: theta {theta} is not a positive number"
        );
        let slot = format!("rope_inv_freq_{:08x}_d{d}", theta.to_bits());
        let mut s = self.scratch.lock().unwrap();
        if !s.contains_key(&slot) {
            let bytes: Vec<u8> = (0..d / 2)
                .flat_map(|i| crate::ops::rope::inv_freq(theta, d, i).to_le_bytes())
                .collect();
            let mem = self
                .stream
                .clone_htod(&bytes)
                .map_err(|e| anyhow!("uploading the RoPE frequency table: {e:?}"))?;
            s.insert(slot.clone(), mem);
        }
        let (p, _g) = s[&slot].device_ptr(&self.stream);
        Ok(p)
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[KArg],
    ) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .with_context(|| format!("kernel {name} not loaded"))?;
        kernels::check_grid(name, (grid.0 as usize, grid.1 as usize, grid.2 as usize))?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                KArg::P(v) | KArg::Q(v) => b.arg(v),
                KArg::I(v) => b.arg(v),
                KArg::L(v) => b.arg(v),
                KArg::U(v) => b.arg(v),
                KArg::F(v) => b.arg(v),
            };
        }
        let _range = nvtx::Range::new(self.nvtx_ops, name);
        let start = self.prof_start();
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: every launcher passes arguments matching the kernel's signature (pointer, int, long
        // long, float in the order of the CUDA source) and checked the views' sizes.
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("launching {name}: {e:?}"))?;
        self.prof_end(name, start);
        Ok(())
    }

    /// Let kernel `name` take `dynamic` bytes of dynamic shared memory: counts its static shared
    /// memory too, and above the 48 KiB default opts in up to the device's per-block limit
    /// (`kernels::dynamic_smem_plan`).
    fn allow_dynamic_smem(&self, name: &str, dynamic: usize) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .with_context(|| format!("kernel {name} not loaded"))?;
        let static_ = f
            .shared_size_bytes()
            .map_err(|e| anyhow!("{name}: reading its static shared memory: {e:?}"))?;
        let optin = self
            .ctx
            .attribute(
                drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| anyhow!("reading the device's shared memory limit: {e:?}"))?;
        if let Some(bytes) =
            kernels::dynamic_smem_plan(name, dynamic, static_ as usize, optin as usize)?
        {
            f.set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| anyhow!("{name}: allowing {bytes} B of dynamic shared memory: {e:?}"))?;
        }
        Ok(())
    }

    /// Run `f` with every argument as a 16-byte-aligned fp32 device pointer: aligned fp32 views are
    /// passed as they are, others are copied into fp32 scratch (when read) and back (when written).
    fn with_f32(
        &self,
        args: &[(u64, usize, DType, Io)],
        f: impl FnOnce(&[u64]) -> Result<()>,
    ) -> Result<()> {
        let mut ptrs = Vec::with_capacity(args.len());
        for (i, &(p, len, d, io)) in args.iter().enumerate() {
            if d == DType::F32 && p % 16 == 0 {
                ptrs.push(p);
                continue;
            }
            let s = self.scratch(&format!("stage{i}"), len * 4)?;
            if io != Io::Out {
                self.cast(s, DType::F32, p, d, len)?;
            }
            ptrs.push(s);
        }
        f(&ptrs)?;
        for (i, &(p, len, d, io)) in args.iter().enumerate() {
            if ptrs[i] != p && io != Io::In {
                self.cast(p, d, ptrs[i], DType::F32, len)?;
            }
        }
        Ok(())
    }

    /// `out = x` with conversion.
    fn cast(&self, out: u64, od: DType, x: u64, xd: DType, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let name = format!("copy_v1_{}_{}", suffix(od), suffix(xd));
        self.launch(
            &name,
            (blocks(len, 256).min(4096), 1, 1),
            256,
            0,
            &[KArg::P(out), KArg::P(x), KArg::L(len as i64)],
        )
    }

    fn check_view(what: &str, len: usize, want: usize) -> Result<()> {
        ensure!(
            len == want,
            "{what}: view holds {len} elements, expected {want}"
        );
        Ok(())
    }

    // ---- fused ops beyond the trait ------------------------------------------------------------------
    /// Causal GQA attention with RoPE (base `theta`, positions `pos_offset + t`) applied to q and k as
    /// they are loaded; `theta = 0` is plain attention. `out =`, `lse =`; q, k un-rotated.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rope_forward(
        &self,
        out: DViewMut<'_>,
        lse: DViewMut<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        b: usize,
        t: usize,
        h: usize,
        hkv: usize,
        d: usize,
        theta: f32,
        pos_offset: usize,
    ) {
        let r = (|| {
            ensure!(
                d == 64 || d == 128,
                "attention: head dim {d} unsupported (64 or 128)"
            );
            ensure!(
                hkv > 0 && h.is_multiple_of(hkv),
                "attention: {h} heads not a multiple of {hkv} kv heads"
            );
            Self::check_view("attention q", q.len, b * t * h * d)?;
            Self::check_view("attention k", k.len, b * t * hkv * d)?;
            Self::check_view("attention v", v.len, b * t * hkv * d)?;
            Self::check_view("attention out", out.len, b * t * h * d)?;
            Self::check_view("attention lse", lse.len, b * h * t)?;
            if b * t * h == 0 {
                return Ok(());
            }
            let inv_freq = self.rope_inv_freq(theta, d)?;
            let grid = (t.div_ceil(32) as u32, (b * h) as u32, 1);
            let tail = |p: &[u64]| {
                vec![
                    KArg::P(p[0]),
                    KArg::P(p[1]),
                    KArg::P(p[2]),
                    KArg::P(p[3]),
                    KArg::P(p[4]),
                    KArg::I(b as i32),
                    KArg::I(t as i32),
                    KArg::I(h as i32),
                    KArg::I(hkv as i32),
                    KArg::P(inv_freq),
                    KArg::I(pos_offset as i32),
                ]
            };
            let bf = uni16(&[out.dtype, q.dtype, k.dtype, v.dtype])
                && lse.dtype == DType::F32
                && aligned(&[out.ptr, q.ptr, k.ptr, v.ptr]);
            if bf {
                let a = tail(&[out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr]);
                self.launch(
                    &format!("attention_forward_v1_d{d}_{}", suffix(out.dtype)),
                    grid,
                    128,
                    0,
                    &a,
                )
            } else {
                self.with_f32(
                    &[
                        (out.ptr, out.len, out.dtype, Io::Out),
                        (lse.ptr, lse.len, lse.dtype, Io::Out),
                        (q.ptr, q.len, q.dtype, Io::In),
                        (k.ptr, k.len, k.dtype, Io::In),
                        (v.ptr, v.len, v.dtype, Io::In),
                    ],
                    |p| {
                        self.launch(
                            &format!("attention_forward_v1_d{d}_f32"),
                            grid,
                            128,
                            0,
                            &tail(p),
                        )
                    },
                )
            }
        })();
        self.record(r);
    }

    /// Backward of [`Self::attention_rope_forward`]: `dq =`, `dk =`, `dv =` with respect to the
    /// un-rotated q and k. Deterministic (no atomics): dk/dv per key tile, then dq per query tile.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rope_backward(
        &self,
        dq: DViewMut<'_>,
        dk: DViewMut<'_>,
        dv: DViewMut<'_>,
        dout: DView<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        out: DView<'_>,
        lse: DView<'_>,
        b: usize,
        t: usize,
        h: usize,
        hkv: usize,
        d: usize,
        theta: f32,
        pos_offset: usize,
    ) {
        let r = (|| {
            ensure!(
                d == 64 || d == 128,
                "attention: head dim {d} unsupported (64 or 128)"
            );
            ensure!(
                hkv > 0 && h.is_multiple_of(hkv),
                "attention: {h} heads not a multiple of {hkv} kv heads"
            );
            for (what, len, want) in [
                ("dq", dq.len, b * t * h * d),
                ("dk", dk.len, b * t * hkv * d),
                ("dv", dv.len, b * t * hkv * d),
                ("dout", dout.len, b * t * h * d),
                ("q", q.len, b * t * h * d),
                ("k", k.len, b * t * hkv * d),
                ("v", v.len, b * t * hkv * d),
                ("out", out.len, b * t * h * d),
                ("lse", lse.len, b * h * t),
            ] {
                Self::check_view(&format!("attention backward {what}"), len, want)?;
            }
            if b * t * h == 0 {
                return Ok(());
            }
            let inv_freq = self.rope_inv_freq(theta, d)?;
            let delta = self.scratch("att_delta", b * h * t * 4)?;
            let run = |sfx: &str, p: &[u64]| -> Result<()> {
                // p: dq dk dv dout q k v out lse
                let rows = b * t * h;
                self.launch(
                    &format!("attention_backward_delta_v1_{sfx}"),
                    (rows.div_ceil(8) as u32, 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(delta),
                        KArg::P(p[3]),
                        KArg::P(p[7]),
                        KArg::I(b as i32),
                        KArg::I(t as i32),
                        KArg::I(h as i32),
                        KArg::I(d as i32),
                    ],
                )?;
                let common = [
                    KArg::I(b as i32),
                    KArg::I(t as i32),
                    KArg::I(h as i32),
                    KArg::I(hkv as i32),
                    KArg::P(inv_freq),
                    KArg::I(pos_offset as i32),
                ];
                let mut a = vec![
                    KArg::P(p[1]),
                    KArg::P(p[2]),
                    KArg::P(p[3]),
                    KArg::P(p[4]),
                    KArg::P(p[5]),
                    KArg::P(p[6]),
                    KArg::P(p[8]),
                    KArg::P(delta),
                ];
                a.extend_from_slice(&common);
                self.launch(
                    &format!("attention_backward_dkdv_v1_d{d}_{sfx}"),
                    (t.div_ceil(32) as u32, (b * hkv) as u32, 1),
                    128,
                    0,
                    &a,
                )?;
                let mut a = vec![
                    KArg::P(p[0]),
                    KArg::P(p[3]),
                    KArg::P(p[4]),
                    KArg::P(p[5]),
                    KArg::P(p[6]),
                    KArg::P(p[8]),
                    KArg::P(delta),
                ];
                a.extend_from_slice(&common);
                self.launch(
                    &format!("attention_backward_dq_v1_d{d}_{sfx}"),
                    (t.div_ceil(32) as u32, (b * h) as u32, 1),
                    128,
                    0,
                    &a,
                )
            };
            let data = [
                dq.dtype, dk.dtype, dv.dtype, dout.dtype, q.dtype, k.dtype, v.dtype, out.dtype,
            ];
            if uni16(&data)
                && lse.dtype == DType::F32
                && aligned(&[
                    dq.ptr, dk.ptr, dv.ptr, dout.ptr, q.ptr, k.ptr, v.ptr, out.ptr,
                ])
            {
                run(
                    suffix(dq.dtype),
                    &[
                        dq.ptr, dk.ptr, dv.ptr, dout.ptr, q.ptr, k.ptr, v.ptr, out.ptr, lse.ptr,
                    ],
                )
            } else {
                self.with_f32(
                    &[
                        (dq.ptr, dq.len, dq.dtype, Io::Out),
                        (dk.ptr, dk.len, dk.dtype, Io::Out),
                        (dv.ptr, dv.len, dv.dtype, Io::Out),
                        (dout.ptr, dout.len, dout.dtype, Io::In),
                        (q.ptr, q.len, q.dtype, Io::In),
                        (k.ptr, k.len, k.dtype, Io::In),
                        (v.ptr, v.len, v.dtype, Io::In),
                        (out.ptr, out.len, out.dtype, Io::In),
                        (lse.ptr, lse.len, lse.dtype, Io::In),
                    ],
                    |p| run("f32", p),
                )
            }
        })();
        self.record(r);
    }

    /// `out[n, vc] =` x[n,c] · w_chunk[vc,c]ᵀ: one vocabulary chunk of the logits (the first step of
    /// both passes of the fused lm_head + cross-entropy).
    fn chunk_logits(
        &self,
        out: DViewMut<'_>,
        x: DView<'_>,
        w_chunk: DView<'_>,
        n: usize,
        vc: usize,
        c: usize,
    ) -> Result<()> {
        self.matmul_impl(out, x, w_chunk, n, vc, c, false, true, 1.0, 0.0)
    }

    /// Fused lm_head + cross-entropy, never holding the `[n, v]` logits: for each vocabulary chunk
    /// of `chunk_len = chunk.len / n` rows of `w[v, c]`, cuBLAS writes `x·w_chunkᵀ` into `chunk` and a
    /// kernel folds it into per-row running (max, Σexp) and the target's logit.
    /// `losses[n] =` (0 where the target is −100), `lse[n] =` (saved for the backward).
    #[allow(clippy::too_many_arguments)]
    pub fn lm_head_cross_entropy_forward(
        &self,
        losses: DViewMut<'_>,
        lse: DViewMut<'_>,
        mut chunk: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        targets: &CudaIds,
        n: usize,
        c: usize,
        v: usize,
    ) {
        let r = (|| {
            ensure!(
                losses.dtype == DType::F32 && lse.dtype == DType::F32,
                "lm_head CE: losses and lse must be fp32 buffers"
            );
            Self::check_view("lm_head CE losses", losses.len, n)?;
            Self::check_view("lm_head CE lse", lse.len, n)?;
            Self::check_view("lm_head CE x", x.len, n * c)?;
            Self::check_view("lm_head CE w", w.len, v * c)?;
            Self::check_view("lm_head CE targets", targets.len, n)?;
            ensure!(
                n > 0 && chunk.len >= n,
                "lm_head CE: chunk buffer smaller than one column of logits"
            );
            let vc_max = (chunk.len / n).min(v);
            let stats = self.scratch("ce_stats", n * 8)?;
            let tlogit = self.scratch("ce_tlogit", n * 4)?;
            let sfx = suffix(chunk.dtype);
            let mut v0 = 0;
            while v0 < v {
                let vc = vc_max.min(v - v0);
                let wv = w.sub(v0 * c, vc * c);
                self.chunk_logits(chunk.sub_mut(0, n * vc), x, wv, n, vc, c)?;
                self.launch(
                    &format!("lmhead_ce_chunk_forward_v1_{sfx}"),
                    (n as u32, 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(stats),
                        KArg::P(tlogit),
                        KArg::P(chunk.ptr),
                        KArg::P(targets.ptr),
                        KArg::I(n as i32),
                        KArg::I(vc as i32),
                        KArg::I(v0 as i32),
                        KArg::I((v0 == 0) as i32),
                    ],
                )?;
                v0 += vc;
            }
            self.launch(
                "lmhead_ce_finish_v1_f32",
                (n.div_ceil(256) as u32, 1, 1),
                256,
                0,
                &[
                    KArg::P(losses.ptr),
                    KArg::P(lse.ptr),
                    KArg::P(stats),
                    KArg::P(tlogit),
                    KArg::P(targets.ptr),
                    KArg::I(n as i32),
                ],
            )
        })();
        self.record(r);
    }

    /// Backward of [`Self::lm_head_cross_entropy_forward`] with loss weight `scale` per token
    /// (`1/count` for HF's mean): per chunk, recompute the logits, turn them into dlogits in place,
    /// then `dx[n,c] +=` dlogits·w_chunk and `dw[v,c] +=` dlogitsᵀ·x (cuBLAS, beta = 1). A 16-bit
    /// `dx` is summed in fp32 and rounded once (the same code as the `Backend` trait's op, which
    /// writes `dx =`).
    #[allow(clippy::too_many_arguments)]
    pub fn lm_head_cross_entropy_backward(
        &self,
        dx: DViewMut<'_>,
        dw: DViewMut<'_>,
        chunk: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        lse: DView<'_>,
        targets: &CudaIds,
        n: usize,
        c: usize,
        v: usize,
        scale: f32,
    ) {
        let r = self.lm_head_ce_backward_fp32_dx(
            dx,
            true,
            Some(dw),
            chunk,
            x,
            w,
            lse,
            targets,
            n,
            c,
            v,
            scale,
        );
        self.record(r);
    }

    /// The fused lm_head + CE backward with `dx` summed in fp32: the chunks add their
    /// `dlogits·w_chunk` into dx (cuBLAS, beta = 1, ~V/8192 times); a 16-bit dx would be rounded
    /// after every chunk, so the sum is kept in fp32 scratch (bf16 inputs with an fp32 output are
    /// native to cuBLAS), starting from dx (`accumulate`: `dx +=`) or zero (`dx =`), and rounded
    /// once at the end, as the composite default rounds once.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_ce_backward_fp32_dx(
        &self,
        dx: DViewMut<'_>,
        accumulate: bool,
        dw: Option<DViewMut<'_>>,
        chunk: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        lse: DView<'_>,
        targets: &CudaIds,
        n: usize,
        c: usize,
        v: usize,
        scale: f32,
    ) -> Result<()> {
        let len = dx.len;
        let acc = if dx.dtype == DType::F32 {
            dx.ptr
        } else {
            self.scratch("lm_head_ce_dx", len * 4)?
        };
        let acc_view = || DViewMut {
            ptr: acc,
            len,
            dtype: DType::F32,
            _p: PhantomData,
        };
        if !accumulate {
            self.zero(acc_view());
        } else if acc != dx.ptr {
            self.cast(acc, DType::F32, dx.ptr, dx.dtype, len)?;
        }
        self.lm_head_ce_backward(acc_view(), dw, chunk, x, w, lse, targets, n, c, v, scale);
        self.take_error()?;
        if acc != dx.ptr {
            self.cast(dx.ptr, dx.dtype, acc, DType::F32, len)?;
        }
        Ok(())
    }

    /// [`Self::lm_head_cross_entropy_backward`] with `dw` optional (`None`: a frozen lm_head, the
    /// per-chunk dW GEMM skipped).
    #[allow(clippy::too_many_arguments)]
    fn lm_head_ce_backward(
        &self,
        mut dx: DViewMut<'_>,
        mut dw: Option<DViewMut<'_>>,
        mut chunk: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        lse: DView<'_>,
        targets: &CudaIds,
        n: usize,
        c: usize,
        v: usize,
        scale: f32,
    ) {
        let r = (|| {
            ensure!(lse.dtype == DType::F32, "lm_head CE: lse must be fp32");
            Self::check_view("lm_head CE dx", dx.len, n * c)?;
            if let Some(dw) = &dw {
                Self::check_view("lm_head CE dw", dw.len, v * c)?;
            }
            Self::check_view("lm_head CE x", x.len, n * c)?;
            Self::check_view("lm_head CE w", w.len, v * c)?;
            Self::check_view("lm_head CE lse", lse.len, n)?;
            ensure!(
                n > 0 && chunk.len >= n,
                "lm_head CE: chunk buffer smaller than one column of logits"
            );
            let vc_max = (chunk.len / n).min(v);
            let sfx = suffix(chunk.dtype);
            let mut v0 = 0;
            while v0 < v {
                let vc = vc_max.min(v - v0);
                let wv = w.sub(v0 * c, vc * c);
                self.chunk_logits(chunk.sub_mut(0, n * vc), x, wv, n, vc, c)?;
                self.launch(
                    &format!("lmhead_ce_chunk_backward_v1_{sfx}"),
                    (n as u32, 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(chunk.ptr),
                        KArg::P(lse.ptr),
                        KArg::P(targets.ptr),
                        KArg::I(n as i32),
                        KArg::I(vc as i32),
                        KArg::I(v0 as i32),
                        KArg::F(scale),
                    ],
                )?;
                let g = chunk.ro().sub(0, n * vc);
                // dx[n,c] += g[n,vc] · w_chunk[vc,c]
                self.matmul_impl(dx.reborrow(), g, wv, n, c, vc, false, false, 1.0, 1.0)?;
                // dw_chunk[vc,c] += gᵀ[vc,n] · x[n,c]
                if let Some(dw) = dw.as_mut() {
                    let dwv = dw.sub_mut(v0 * c, vc * c);
                    self.matmul_impl(dwv, g, x, vc, c, n, true, false, 1.0, 1.0)?;
                }
                v0 += vc;
            }
            Ok(())
        })();
        self.record(r);
    }

    /// LoRA low-rank path added to a base projection's output: `out[n,o] += s·(dropout(x)·aᵀ)·bᵀ`,
    /// `u[n,r] =` (saved for the backward). `a[r,in]`, `b[o,r]` (PEFT layouts); dropout drops with
    /// probability `p` by the mask `kernels::dropout_keep(seed, row·in + col)`, kept values ×1/(1−p).
    /// The down-projection reads x once with the mask fused; the up-projection is one cuBLAS call
    /// with beta = 1 (the add folded into its epilogue).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_forward(
        &self,
        out: DViewMut<'_>,
        u: DViewMut<'_>,
        x: DView<'_>,
        a: DView<'_>,
        bw: DView<'_>,
        n: usize,
        inf: usize,
        outf: usize,
        r: usize,
        s: f32,
        p: f32,
        seed: u64,
    ) {
        let res = (|| {
            ensure!(
                matches!(r, 8 | 16 | 64),
                "lora: rank {r} has no kernel (8, 16 or 64)"
            );
            ensure!((0.0..1.0).contains(&p), "lora: dropout {p} not in [0, 1)");
            Self::check_view("lora out", out.len, n * outf)?;
            Self::check_view("lora u", u.len, n * r)?;
            Self::check_view("lora x", x.len, n * inf)?;
            Self::check_view("lora a", a.len, r * inf)?;
            Self::check_view("lora b", bw.len, outf * r)?;
            let thr = kernels::dropout_threshold(p);
            let inv_keep = 1.0 / (1.0 - p);
            let run = |sfx: &str, ptr: &[u64]| {
                self.launch(
                    &format!("lora_down_forward_v1_r{r}_{sfx}"),
                    (n.div_ceil(8) as u32, 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(ptr[0]),
                        KArg::P(ptr[1]),
                        KArg::P(ptr[2]),
                        KArg::I(n as i32),
                        KArg::I(inf as i32),
                        KArg::Q(seed),
                        KArg::U(thr),
                        KArg::F(inv_keep),
                    ],
                )
            };
            if uni16(&[u.dtype, x.dtype, a.dtype]) {
                run(suffix(u.dtype), &[u.ptr, x.ptr, a.ptr])?;
            } else {
                self.with_f32(
                    &[
                        (u.ptr, u.len, u.dtype, Io::Out),
                        (x.ptr, x.len, x.dtype, Io::In),
                        (a.ptr, a.len, a.dtype, Io::In),
                    ],
                    |ptr| run("f32", ptr),
                )?;
            }
            self.matmul_impl(out, u.ro(), bw, n, outf, r, false, true, s, 1.0)
        })();
        self.record(res);
    }

    /// Backward of [`Self::lora_forward`]: `du[n,r] =` (scratch the caller provides), `dx[n,in] +=`,
    /// `da[r,in] +=`, `db[o,r] +=`. dA uses a deterministic two-stage reduction over rows.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward(
        &self,
        dx: DViewMut<'_>,
        da: DViewMut<'_>,
        db: DViewMut<'_>,
        mut du: DViewMut<'_>,
        dout: DView<'_>,
        x: DView<'_>,
        u: DView<'_>,
        a: DView<'_>,
        bw: DView<'_>,
        n: usize,
        inf: usize,
        outf: usize,
        r: usize,
        s: f32,
        p: f32,
        seed: u64,
    ) {
        let res = (|| {
            ensure!(
                matches!(r, 8 | 16 | 64),
                "lora: rank {r} has no kernel (8, 16 or 64)"
            );
            Self::check_view("lora dx", dx.len, n * inf)?;
            Self::check_view("lora da", da.len, r * inf)?;
            Self::check_view("lora db", db.len, outf * r)?;
            Self::check_view("lora du", du.len, n * r)?;
            Self::check_view("lora dout", dout.len, n * outf)?;
            // db[o,r] += s·doutᵀ[o,n]·u[n,r];  du[n,r] = s·dout[n,o]·b[o,r]
            self.matmul_impl(db, dout, u, outf, r, n, true, false, s, 1.0)?;
            self.matmul_impl(du.reborrow(), dout, bw, n, r, outf, false, false, s, 0.0)?;
            let thr = kernels::dropout_threshold(p);
            let inv_keep = 1.0 / (1.0 - p);
            let nsplit = n.clamp(1, 64);
            let partial = self.scratch("lora_partial", nsplit * r * inf * 4)?;
            let run = |sfx: &str, ptr: &[u64]| -> Result<()> {
                // ptr: dx da du x a
                self.launch(
                    &format!("lora_grad_a_partial_v1_r{r}_{sfx}"),
                    (inf.div_ceil(256) as u32, nsplit as u32, 1),
                    256,
                    0,
                    &[
                        KArg::P(partial),
                        KArg::P(ptr[2]),
                        KArg::P(ptr[3]),
                        KArg::I(n as i32),
                        KArg::I(inf as i32),
                        KArg::Q(seed),
                        KArg::U(thr),
                        KArg::F(inv_keep),
                    ],
                )?;
                self.launch(
                    "lora_grad_a_reduce_v1_f32",
                    (blocks(r * inf, 256), 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(ptr[1]),
                        KArg::P(partial),
                        KArg::I(nsplit as i32),
                        KArg::L((r * inf) as i64),
                    ],
                )?;
                self.launch(
                    &format!("lora_dx_v1_r{r}_{sfx}"),
                    (blocks(n * inf, 256).min(8 * self.sm_count.max(1) * 4), 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(ptr[0]),
                        KArg::P(ptr[2]),
                        KArg::P(ptr[4]),
                        KArg::I(n as i32),
                        KArg::I(inf as i32),
                        KArg::Q(seed),
                        KArg::U(thr),
                        KArg::F(inv_keep),
                    ],
                )
            };
            if uni16(&[dx.dtype, du.dtype, x.dtype, a.dtype]) && da.dtype == DType::F32 {
                run(suffix(dx.dtype), &[dx.ptr, da.ptr, du.ptr, x.ptr, a.ptr])
            } else {
                self.with_f32(
                    &[
                        (dx.ptr, dx.len, dx.dtype, Io::InOut),
                        (da.ptr, da.len, da.dtype, Io::InOut),
                        (du.ptr, du.len, du.dtype, Io::In),
                        (x.ptr, x.len, x.dtype, Io::In),
                        (a.ptr, a.len, a.dtype, Io::In),
                    ],
                    |ptr| run("f32", ptr),
                )
            }
        })();
        self.record(res);
    }

    /// AdamW ([`Backend::adamw_step`]) that also writes `param_bf16 =` the updated parameters in the
    /// copy's 16-bit type, bf16 or f16 (the fp32 master shard → the weights the forward reads, in the
    /// same pass).
    pub fn adamw_step_with_copy(
        &self,
        param: DViewMut<'_>,
        m: DViewMut<'_>,
        v: DViewMut<'_>,
        grad: DView<'_>,
        param_bf16: Option<DViewMut<'_>>,
        hp: AdamW,
    ) {
        let r = (|| {
            let len = param.len;
            Self::check_view("adamw m", m.len, len)?;
            Self::check_view("adamw v", v.len, len)?;
            Self::check_view("adamw grad", grad.len, len)?;
            let copy = match &param_bf16 {
                Some(c) => {
                    Self::check_view("adamw param_bf16", c.len, len)?;
                    ensure!(
                        matches!(c.dtype, DType::BF16 | DType::F16),
                        "adamw: the copy target must be a bf16 or f16 buffer"
                    );
                    c.ptr
                }
                None => 0,
            };
            // The `_cf16` instances write an f16 copy (and take f16 params/grads); the others bf16.
            let cf16 = match &param_bf16 {
                Some(c) => c.dtype == DType::F16,
                None => param.dtype == DType::F16 || grad.dtype == DType::F16,
            };
            let (fam, cs) = if cf16 {
                (DType::F16, "_cf16")
            } else {
                (DType::BF16, "")
            };
            if len == 0 {
                return Ok(());
            }
            let k = kernels::adamw_coefficients(hp);
            let run = |name: String, pp: u64, mp: u64, vp: u64, gp: u64| {
                self.launch(
                    &name,
                    (blocks(len, 256).min(self.sm_count.max(1) * 16), 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(pp),
                        KArg::P(mp),
                        KArg::P(vp),
                        KArg::P(gp),
                        KArg::P(copy),
                        KArg::L(len as i64),
                        KArg::F(k[0]),
                        KArg::F(k[1]),
                        KArg::F(k[2]),
                        KArg::F(k[3]),
                        KArg::F(k[4]),
                        KArg::F(k[5]),
                        KArg::F(k[6]),
                    ],
                )
            };
            if m.dtype == DType::F32
                && v.dtype == DType::F32
                && [param.dtype, grad.dtype]
                    .iter()
                    .all(|&d| d == DType::F32 || d == fam)
            {
                run(
                    format!(
                        "adamw_step_v1_{}_{}{cs}",
                        suffix(param.dtype),
                        suffix(grad.dtype)
                    ),
                    param.ptr,
                    m.ptr,
                    v.ptr,
                    grad.ptr,
                )
            } else {
                self.with_f32(
                    &[
                        (param.ptr, len, param.dtype, Io::InOut),
                        (m.ptr, len, m.dtype, Io::InOut),
                        (v.ptr, len, v.dtype, Io::InOut),
                        (grad.ptr, len, grad.dtype, Io::In),
                    ],
                    |p| run(format!("adamw_step_v1_f32_f32{cs}"), p[0], p[1], p[2], p[3]),
                )
            }
        })();
        self.record(r);
    }

    // ---- GEMM -----------------------------------------------------------------------------------------
    #[allow(clippy::too_many_arguments)]
    fn matmul_impl(
        &self,
        out: DViewMut<'_>,
        a: DView<'_>,
        b: DView<'_>,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        Self::check_view("matmul out", out.len, m * n)?;
        Self::check_view("matmul a", a.len, m * k)?;
        Self::check_view("matmul b", b.len, k * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        // cuBLAS takes 16-bit inputs of one type with an output of that type or fp32.
        let ok = (uni16(&[a.dtype, b.dtype]) && (out.dtype == a.dtype || out.dtype == DType::F32))
            || (a.dtype == DType::F32 && b.dtype == DType::F32 && out.dtype == DType::F32);
        if !ok {
            let out_io = if beta == 0.0 { Io::Out } else { Io::InOut };
            return self.with_f32(
                &[
                    (out.ptr, out.len, out.dtype, out_io),
                    (a.ptr, a.len, a.dtype, Io::In),
                    (b.ptr, b.len, b.dtype, Io::In),
                ],
                |p| {
                    self.gemm(
                        p[0],
                        DType::F32,
                        p[1],
                        p[2],
                        DType::F32,
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                        alpha,
                        beta,
                    )
                },
            );
        }
        self.gemm(
            out.ptr, out.dtype, a.ptr, b.ptr, a.dtype, m, n, k, trans_a, trans_b, alpha, beta,
        )
    }

    /// Row-major `out[m,n] = alpha·op(a)·op(b) + beta·out` as the column-major
    /// `outᵀ[n,m] = op(b)ᵀ·op(a)ᵀ`: cuBLAS's A is our b, its B our a.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        out: u64,
        od: DType,
        a: u64,
        b: u64,
        ab: DType,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let cty = |d: DType| match d {
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            _ => blas_sys::cudaDataType::CUDA_R_32F,
        };
        let (opb, ldb_) = if trans_b {
            (CUBLAS_OP_T, k)
        } else {
            (CUBLAS_OP_N, n)
        };
        let (opa, lda_) = if trans_a {
            (CUBLAS_OP_T, m)
        } else {
            (CUBLAS_OP_N, k)
        };
        let name = format!("cublas_gemm_{}_{}", suffix(ab), suffix(od));
        self.bind()?;
        let _range = nvtx::Range::new(self.nvtx_ops, &name);
        let start = self.prof_start();
        // SAFETY: pointers are live device buffers of the checked sizes; alpha/beta are host f32
        // (compute type 32F, host pointer mode).
        unsafe {
            blas_result::gemm_ex(
                self.blas,
                opb,
                opa,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                b as *const _,
                cty(ab),
                ldb_.max(1) as i32,
                a as *const _,
                cty(ab),
                lda_.max(1) as i32,
                (&beta) as *const f32 as *const _,
                out as *mut _,
                cty(od),
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(|e| anyhow!("cublasGemmEx m={m} n={n} k={k}: {e:?}"))?;
        self.prof_end(&name, start);
        Ok(())
    }

    fn elementwise_threads(len: usize) -> (u32, u32) {
        (blocks(len, 256).min(8192), 256)
    }
}

/// Make the device's default memory pool (which cudarc's stream-ordered allocations come from)
/// keep freed memory instead of returning it to the driver at every synchronization: its release
/// threshold defaults to 0, which turns each step's frees and re-allocations into driver calls.
/// Setting it to `u64::MAX` is what PyTorch-style caching allocators amount to; memory is still
/// released when the context is destroyed.
pub fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    let mut v = u64::MAX;
    // SAFETY: valid out-pointer and device; the attribute takes a u64 (cuuint64_t).
    unsafe {
        let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
        drv_sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| anyhow!("cuDeviceGetDefaultMemPool: {e:?}"))?;
        drv_sys::cuMemPoolSetAttribute(
            pool,
            drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut v as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(|e| anyhow!("setting the memory pool's release threshold: {e:?}"))?;
    }
    Ok(())
}

impl CudaBackend {
    /// The release threshold of this device's default memory pool (`u64::MAX` once the backend
    /// has started: freed memory stays in the pool; see [`keep_pool_memory`]).
    pub fn mem_pool_release_threshold(&self) -> Result<u64> {
        let mut v = 0u64;
        // SAFETY: valid out-pointer and device; the attribute is a u64.
        unsafe {
            let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
            drv_sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device())
                .result()
                .map_err(|e| anyhow!("cuDeviceGetDefaultMemPool: {e:?}"))?;
            drv_sys::cuMemPoolGetAttribute(
                pool,
                drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            )
            .result()
            .map_err(|e| anyhow!("reading the memory pool's release threshold: {e:?}"))?;
        }
        Ok(v)
    }
}

/// (kernel file, cubin, kernel names).
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

impl CudaBackend {
    /// `Σ x` (`what` = "sum") or `Σ x²` ("sum_squares") in f64: per-block partials, then one
    /// block sums them in a fixed order (deterministic for a given grid); one f64 comes back.
    fn reduce_f64(&self, x: DView<'_>, what: &str) -> Result<f64> {
        self.take_error()?;
        if x.len == 0 {
            return Ok(0.0);
        }
        let nparts = blocks(x.len, 256).min(self.sm_count.max(1) * 8) as usize;
        let partial = self.scratch("ss_partial", nparts * 8)?;
        let out = self.scratch("ss_out", 8)?;
        self.launch(
            &format!("{what}_partial_v1_{}", suffix(x.dtype)),
            (nparts as u32, 1, 1),
            256,
            0,
            &[KArg::P(partial), KArg::P(x.ptr), KArg::L(x.len as i64)],
        )?;
        self.launch(
            "sum_squares_finish_v1_f64",
            (1, 1, 1),
            32,
            0,
            &[KArg::P(out), KArg::P(partial), KArg::I(nparts as i32)],
        )?;
        let mut h = [0f64; 1];
        self.count_transfer(8);
        self.bind()?;
        // SAFETY: `out` holds one f64; the copy is stream-ordered after the kernels, then synced.
        unsafe { drv::memcpy_dtoh_async(&mut h, out, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("{what}: {e:?}"))?;
        self.synchronize()?;
        Ok(h[0])
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type View<'a> = DView<'a>;
    type ViewMut<'a> = DViewMut<'a>;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}, {}, {} storage)",
            self.ctx.ordinal(),
            self.device_name,
            self.arch,
            suffix(self.half)
        )
    }

    fn alloc(&self, len: usize, role: Role) -> Result<CudaBuf> {
        let dtype = dt(role, self.half);
        let bytes = (len * dtype.size()).max(16);
        let mem = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| anyhow!("cudaMalloc of {len} {dtype:?} elements ({bytes} B): {e:?}"))?;
        let ptr = mem.device_ptr(&self.stream).0;
        Ok(CudaBuf {
            mem,
            ptr,
            len,
            dtype,
        })
    }
    fn alloc_ids(&self, len: usize) -> Result<CudaIds> {
        let z = |l: usize| {
            self.stream
                .alloc_zeros::<i32>(l.max(1))
                .map_err(|e| anyhow!("cudaMalloc of {l} ids: {e:?}"))
        };
        let ids = z(len)?;
        let ptr = ids.device_ptr(&self.stream).0;
        Ok(CudaIds {
            ids,
            ptr,
            len,
            uniq: z(len)?,
            offsets: z(len + 1)?,
            positions: z(len)?,
            n_uniq: 0,
        })
    }
    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }
    fn buf_bytes(&self, buf: &CudaBuf) -> usize {
        buf.mem.len()
    }
    fn upload(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        ensure!(
            dst.len == src.len(),
            "upload: buffer holds {} floats, source has {}",
            dst.len,
            src.len()
        );
        self.take_error()?;
        let r = match dst.dtype {
            DType::BF16 | DType::F16 => {
                let h: Vec<u16> = if dst.dtype == DType::BF16 {
                    src.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
                } else {
                    src.iter().map(|&x| f16::from_f32(x).to_bits()).collect()
                };
                // SAFETY: the buffer holds len bf16/f16 (2·len bytes), copied as their u16 bits.
                let mut v = unsafe { dst.mem.transmute_mut::<u16>(dst.len) }
                    .context("upload: buffer too small")?;
                self.stream.memcpy_htod(&h, &mut v)
            }
            _ => {
                // SAFETY: the buffer holds len f32 (4·len bytes).
                let mut v = unsafe { dst.mem.transmute_mut::<f32>(dst.len) }
                    .context("upload: buffer too small")?;
                self.stream.memcpy_htod(src, &mut v)
            }
        };
        r.map_err(|e| anyhow!("upload: {e:?}"))?;
        self.count_transfer(4 * src.len());
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("upload: {e:?}"))
    }
    fn download(&self, src: &CudaBuf, dst: &mut [f32]) -> Result<()> {
        ensure!(
            dst.len() == src.len,
            "download: buffer holds {} floats, destination has {}",
            src.len,
            dst.len()
        );
        self.take_error()?;
        self.count_transfer(4 * dst.len());
        match src.dtype {
            DType::BF16 | DType::F16 => {
                let mut h = vec![0u16; src.len];
                // SAFETY: the buffer holds len bf16/f16, copied as their u16 bits.
                let v = unsafe { src.mem.transmute::<u16>(src.len) }
                    .context("download: buffer too small")?;
                self.stream
                    .memcpy_dtoh(&v, &mut h)
                    .map_err(|e| anyhow!("download: {e:?}"))?;
                self.stream
                    .synchronize()
                    .map_err(|e| anyhow!("download: {e:?}"))?;
                if src.dtype == DType::BF16 {
                    for (d, s) in dst.iter_mut().zip(&h) {
                        *d = bf16::from_bits(*s).to_f32();
                    }
                } else {
                    for (d, s) in dst.iter_mut().zip(&h) {
                        *d = f16::from_bits(*s).to_f32();
                    }
                }
            }
            _ => {
                // SAFETY: the buffer holds len f32.
                let v = unsafe { src.mem.transmute::<f32>(src.len) }
                    .context("download: buffer too small")?;
                self.stream
                    .memcpy_dtoh(&v, dst)
                    .map_err(|e| anyhow!("download: {e:?}"))?;
                self.stream
                    .synchronize()
                    .map_err(|e| anyhow!("download: {e:?}"))?;
            }
        }
        Ok(())
    }
    fn upload_ids(&self, dst: &mut CudaIds, src: &[i32]) -> Result<()> {
        ensure!(
            dst.len == src.len(),
            "upload_ids: buffer holds {} ids, source has {}",
            dst.len,
            src.len()
        );
        self.take_error()?;
        self.count_transfer(4 * src.len());
        let (uniq, offsets, positions) = kernels::group_positions(src);
        let e = |e| anyhow!("upload_ids: {e:?}");
        self.stream
            .memcpy_htod(src, &mut dst.ids.slice_mut(0..src.len()))
            .map_err(e)?;
        self.stream
            .memcpy_htod(&uniq, &mut dst.uniq.slice_mut(0..uniq.len()))
            .map_err(e)?;
        self.stream
            .memcpy_htod(&offsets, &mut dst.offsets.slice_mut(0..offsets.len()))
            .map_err(e)?;
        self.stream
            .memcpy_htod(&positions, &mut dst.positions.slice_mut(0..positions.len()))
            .map_err(e)?;
        dst.n_uniq = uniq.len();
        self.stream.synchronize().map_err(e)
    }
    fn view<'a>(&self, buf: &'a CudaBuf, range: Range<usize>) -> DView<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view {range:?} out of a buffer of {}",
            buf.len
        );
        DView {
            ptr: buf.ptr + (range.start * buf.dtype.size()) as u64,
            len: range.len(),
            dtype: buf.dtype,
            _p: PhantomData,
        }
    }
    fn view_mut<'a>(&self, buf: &'a mut CudaBuf, range: Range<usize>) -> DViewMut<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view {range:?} out of a buffer of {}",
            buf.len
        );
        DViewMut {
            ptr: buf.ptr + (range.start * buf.dtype.size()) as u64,
            len: range.len(),
            dtype: buf.dtype,
            _p: PhantomData,
        }
    }
    fn range_push(&self, name: &str) {
        nvtx::range_push(name);
    }
    fn range_pop(&self) {
        nvtx::range_pop();
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("CUDA stream: {e:?}"))?;
        self.take_error()
    }

    fn zero(&self, out: DViewMut<'_>) {
        // SAFETY: the view is a live range of `len·size` bytes.
        let r = self.bind().and_then(|_| {
            unsafe {
                drv::memset_d8_async(
                    out.ptr,
                    0,
                    out.len * out.dtype.size(),
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| anyhow!("zero: {e:?}"))
        });
        self.record(r);
    }
    fn copy(&self, out: DViewMut<'_>, x: DView<'_>) {
        let r = (|| {
            Self::check_view("copy", x.len, out.len)?;
            if out.dtype == x.dtype {
                self.bind()?;
                // SAFETY: both live ranges of the same byte length.
                unsafe {
                    drv::memcpy_dtod_async(
                        out.ptr,
                        x.ptr,
                        out.len * out.dtype.size(),
                        self.stream.cu_stream(),
                    )
                }
                .map_err(|e| anyhow!("copy: {e:?}"))
            } else {
                self.cast(out.ptr, out.dtype, x.ptr, x.dtype, out.len)
            }
        })();
        self.record(r);
    }
    fn axpy(&self, out: DViewMut<'_>, alpha: f32, x: DView<'_>) {
        let r = (|| {
            Self::check_view("axpy", x.len, out.len)?;
            if out.len == 0 {
                return Ok(());
            }
            let (g, t) = Self::elementwise_threads(out.len);
            self.launch(
                &format!("axpy_v1_{}_{}", suffix(out.dtype), suffix(x.dtype)),
                (g, 1, 1),
                t,
                0,
                &[
                    KArg::P(out.ptr),
                    KArg::P(x.ptr),
                    KArg::F(alpha),
                    KArg::L(out.len as i64),
                ],
            )
        })();
        self.record(r);
    }
    fn scale(&self, out: DViewMut<'_>, alpha: f32) {
        let r = (|| {
            if out.len == 0 {
                return Ok(());
            }
            let (g, t) = Self::elementwise_threads(out.len);
            self.launch(
                &format!("scale_v1_{}", suffix(out.dtype)),
                (g, 1, 1),
                t,
                0,
                &[KArg::P(out.ptr), KArg::F(alpha), KArg::L(out.len as i64)],
            )
        })();
        self.record(r);
    }
    fn fill_uniform(&self, out: DViewMut<'_>, seed: u64, lo: f32, hi: f32) {
        let r = (|| {
            if out.len == 0 {
                return Ok(());
            }
            let (g, t) = Self::elementwise_threads(out.len);
            let key = crate::ops::fill::uniform_key(seed);
            self.launch(
                &format!("fill_uniform_v1_{}", suffix(out.dtype)),
                (g, 1, 1),
                t,
                0,
                &[
                    KArg::P(out.ptr),
                    KArg::Q(key),
                    KArg::F(lo),
                    KArg::F(hi),
                    KArg::L(out.len as i64),
                ],
            )
        })();
        self.record(r);
    }
    fn sum_squares(&self, x: DView<'_>) -> Result<f64> {
        self.reduce_f64(x, "sum_squares")
    }
    fn sum(&self, x: DView<'_>) -> Result<f64> {
        self.reduce_f64(x, "sum")
    }
    fn dropout(&self, out: DViewMut<'_>, p: f32, key: u64) {
        let r = (|| {
            ensure!((0.0..1.0).contains(&p), "dropout: p = {p} not in [0, 1)");
            if out.len == 0 || p == 0.0 {
                return Ok(());
            }
            // The same fp32 scale the CPU reference multiplies by.
            let keep_scale = 1.0f32 / (1.0 - p);
            let (g, t) = Self::elementwise_threads(out.len);
            self.launch(
                &format!("dropout_v1_{}", suffix(out.dtype)),
                (g, 1, 1),
                t,
                0,
                &[
                    KArg::P(out.ptr),
                    KArg::L(out.len as i64),
                    KArg::Q(key),
                    KArg::F(p),
                    KArg::F(keep_scale),
                ],
            )
        })();
        self.record(r);
    }

    fn matmul(
        &self,
        out: DViewMut<'_>,
        a: DView<'_>,
        b: DView<'_>,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) {
        let r = self.matmul_impl(out, a, b, m, n, k, trans_a, trans_b, alpha, beta);
        self.record(r);
    }

    fn rmsnorm_forward(
        &self,
        out: DViewMut<'_>,
        rstd: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        n: usize,
        c: usize,
        eps: f32,
    ) {
        let r = (|| {
            ensure!(
                c.is_multiple_of(4) && c <= 8192,
                "rmsnorm: c = {c} must be a multiple of 4 and ≤ 8192"
            );
            Self::check_view("rmsnorm out", out.len, n * c)?;
            Self::check_view("rmsnorm rstd", rstd.len, n)?;
            Self::check_view("rmsnorm x", x.len, n * c)?;
            Self::check_view("rmsnorm w", w.len, c)?;
            if n == 0 {
                return Ok(());
            }
            let args = |p: &[u64]| {
                [
                    KArg::P(p[0]),
                    KArg::P(p[1]),
                    KArg::P(p[2]),
                    KArg::P(p[3]),
                    KArg::I(n as i32),
                    KArg::I(c as i32),
                    KArg::F(eps),
                ]
            };
            if uni16(&[out.dtype, x.dtype, w.dtype])
                && rstd.dtype == DType::F32
                && aligned(&[out.ptr, x.ptr, w.ptr])
            {
                self.launch(
                    &format!("rmsnorm_forward_v1_{}", suffix(out.dtype)),
                    (n as u32, 1, 1),
                    256,
                    0,
                    &args(&[out.ptr, rstd.ptr, x.ptr, w.ptr]),
                )
            } else {
                self.with_f32(
                    &[
                        (out.ptr, out.len, out.dtype, Io::Out),
                        (rstd.ptr, rstd.len, rstd.dtype, Io::Out),
                        (x.ptr, x.len, x.dtype, Io::In),
                        (w.ptr, w.len, w.dtype, Io::In),
                    ],
                    |p| self.launch("rmsnorm_forward_v1_f32", (n as u32, 1, 1), 256, 0, &args(p)),
                )
            }
        })();
        self.record(r);
    }
    fn rmsnorm_backward(
        &self,
        dx: DViewMut<'_>,
        dw: DViewMut<'_>,
        dout: DView<'_>,
        x: DView<'_>,
        w: DView<'_>,
        rstd: DView<'_>,
        n: usize,
        c: usize,
    ) {
        let r = (|| {
            ensure!(
                c.is_multiple_of(4) && c <= 8192,
                "rmsnorm: c = {c} must be a multiple of 4 and ≤ 8192"
            );
            Self::check_view("rmsnorm dx", dx.len, n * c)?;
            Self::check_view("rmsnorm dw", dw.len, c)?;
            Self::check_view("rmsnorm dout", dout.len, n * c)?;
            Self::check_view("rmsnorm x", x.len, n * c)?;
            Self::check_view("rmsnorm w", w.len, c)?;
            Self::check_view("rmsnorm rstd", rstd.len, n)?;
            if n == 0 {
                return Ok(());
            }
            let nblocks = n.min(2 * self.sm_count.max(1) as usize);
            let partial = self.scratch("rms_partial", nblocks * c * 4)?;
            let run = |sfx: &str, p: &[u64]| -> Result<()> {
                // p: dx dw dout x w rstd
                self.launch(
                    &format!("rmsnorm_backward_v1_{sfx}"),
                    (nblocks as u32, 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(p[0]),
                        KArg::P(partial),
                        KArg::P(p[2]),
                        KArg::P(p[3]),
                        KArg::P(p[4]),
                        KArg::P(p[5]),
                        KArg::I(n as i32),
                        KArg::I(c as i32),
                    ],
                )?;
                self.launch(
                    "rmsnorm_dw_reduce_v1_f32",
                    (c.div_ceil(256) as u32, 1, 1),
                    256,
                    0,
                    &[
                        KArg::P(p[1]),
                        KArg::P(partial),
                        KArg::I(nblocks as i32),
                        KArg::I(c as i32),
                    ],
                )
            };
            if uni16(&[dx.dtype, dout.dtype, x.dtype, w.dtype])
                && dw.dtype == DType::F32
                && rstd.dtype == DType::F32
                && aligned(&[dx.ptr, dout.ptr, x.ptr, w.ptr])
            {
                run(
                    suffix(dx.dtype),
                    &[dx.ptr, dw.ptr, dout.ptr, x.ptr, w.ptr, rstd.ptr],
                )
            } else {
                self.with_f32(
                    &[
                        (dx.ptr, dx.len, dx.dtype, Io::InOut),
                        (dw.ptr, dw.len, dw.dtype, Io::InOut),
                        (dout.ptr, dout.len, dout.dtype, Io::In),
                        (x.ptr, x.len, x.dtype, Io::In),
                        (w.ptr, w.len, w.dtype, Io::In),
                        (rstd.ptr, rstd.len, rstd.dtype, Io::In),
                    ],
                    |p| run("f32", p),
                )
            }
        })();
        self.record(r);
    }

    fn rope_forward(
        &self,
        x: DViewMut<'_>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        theta: f32,
        pos_offset: usize,
    ) {
        self.rope(x, b, t, h, d, theta, pos_offset, "forward");
    }
    fn rope_backward(
        &self,
        dx: DViewMut<'_>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        theta: f32,
        pos_offset: usize,
    ) {
        self.rope(dx, b, t, h, d, theta, pos_offset, "backward");
    }

    fn attention_forward(
        &self,
        out: DViewMut<'_>,
        lse: DViewMut<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        b: usize,
        t: usize,
        h: usize,
        hkv: usize,
        d: usize,
    ) {
        self.attention_rope_forward(out, lse, q, k, v, b, t, h, hkv, d, 0.0, 0);
    }
    fn attention_backward(
        &self,
        dq: DViewMut<'_>,
        dk: DViewMut<'_>,
        dv: DViewMut<'_>,
        dout: DView<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        out: DView<'_>,
        lse: DView<'_>,
        b: usize,
        t: usize,
        h: usize,
        hkv: usize,
        d: usize,
    ) {
        self.attention_rope_backward(dq, dk, dv, dout, q, k, v, out, lse, b, t, h, hkv, d, 0.0, 0);
    }

    fn swiglu_forward(&self, out: DViewMut<'_>, gate: DView<'_>, up: DView<'_>) {
        let r = (|| {
            Self::check_view("swiglu gate", gate.len, out.len)?;
            Self::check_view("swiglu up", up.len, out.len)?;
            let len = out.len;
            if len == 0 {
                return Ok(());
            }
            let v = if len.is_multiple_of(4)
                && [out.ptr, gate.ptr, up.ptr].iter().all(|p| p % 16 == 0)
            {
                "v1"
            } else {
                "x1"
            };
            let (g, t) = Self::elementwise_threads(if v == "v1" { len / 4 } else { len });
            let args = |p: &[u64]| {
                [
                    KArg::P(p[0]),
                    KArg::P(p[1]),
                    KArg::P(p[2]),
                    KArg::L(len as i64),
                ]
            };
            if uni16(&[out.dtype, gate.dtype, up.dtype]) {
                self.launch(
                    &format!("swiglu_forward_{v}_{}", suffix(out.dtype)),
                    (g, 1, 1),
                    t,
                    0,
                    &args(&[out.ptr, gate.ptr, up.ptr]),
                )
            } else {
                self.with_f32(
                    &[
                        (out.ptr, len, out.dtype, Io::Out),
                        (gate.ptr, len, gate.dtype, Io::In),
                        (up.ptr, len, up.dtype, Io::In),
                    ],
                    |p| {
                        self.launch(
                            "swiglu_forward_x1_f32",
                            (blocks(len, 256).min(8192), 1, 1),
                            256,
                            0,
                            &args(p),
                        )
                    },
                )
            }
        })();
        self.record(r);
    }
    fn swiglu_backward(
        &self,
        dgate: DViewMut<'_>,
        dup: DViewMut<'_>,
        dout: DView<'_>,
        gate: DView<'_>,
        up: DView<'_>,
    ) {
        let r = (|| {
            let len = dout.len;
            for (what, l) in [
                ("dgate", dgate.len),
                ("dup", dup.len),
                ("gate", gate.len),
                ("up", up.len),
            ] {
                Self::check_view(&format!("swiglu backward {what}"), l, len)?;
            }
            if len == 0 {
                return Ok(());
            }
            let ptrs = [dgate.ptr, dup.ptr, dout.ptr, gate.ptr, up.ptr];
            let v = if len.is_multiple_of(4) && ptrs.iter().all(|p| p % 16 == 0) {
                "v1"
            } else {
                "x1"
            };
            let (g, t) = Self::elementwise_threads(if v == "v1" { len / 4 } else { len });
            let args = |p: &[u64]| {
                [
                    KArg::P(p[0]),
                    KArg::P(p[1]),
                    KArg::P(p[2]),
                    KArg::P(p[3]),
                    KArg::P(p[4]),
                    KArg::L(len as i64),
                ]
            };
            if uni16(&[dgate.dtype, dup.dtype, dout.dtype, gate.dtype, up.dtype]) {
                self.launch(
                    &format!("swiglu_backward_{v}_{}", suffix(dgate.dtype)),
                    (g, 1, 1),
                    t,
                    0,
                    &args(&ptrs),
                )
            } else {
                self.with_f32(
                    &[
                        (dgate.ptr, len, dgate.dtype, Io::Out),
                        (dup.ptr, len, dup.dtype, Io::Out),
                        (dout.ptr, len, dout.dtype, Io::In),
                        (gate.ptr, len, gate.dtype, Io::In),
                        (up.ptr, len, up.dtype, Io::In),
                    ],
                    |p| {
                        self.launch(
                            "swiglu_backward_x1_f32",
                            (blocks(len, 256).min(8192), 1, 1),
                            256,
                            0,
                            &args(p),
                        )
                    },
                )
            }
        })();
        self.record(r);
    }

    fn embedding_forward(
        &self,
        out: DViewMut<'_>,
        ids: &CudaIds,
        table: DView<'_>,
        n: usize,
        c: usize,
    ) {
        let r = (|| {
            Self::check_view("embedding out", out.len, n * c)?;
            Self::check_view("embedding ids", ids.len, n)?;
            ensure!(
                c > 0 && table.len.is_multiple_of(c),
                "embedding: table of {} is not [v, {c}]",
                table.len
            );
            if n == 0 {
                return Ok(());
            }
            let args = |p: &[u64]| {
                [
                    KArg::P(p[0]),
                    KArg::P(ids.ptr),
                    KArg::P(p[1]),
                    KArg::I(n as i32),
                    KArg::I(c as i32),
                ]
            };
            if out.dtype == table.dtype && aligned(&[out.ptr, table.ptr]) {
                self.launch(
                    &format!("embedding_forward_v1_{}", suffix(out.dtype)),
                    (n as u32, 1, 1),
                    256,
                    0,
                    &args(&[out.ptr, table.ptr]),
                )
            } else {
                self.with_f32(
                    &[
                        (out.ptr, out.len, out.dtype, Io::Out),
                        (table.ptr, table.len, table.dtype, Io::In),
                    ],
                    |p| {
                        self.launch(
                            "embedding_forward_v1_f32",
                            (n as u32, 1, 1),
                            256,
                            0,
                            &args(p),
                        )
                    },
                )
            }
        })();
        self.record(r);
    }
    fn embedding_backward(
        &self,
        dtable: DViewMut<'_>,
        dout: DView<'_>,
        ids: &CudaIds,
        n: usize,
        c: usize,
    ) {
        let r = (|| {
            Self::check_view("embedding dout", dout.len, n * c)?;
            Self::check_view("embedding ids", ids.len, n)?;
            ensure!(
                c > 0 && dtable.len.is_multiple_of(c),
                "embedding: dtable of {} is not [v, {c}]",
                dtable.len
            );
            if ids.n_uniq == 0 {
                return Ok(());
            }
            let (u, o, p) = (
                ids.uniq.device_ptr(&self.stream).0,
                ids.offsets.device_ptr(&self.stream).0,
                ids.positions.device_ptr(&self.stream).0,
            );
            let args = |q: &[u64]| {
                [
                    KArg::P(q[0]),
                    KArg::P(q[1]),
                    KArg::P(u),
                    KArg::P(o),
                    KArg::P(p),
                    KArg::I(c as i32),
                ]
            };
            let grid = (ids.n_uniq as u32, 1, 1);
            if dtable.dtype == DType::F32 {
                self.launch(
                    &format!("embedding_backward_v1_{}", suffix(dout.dtype)),
                    grid,
                    256,
                    0,
                    &args(&[dtable.ptr, dout.ptr]),
                )
            } else {
                self.with_f32(
                    &[
                        (dtable.ptr, dtable.len, dtable.dtype, Io::InOut),
                        (dout.ptr, dout.len, dout.dtype, Io::In),
                    ],
                    |q| self.launch("embedding_backward_v1_f32", grid, 256, 0, &args(q)),
                )
            }
        })();
        self.record(r);
    }

    fn cross_entropy_forward(
        &self,
        losses: DViewMut<'_>,
        logits: DView<'_>,
        targets: &CudaIds,
        n: usize,
        v: usize,
    ) {
        let r = (|| {
            Self::check_view("cross_entropy losses", losses.len, n)?;
            Self::check_view("cross_entropy logits", logits.len, n * v)?;
            Self::check_view("cross_entropy targets", targets.len, n)?;
            if n == 0 {
                return Ok(());
            }
            let args = |p: &[u64]| {
                [
                    KArg::P(p[0]),
                    KArg::P(p[1]),
                    KArg::P(targets.ptr),
                    KArg::I(n as i32),
                    KArg::I(v as i32),
                ]
            };
            if losses.dtype == DType::F32 {
                self.launch(
                    &format!("cross_entropy_forward_v1_{}", suffix(logits.dtype)),
                    (n as u32, 1, 1),
                    256,
                    0,
                    &args(&[losses.ptr, logits.ptr]),
                )
            } else {
                self.with_f32(
                    &[
                        (losses.ptr, losses.len, losses.dtype, Io::Out),
                        (logits.ptr, logits.len, logits.dtype, Io::In),
                    ],
                    |p| {
                        self.launch(
                            "cross_entropy_forward_v1_f32",
                            (n as u32, 1, 1),
                            256,
                            0,
                            &args(p),
                        )
                    },
                )
            }
        })();
        self.record(r);
    }
    fn cross_entropy_backward(
        &self,
        dlogits: DViewMut<'_>,
        logits: DView<'_>,
        targets: &CudaIds,
        n: usize,
        v: usize,
        scale: f32,
    ) {
        let r = (|| {
            Self::check_view("cross_entropy dlogits", dlogits.len, n * v)?;
            Self::check_view("cross_entropy logits", logits.len, n * v)?;
            Self::check_view("cross_entropy targets", targets.len, n)?;
            if n == 0 {
                return Ok(());
            }
            let args = |p: &[u64]| {
                [
                    KArg::P(p[0]),
                    KArg::P(p[1]),
                    KArg::P(targets.ptr),
                    KArg::I(n as i32),
                    KArg::I(v as i32),
                    KArg::F(scale),
                ]
            };
            if dlogits.dtype == logits.dtype {
                self.launch(
                    &format!("cross_entropy_backward_v1_{}", suffix(logits.dtype)),
                    (n as u32, 1, 1),
                    256,
                    0,
                    &args(&[dlogits.ptr, logits.ptr]),
                )
            } else {
                self.with_f32(
                    &[
                        (dlogits.ptr, dlogits.len, dlogits.dtype, Io::Out),
                        (logits.ptr, logits.len, logits.dtype, Io::In),
                    ],
                    |p| {
                        self.launch(
                            "cross_entropy_backward_v1_f32",
                            (n as u32, 1, 1),
                            256,
                            0,
                            &args(p),
                        )
                    },
                )
            }
        })();
        self.record(r);
    }

    /// Fused: RoPE applied as q and k are loaded; the buffers stay un-rotated.
    fn attention_rope_forward(
        &self,
        out: DViewMut<'_>,
        lse: DViewMut<'_>,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: DView<'_>,
        b: usize,
        t: usize,
        h: usize,
        hkv: usize,
        d: usize,
        theta: f32,
        pos_offset: usize,
    ) {
        CudaBackend::attention_rope_forward(
            self,
            out,
            lse,
            self.view(q, 0..b * t * h * d),
            self.view(k, 0..b * t * hkv * d),
            v,
            b,
            t,
            h,
            hkv,
            d,
            theta,
            pos_offset,
        );
    }
    fn attention_rope_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: DViewMut<'_>,
        dout: DView<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        out: DView<'_>,
        lse: DView<'_>,
        b: usize,
        t: usize,
        h: usize,
        hkv: usize,
        d: usize,
        theta: f32,
        pos_offset: usize,
    ) {
        CudaBackend::attention_rope_backward(
            self,
            self.view_mut(dq, 0..b * t * h * d),
            self.view_mut(dk, 0..b * t * hkv * d),
            dv,
            dout,
            q,
            k,
            v,
            out,
            lse,
            b,
            t,
            h,
            hkv,
            d,
            theta,
            pos_offset,
        );
    }
    /// Fused: one `[n, LM_HEAD_CE_CHUNK_COLS]` vocabulary chunk and the per-row lse, never the
    /// logits.
    fn lm_head_cross_entropy_buffers(
        &self,
        n: usize,
        v: usize,
        _backward: bool,
    ) -> LmHeadCeBuffers {
        LmHeadCeBuffers {
            logits: 0,
            lse: n,
            scratch: n * v.clamp(1, LM_HEAD_CE_CHUNK_COLS),
        }
    }
    fn lm_head_cross_entropy_forward(
        &self,
        losses: DViewMut<'_>,
        lse: &mut CudaBuf,
        _logits: &mut CudaBuf,
        scratch: &mut CudaBuf,
        x: DView<'_>,
        w: DView<'_>,
        targets: &CudaIds,
        n: usize,
        c: usize,
        v: usize,
    ) {
        let (ll, sl) = (lse.len, scratch.len);
        CudaBackend::lm_head_cross_entropy_forward(
            self,
            losses,
            self.view_mut(lse, 0..ll.min(n)),
            self.view_mut(scratch, 0..sl),
            x,
            w,
            targets,
            n,
            c,
            v,
        );
    }
    fn lm_head_cross_entropy_backward(
        &self,
        dx: DViewMut<'_>,
        dw: Option<DViewMut<'_>>,
        scratch: &mut CudaBuf,
        x: DView<'_>,
        w: DView<'_>,
        _logits: &CudaBuf,
        lse: &CudaBuf,
        targets: &CudaIds,
        n: usize,
        c: usize,
        v: usize,
        scale: f32,
    ) {
        let (sl, ll) = (scratch.len, lse.len.min(n));
        let r = self.lm_head_ce_backward_fp32_dx(
            dx,
            false,
            dw,
            self.view_mut(scratch, 0..sl),
            x,
            w,
            self.view(lse, 0..ll),
            targets,
            n,
            c,
            v,
            scale,
        );
        self.record(r);
    }

    fn adamw_step(
        &self,
        param: DViewMut<'_>,
        m: DViewMut<'_>,
        v: DViewMut<'_>,
        grad: DView<'_>,
        hp: AdamW,
    ) {
        self.adamw_step_with_copy(param, m, v, grad, None, hp);
    }
    fn adamw_step_copy(
        &self,
        param: DViewMut<'_>,
        m: DViewMut<'_>,
        v: DViewMut<'_>,
        grad: DView<'_>,
        copy: DViewMut<'_>,
        hp: AdamW,
    ) {
        self.adamw_step_copy_impl(param, m, v, grad, copy, hp);
    }
    fn host_transfer_bytes(&self) -> u64 {
        self.transferred.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn attention_cached_forward(
        &self,
        out: DViewMut<'_>,
        q: DView<'_>,
        kcache: DView<'_>,
        vcache: DView<'_>,
        b: usize,
        tq: usize,
        past: usize,
        tmax: usize,
        h: usize,
        hkv: usize,
        d: usize,
    ) {
        let r = (|| {
            ensure!(
                hkv > 0 && h.is_multiple_of(hkv) && past + tq <= tmax,
                "attention_cached_forward: bad shape h={h} hkv={hkv} past={past} tq={tq} tmax={tmax}"
            );
            Self::check_view("attention_cached q", q.len, b * tq * h * d)?;
            Self::check_view("attention_cached out", out.len, b * tq * h * d)?;
            Self::check_view("attention_cached kcache", kcache.len, b * tmax * hkv * d)?;
            Self::check_view("attention_cached vcache", vcache.len, b * tmax * hkv * d)?;
            let rows = b * tq * h;
            if rows == 0 || d == 0 {
                return Ok(());
            }
            // The row's scores live in dynamic shared memory, (past + tq) floats, next to the
            // kernel's static scratch; past 48 KiB in all the launch opts in to the device's limit.
            let smem = (past + tq) * 4;
            let scale = crate::ops::attention::attention_scale(d);
            let args = |p: &[u64]| {
                [
                    KArg::P(p[0]),
                    KArg::P(p[1]),
                    KArg::P(p[2]),
                    KArg::P(p[3]),
                    KArg::I(tq as i32),
                    KArg::I(past as i32),
                    KArg::I(tmax as i32),
                    KArg::I(h as i32),
                    KArg::I(hkv as i32),
                    KArg::I(d as i32),
                    KArg::F(scale),
                ]
            };
            let grid = (rows as u32, 1, 1);
            if uni16(&[out.dtype, q.dtype, kcache.dtype, vcache.dtype]) {
                let name = format!("attention_cached_forward_v1_{}", suffix(out.dtype));
                self.allow_dynamic_smem(&name, smem)?;
                self.launch(
                    &name,
                    grid,
                    128,
                    smem as u32,
                    &args(&[out.ptr, q.ptr, kcache.ptr, vcache.ptr]),
                )
            } else {
                self.with_f32(
                    &[
                        (out.ptr, out.len, out.dtype, Io::Out),
                        (q.ptr, q.len, q.dtype, Io::In),
                        (kcache.ptr, kcache.len, kcache.dtype, Io::In),
                        (vcache.ptr, vcache.len, vcache.dtype, Io::In),
                    ],
                    |p| {
                        self.allow_dynamic_smem("attention_cached_forward_v1_f32", smem)?;
                        self.launch(
                            "attention_cached_forward_v1_f32",
                            grid,
                            128,
                            smem as u32,
                            &args(p),
                        )
                    },
                )
            }
        })();
        self.record(r);
    }
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: DViewMut<'_>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        theta: f32,
        pos_offset: usize,
        dir: &str,
    ) {
        let r = (|| {
            ensure!(d.is_multiple_of(2), "rope: head dim {d} is odd");
            Self::check_view("rope x", x.len, b * t * h * d)?;
            let pairs = b * t * h * d / 2;
            if pairs == 0 {
                return Ok(());
            }
            ensure!(theta > 0.0, "rope: theta {theta} must be positive");
            let inv_freq = self.rope_inv_freq(theta, d)?;
            let (g, th) = Self::elementwise_threads(pairs);
            let args = |p: u64| {
                [
                    KArg::P(p),
                    KArg::I(b as i32),
                    KArg::I(t as i32),
                    KArg::I(h as i32),
                    KArg::I(d as i32),
                    KArg::P(inv_freq),
                    KArg::I(pos_offset as i32),
                ]
            };
            self.launch(
                &format!("rope_{dir}_v1_{}", suffix(x.dtype)),
                (g, 1, 1),
                th,
                0,
                &args(x.ptr),
            )
        })();
        self.record(r);
    }
}
