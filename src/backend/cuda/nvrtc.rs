//! NVRTC: compile one embedded kernel file (`kernels/*.cu`, headers from `crate::kernels::HEADERS`)
//! to a cubin for one GPU architecture, with the ptxas register/spill report. Needs no GPU and no
//! ptxas: only `libnvrtc` and the CUDA headers (`cuda_bf16.h` is not bundled with NVRTC).
//!
//! The safe `cudarc::nvrtc::compile_ptx` panics when NVRTC is missing, returns no log on success
//! and no cubin, so this talks to `cudarc::nvrtc::sys` directly and checks for the library first.

use anyhow::{Context, Result, bail};
use cudarc::nvrtc::sys;
use std::ffi::{CStr, CString, c_char, c_int};
use std::path::PathBuf;

use crate::kernels::{self, KernelStats};

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
    /// Per-kernel registers, spills and shared memory parsed from the log.
    pub stats: Vec<KernelStats>,
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
        o.push("--ptxas-options=-v".to_string());
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
    Ok(Compiled {
        file: file.to_string(),
        arch: arch.to_string(),
        cubin,
        log,
        stats,
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
