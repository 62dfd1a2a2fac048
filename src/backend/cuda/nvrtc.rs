//! NVRTC: compile one embedded kernel file (`kernels/*.cu`, headers from `crate::backend::cuda::kernels::HEADERS`)
//! to a cubin for one GPU architecture, with the ptxas register/spill report. Needs no GPU and no
//! ptxas: only `libnvrtc` and the CUDA headers (`cuda_bf16.h` is not bundled with NVRTC).
//!
//! The kernels a cubin holds are read from its ELF symbol table ([`entry_points`]), never from the
//! log: NVRTC ≥ 12.9 can serve a program from the driver's compute cache, and a cache hit prints no
//! ptxas report. A compile that wants the report (`verbose_ptxas`) passes `--no-cache`.
//!
//! The safe `cudarc::nvrtc::compile_ptx` panics when NVRTC is missing, returns no log on success
//! and no cubin, so this talks to `cudarc::nvrtc::sys` directly and checks for the library first.

use anyhow::{Context, Result, bail};
use cudarc::nvrtc::sys;
use std::ffi::{CStr, CString, c_char, c_int};
use std::path::PathBuf;

use super::kernels::{self, KernelStats};

/// A compiled kernel file.
pub struct Compiled {
    /// The kernel file (`rmsnorm.cu`).
    pub file: String,
    /// `sm_80`, `sm_90`, ...
    pub arch: String,
    /// Machine code for `arch`, loadable with `cuModuleLoadData`.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings and, with `--ptxas-options=-v`, the ptxas report).
    pub log: String,
    /// Per-kernel registers, spills and shared memory parsed from the log (empty without
    /// `verbose_ptxas`).
    pub stats: Vec<KernelStats>,
    /// The kernels (`extern "C" __global__` entry points) in `cubin`, in symbol-table order.
    pub entry_points: Vec<String>,
}

/// ELF `st_other` bit that marks a CUDA kernel entry point (`STO_CUDA_ENTRY`); device functions
/// that were not inlined are `FUNC` symbols without it.
const STO_CUDA_ENTRY: u8 = 0x10;

/// The kernel entry points of a cubin: its global `FUNC` symbols flagged `STO_CUDA_ENTRY`. An error
/// names what is wrong when `cubin` is not an ELF file.
pub fn entry_points(cubin: &[u8]) -> Result<Vec<String>> {
    use object::{Object, ObjectSymbol, SymbolFlags, SymbolKind};
    let file = object::File::parse(cubin).context("cubin is not an ELF object")?;
    let mut out = Vec::new();
    for sym in file.symbols() {
        let entry = matches!(sym.flags(), SymbolFlags::Elf { st_other, .. } if st_other.0 & STO_CUDA_ENTRY != 0);
        if sym.kind() == SymbolKind::Text && sym.is_global() && entry {
            out.push(
                sym.name()
                    .context("cubin symbol name is not UTF-8")?
                    .to_string(),
            );
        }
    }
    Ok(out)
}

/// `Err` (never a panic) when `libnvrtc` cannot be loaded.
pub fn ensure_present() -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        bail!(
            "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc==13.0.88` \
             and put its lib directory (.../nvidia/cu13/lib) on LD_LIBRARY_PATH"
        )
    }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    ensure_present()?;
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    // SAFETY: two valid out-pointers.
    check(
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) },
        "nvrtcVersion",
    )?;
    Ok((major, minor))
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a static C string.
    let msg = unsafe { CStr::from_ptr(sys::nvrtcGetErrorString(r)) }.to_string_lossy();
    bail!("{what} failed: {msg}")
}

/// The compile options zhllama uses (the cache key includes them).
pub fn options(arch: &str, include_dirs: &[PathBuf], verbose_ptxas: bool) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--generate-line-info".to_string(),
        "--device-as-default-execution-space".to_string(),
    ];
    if verbose_ptxas {
        // A program served from NVRTC's cache prints no ptxas report.
        o.push("--ptxas-options=-v".to_string());
        o.push("--no-cache".to_string());
    }
    for d in include_dirs {
        o.push(format!("--include-path={}", d.display()));
    }
    o
}

/// Compile embedded kernel file `file` for `arch` (`sm_80`, `sm_90`) to a cubin.
/// A compile error returns `Err` carrying NVRTC's log.
pub fn compile(
    file: &str,
    arch: &str,
    include_dirs: &[PathBuf],
    verbose_ptxas: bool,
) -> Result<Compiled> {
    ensure_present()?;
    let src = kernels::source(file).with_context(|| format!("no embedded kernel file {file}"))?;
    let src_c = CString::new(src).with_context(|| format!("{file}: NUL byte in source"))?;
    let name_c = CString::new(file)?;
    let header_src: Vec<CString> = kernels::HEADERS
        .iter()
        .map(|(_, s)| CString::new(*s))
        .collect::<Result<_, _>>()?;
    let header_names: Vec<CString> = kernels::HEADERS
        .iter()
        .map(|(n, _)| CString::new(*n))
        .collect::<Result<_, _>>()?;
    let header_src_p: Vec<*const c_char> = header_src.iter().map(|s| s.as_ptr()).collect();
    let header_names_p: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all strings outlive the program; the arrays have `HEADERS.len()` entries.
    check(
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src_c.as_ptr(),
                name_c.as_ptr(),
                header_src_p.len() as c_int,
                header_src_p.as_ptr(),
                header_names_p.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    let result = compile_program(prog, file, arch, include_dirs, verbose_ptxas);
    // SAFETY: `prog` was created above and is destroyed once.
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    result
}

fn compile_program(
    prog: sys::nvrtcProgram,
    file: &str,
    arch: &str,
    include_dirs: &[PathBuf],
    verbose_ptxas: bool,
) -> Result<Compiled> {
    let opts = options(arch, include_dirs, verbose_ptxas);
    let opts_c: Vec<CString> = opts
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<Result<_, _>>()?;
    let opts_p: Vec<*const c_char> = opts_c.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: valid program and option array.
    let r = unsafe { sys::nvrtcCompileProgram(prog, opts_p.len() as c_int, opts_p.as_ptr()) };
    let log = program_log(prog)?;
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        bail!("NVRTC failed to compile {file} for {arch} (options {opts:?}):\n{log}");
    }
    let mut size = 0usize;
    // SAFETY: valid program, out-pointer.
    check(
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) },
        "nvrtcGetCUBINSize",
    )?;
    let mut cubin = vec![0u8; size];
    // SAFETY: buffer of the size NVRTC reported.
    check(
        unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) },
        "nvrtcGetCUBIN",
    )?;
    if cubin.is_empty() {
        bail!(
            "NVRTC produced no cubin for {file} ({arch}): pass a real architecture (sm_XY), not compute_XY"
        );
    }
    let stats = kernels::parse_ptxas_log(&log);
    let entry_points = entry_points(&cubin).with_context(|| format!("{file} ({arch})"))?;
    Ok(Compiled {
        file: file.to_string(),
        arch: arch.to_string(),
        cubin,
        log,
        stats,
        entry_points,
    })
}

fn program_log(prog: sys::nvrtcProgram) -> Result<String> {
    let mut size = 0usize;
    // SAFETY: valid program, out-pointer.
    check(
        unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) },
        "nvrtcGetProgramLogSize",
    )?;
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: buffer of the size NVRTC reported.
    check(
        unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) },
        "nvrtcGetProgramLog",
    )?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}
