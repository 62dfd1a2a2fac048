//! The one launch path of every op: check the views against the op's shape, pick the kernel
//! variant from their storage types, launch it natively or staged through fp32 scratch.
//!
//! An op launcher describes its views as [`Arg`]s (name, expected length, how the kernel uses
//! it, and which storage the native kernel expects: [`Class`]), asks [`native`] whether the
//! native variant applies, and hands [`CudaBackend::dispatch`] a closure that builds the kernel
//! arguments from the pointers it is given. Staged launches get every view as a 16-byte-aligned
//! fp32 pointer (copies in for what the kernel reads, out for what it writes) and the `_f32`
//! kernel: slow but exact, so an unusual combination of storage types never gives a wrong result.

pub(super) use super::device::suffix;
use super::grid::Launch;
use super::{CudaBackend, kernels, nvtx};
use crate::tensor::DType;
use anyhow::{Context, Result, anyhow, ensure};
use cudarc::driver::{LaunchConfig, PushKernelArg, sys as drv_sys};

/// How a kernel uses an argument (decides the copies when it is staged through fp32).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Io {
    In,
    Out,
    InOut,
}

/// The storage the native kernel expects of an argument.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Class {
    /// Not part of the choice (the launcher decides).
    Any,
    /// The op's 16-bit type (every `Half` argument the same bf16 or f16).
    Half,
    /// fp32 (statistics, gradient accumulators).
    F32,
}

/// A view as an argument of one op.
#[derive(Clone, Copy)]
pub(super) struct Arg<'n> {
    /// Its name in error messages (`"{op} {what}: view holds ..."`).
    pub what: &'n str,
    pub ptr: u64,
    pub len: usize,
    pub dtype: DType,
    pub io: Io,
    /// The element count the op's shape asks for; `None`: checked by the launcher.
    pub want: Option<usize>,
    pub class: Class,
}

impl Arg<'_> {
    /// Must share the op's 16-bit type for the native kernel.
    pub fn half(self) -> Self {
        Arg {
            class: Class::Half,
            ..self
        }
    }
    /// Must be fp32 for the native kernel.
    pub fn f32(self) -> Self {
        Arg {
            class: Class::F32,
            ..self
        }
    }
    /// Its length is not checked against a shape (the launcher checks it otherwise).
    pub fn any_len(self) -> Self {
        Arg { want: None, ..self }
    }
}

/// A kernel argument.
#[derive(Clone, Copy)]
pub(super) enum KArg {
    P(u64),
    I(i32),
    L(i64),
    Q(u64),
    F(f32),
}

/// The kernel arguments `pointers…, tail…`.
pub(super) fn kargs(ptrs: &[u64], tail: &[KArg]) -> Vec<KArg> {
    ptrs.iter()
        .map(|&p| KArg::P(p))
        .chain(tail.iter().copied())
        .collect()
}

/// True when every dtype is the same 16-bit storage type (bf16 or f16): the ops' `_bf16`/`_f16`
/// kernels take exactly that combination.
pub(super) fn uni16(ds: &[DType]) -> bool {
    matches!(ds.first(), Some(DType::BF16 | DType::F16)) && ds.iter().all(|&d| d == ds[0])
}

/// Vectorised kernels read 16 bytes (f32) or 8 bytes (bf16) at a time; a view that does not start
/// on a 16-byte boundary takes the staged path instead.
pub(super) fn aligned(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

/// The suffix of the native 16-bit kernel when the [`Class::Half`] arguments share one 16-bit
/// type, the [`Class::F32`] ones are fp32 and, with `align`, the 16-bit ones start on 16-byte
/// boundaries; `None`: stage through fp32.
pub(super) fn native(args: &[Arg], align: bool) -> Option<&'static str> {
    let half: Vec<&Arg> = args.iter().filter(|a| a.class == Class::Half).collect();
    let dtypes: Vec<DType> = half.iter().map(|a| a.dtype).collect();
    let ptrs: Vec<u64> = half.iter().map(|a| a.ptr).collect();
    let ok = uni16(&dtypes)
        && args
            .iter()
            .filter(|a| a.class == Class::F32)
            .all(|a| a.dtype == DType::F32)
        && (!align || aligned(&ptrs));
    ok.then(|| suffix(dtypes[0]))
}

