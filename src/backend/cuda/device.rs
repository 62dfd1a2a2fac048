//! The device side of the CUDA backend: the [`CudaBackend`] struct (context, stream, cuBLAS
//! handle, loaded kernels), start-up, buffers and host transfers, the recorded error, scratch
//! memory and the per-launch profiler.

use super::{CudaOptions, Half, KernelTime, compile::compile_all, kernels, nvrtc};
use crate::backend::Role;
use crate::tensor::DType;
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    result as drv, sys as drv_sys,
};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// A device buffer: `len` elements stored as `dtype`.
pub struct CudaBuf {
    pub(super) mem: CudaSlice<u8>,
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) dtype: DType,
}

/// Token ids or labels on the device, plus the CSR grouping of positions by id that the
/// deterministic embedding backward reads (built on the host by `upload_ids`).
pub struct CudaIds {
    pub(super) ids: CudaSlice<i32>,
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) uniq: CudaSlice<i32>,
    pub(super) offsets: CudaSlice<i32>,
    pub(super) positions: CudaSlice<i32>,
    pub(super) n_uniq: usize,
}

/// Per-launch CUDA-event timing ([`CudaBackend::set_profiling`]).
pub(super) struct Profiler {
    enabled: bool,
    records: Vec<(String, CudaEvent, CudaEvent)>,
}

/// The CUDA backend. See the module docs.
pub struct CudaBackend {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: blas_sys::cublasHandle_t,
    pub(super) _modules: Vec<Arc<CudaModule>>,
    pub(super) funcs: HashMap<String, CudaFunction>,
    pub(super) arch: String,
    pub(super) sm_count: u32,
    pub(super) device_name: String,
    /// Storage type of `Weight` / `Activation` buffers (bf16 or f16).
    pub(super) half: DType,
    pub(super) scratch: Mutex<HashMap<String, CudaSlice<u8>>>,
    pub(super) error: Mutex<Option<anyhow::Error>>,
    pub(super) profiler: Mutex<Profiler>,
    /// [`CudaOptions::nvtx`].
    pub(super) nvtx_ops: bool,
    /// [`crate::backend::Backend::host_transfer_bytes`].
    pub(super) transferred: std::sync::atomic::AtomicU64,
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

impl CudaBackend {
    /// The stream every op is queued on (its context is the device's primary context). Work on
    /// another stream that reads or writes this backend's buffers must be ordered with events.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The backend on device `device_ordinal`, with the default header search
    /// (`/usr/local/cuda/include`) and no compile cache. Binaries should prefer
    /// [`CudaBackend::with_options`] with [`kernels::cuda_include_dirs`].
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
        self.sync_and_take_error()?;
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
    pub(super) fn prof_start(&self) -> Option<CudaEvent> {
        if !self.profiler.lock().unwrap().enabled {
            return None;
        }
        self.stream
            .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
    }
    pub(super) fn prof_end(&self, name: &str, start: Option<CudaEvent>) {
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
    pub(super) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
    }
    pub(super) fn record(&self, r: Result<()>) {
        if let Err(e) = r {
            let mut g = self.error.lock().unwrap();
            if g.is_none() {
                *g = Some(e);
            }
        }
    }
    pub(super) fn take_error(&self) -> Result<()> {
        match self.error.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A device pointer to at least `bytes` bytes of scratch named `slot` (grow-only, reused; stream
    /// ordering makes reuse safe since every use is queued on the one stream).
    pub(super) fn scratch(&self, slot: &str, bytes: usize) -> Result<u64> {
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

// ---- buffers, ids and host transfers (the `Backend` trait's memory ops) ----------------------------
impl CudaBackend {
    /// Count `bytes` of payload crossing host↔device ([`crate::backend::Backend::host_transfer_bytes`]).
    pub(super) fn count_transfer(&self, bytes: usize) {
        self.transferred.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(super) fn transfer_bytes(&self) -> u64 {
        self.transferred.load(Ordering::Relaxed)
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, {}, {} storage)",
            self.ctx.ordinal(),
            self.device_name,
            self.arch,
            suffix(self.half)
        )
    }

    pub(super) fn alloc_buf(&self, len: usize, role: Role) -> Result<CudaBuf> {
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
    pub(super) fn alloc_id_buf(&self, len: usize) -> Result<CudaIds> {
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
    pub(super) fn upload_host(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
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
    pub(super) fn download_host(&self, src: &CudaBuf, dst: &mut [f32]) -> Result<()> {
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
    pub(super) fn upload_id_groups(&self, dst: &mut CudaIds, src: &[i32]) -> Result<()> {
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

    pub(super) fn sync_and_take_error(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("CUDA stream: {e:?}"))?;
        self.take_error()
    }
}

/// The storage type of a buffer of `role` when weights and activations are stored as `half`.
pub(super) fn dt(role: Role, half: DType) -> DType {
    match role {
        Role::Weight | Role::Activation => half,
        Role::Fp32 => DType::F32,
    }
}

/// A kernel name's storage suffix.
pub(super) fn suffix(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F16 => "f16",
    }
}