/// `Err` naming the view when it does not hold `want` elements.
pub(super) fn check_view(what: &str, len: usize, want: usize) -> Result<()> {
    ensure!(
        len == want,
        "{what}: view holds {len} elements, expected {want}"
    );
    Ok(())
}

/// Check every argument's length against its shape, in order (`"{op} {what}"` in the message).
pub(super) fn check_args(op: &str, args: &[Arg]) -> Result<()> {
    for a in args {
        if let Some(want) = a.want {
            check_view(&format!("{op} {}", a.what), a.len, want)?;
        }
    }
    Ok(())
}

impl CudaBackend {
    /// Run an op's body and keep its error for the next call that returns `Result` (the trait's
    /// ops return `()`).
    pub(super) fn run(&self, body: impl FnOnce() -> Result<()>) {
        let r = body();
        self.record(r);
    }

    /// Launch `kernel(suffix, pointers)` over `args` (pointers in the order of `args`): with the
    /// views themselves and `native`'s suffix when `native` is `Some`, else with fp32 staging
    /// copies and `"f32"`.
    pub(super) fn dispatch(
        &self,
        args: &[Arg],
        native: Option<&str>,
        kernel: impl FnOnce(&str, &[u64]) -> Result<()>,
    ) -> Result<()> {
        match native {
            Some(sfx) => {
                let ptrs: Vec<u64> = args.iter().map(|a| a.ptr).collect();
                kernel(sfx, &ptrs)
            }
            None => self.with_f32(args, |p| kernel("f32", p)),
        }
    }

    /// Run `f` with every argument as a 16-byte-aligned fp32 device pointer: aligned fp32 views are
    /// passed as they are, others are copied into fp32 scratch (when read) and back (when written).
    pub(super) fn with_f32(
        &self,
        args: &[Arg],
        f: impl FnOnce(&[u64]) -> Result<()>,
    ) -> Result<()> {
        let mut ptrs = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            if a.dtype == DType::F32 && a.ptr % 16 == 0 {
                ptrs.push(a.ptr);
                continue;
            }
            let s = self.scratch(&format!("stage{i}"), a.len * 4)?;
            if a.io != Io::Out {
                self.cast(s, DType::F32, a.ptr, a.dtype, a.len)?;
            }
            ptrs.push(s);
        }
        f(&ptrs)?;
        for (i, a) in args.iter().enumerate() {
            if ptrs[i] != a.ptr && a.io != Io::In {
                self.cast(a.ptr, a.dtype, ptrs[i], DType::F32, a.len)?;
            }
        }
        Ok(())
    }

    /// Queue kernel `name` with geometry `at` and arguments `args` (in the CUDA source's order).
    pub(super) fn launch(&self, name: &str, at: Launch, args: &[KArg]) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .with_context(|| format!("kernel {name} not loaded"))?;
        kernels::check_grid(name, at.grid_usize())?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                KArg::P(v) | KArg::Q(v) => b.arg(v),
                KArg::I(v) => b.arg(v),
                KArg::L(v) => b.arg(v),
                KArg::F(v) => b.arg(v),
            };
        }
        let _range = nvtx::Range::new(self.nvtx_ops, name);
        let start = self.prof_start();
        let cfg = LaunchConfig {
            grid_dim: at.grid,
            block_dim: (at.block, 1, 1),
            shared_mem_bytes: at.smem,
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
    pub(super) fn allow_dynamic_smem(&self, name: &str, dynamic: usize) -> Result<()> {
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
}
