//! CI guard for the CUDA kernels with no GPU: compile every `kernels/*.cu` with NVRTC for sm_80 and
//! sm_90, fail on any compile error, print registers / spills / shared memory per kernel, and fail
//! when a hot kernel spills (see `SPILL_ALLOWED` for the kernels allowed to and why).
//!
//! Needs `--features cuda` and NVRTC + the CUDA headers (tools/test.sh installs the
//! `nvidia-cuda-nvrtc` / `nvidia-cuda-runtime` wheels and sets LD_LIBRARY_PATH). Without the feature
//! it prints why it is skipped. With the feature, a missing NVRTC is a failure, not a skip, unless
//! `ZHLLAMA_ALLOW_NO_NVRTC=1` (a developer build without the wheels).

mod skip_common;

use zhllama::backend::cuda::kernels;
use zhllama::backend::cuda::{ENABLED, nvrtc};

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Kernels allowed a non-zero spill, with the reason. Empty: no kernel may spill.
const SPILL_ALLOWED: &[(&str, &str)] = &[];

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !ENABLED {
        skip_common::skip("built without `--features cuda` (tools/test.sh runs this with it)");
        return;
    }
    if let Err(e) = nvrtc::ensure_present() {
        if std::env::var("ZHLLAMA_ALLOW_NO_NVRTC").as_deref() == Ok("1") {
            skip_common::skip(&format!("ZHLLAMA_ALLOW_NO_NVRTC=1: {e:#}"));
            return;
        }
        panic!("{e:#}");
    }
    let (maj, min) = nvrtc::version().unwrap();
    let include = kernels::cuda_include_dirs(|k| std::env::var(k).ok());
    assert!(
        !include.is_empty(),
        "no directory with cuda_bf16.h found (set ZHLLAMA_CUDA_INCLUDE, CUDA_HOME, or put .../nvidia/cu13/lib on LD_LIBRARY_PATH)"
    );
    eprintln!("NVRTC {maj}.{min}, include {include:?}");
    assert!(!kernels::SOURCES.is_empty(), "no kernel sources embedded");
    let mut failures = Vec::new();
    let mut spills = Vec::new();
    let mut count = 0;
    println!(
        "{:<46} {:>6} {:>5} {:>8} {:>8} {:>6} {:>6}",
        "kernel", "arch", "regs", "spill_st", "spill_ld", "stack", "smem"
    );
    // One thread per (file, architecture): NVRTC programs compile independently.
    let results: Vec<anyhow::Result<nvrtc::Compiled>> = std::thread::scope(|s| {
        let handles: Vec<_> = ARCHS
            .iter()
            .flat_map(|arch| kernels::SOURCES.iter().map(move |(file, _)| (*arch, *file)))
            .map(|(arch, file)| {
                let include = &include;
                s.spawn(move || nvrtc::compile(file, arch, include, true))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        match r {
            Err(e) => failures.push(format!("{e:#}")),
            Ok(c) => {
                let (file, arch) = (&c.file, &c.arch);
                assert!(!c.cubin.is_empty(), "{file} {arch}: empty cubin");
                assert!(
                    !c.stats.is_empty(),
                    "{file} {arch}: no kernels in ptxas report:\n{}",
                    c.log
                );
                for k in &c.stats {
                    count += 1;
                    println!(
                        "{:<46} {:>6} {:>5} {:>8} {:>8} {:>6} {:>6}",
                        k.name,
                        k.arch,
                        k.registers,
                        k.spill_stores,
                        k.spill_loads,
                        k.stack_bytes,
                        k.smem_bytes
                    );
                    if (k.spill_stores > 0 || k.spill_loads > 0)
                        && !SPILL_ALLOWED.iter().any(|(n, _)| *n == k.name)
                    {
                        spills.push(format!(
                            "{} ({}): {} B spill stores",
                            k.name, k.arch, k.spill_stores
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} kernel file(s) failed to compile:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        spills.is_empty(),
        "kernels spill registers:\n{}",
        spills.join("\n")
    );
    eprintln!("{count} kernel builds OK");
}

#[test]
fn ptxas_report_parses() {
    // A report in the format NVRTC 13.0 prints (checked against a real log by the test above).
    let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k_a' for 'sm_90'\n\
ptxas info    : Function properties for k_a\n\
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'k_b' for 'sm_90'\n\
ptxas info    : Function properties for k_b\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 8 registers, used 0 barriers, 380 bytes cmem[0]\n";
    let s = kernels::parse_ptxas_log(log);
    assert_eq!(s.len(), 2);
    assert_eq!(
        s[0],
        kernels::KernelStats {
            name: "k_a".into(),
            arch: "sm_90".into(),
            registers: 40,
            spill_stores: 8,
            spill_loads: 12,
            stack_bytes: 16,
            smem_bytes: 128
        }
    );
    assert_eq!(
        (s[1].registers, s[1].spill_stores, s[1].smem_bytes),
        (8, 0, 0)
    );
}

#[test]
fn ptxas_report_does_not_credit_device_functions_to_kernels() {
    // NVRTC 13.0's report for `k2` calling a non-inlined device function `g` (a real log): the
    // `Function properties for _Z1gf` block comes after k2's own lines and belongs to no kernel.
    let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k2' for 'sm_90'\n\
ptxas info    : Function properties for k2\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 8 registers, used 0 barriers\n\
ptxas info    : Compile time = 12.247 ms\n\
ptxas info    : Function properties for _Z1gf\n\
ptxas         .     24 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
ptxas info    : Function properties for k\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 10 registers, used 0 barriers\n";
    let s = kernels::parse_ptxas_log(log);
    let got: Vec<(&str, u32, u32, u32)> = s
        .iter()
        .map(|k| (k.name.as_str(), k.registers, k.stack_bytes, k.spill_stores))
        .collect();
    assert_eq!(got, [("k2", 8, 0, 0), ("k", 10, 0, 0)]);
}

/// The include directories, or `None` (with the reason printed) when this build cannot compile.
fn nvrtc_setup() -> Option<Vec<std::path::PathBuf>> {
    if !ENABLED {
        eprintln!("skipped: built without `--features cuda` (tools/test.sh runs this with it)");
        return None;
    }
    if let Err(e) = nvrtc::ensure_present() {
        if std::env::var("ZHLLAMA_ALLOW_NO_NVRTC").as_deref() == Ok("1") {
            eprintln!("skipped (ZHLLAMA_ALLOW_NO_NVRTC=1): {e:#}");
            return None;
        }
        panic!("{e:#}");
    }
    let include = kernels::cuda_include_dirs(|k| std::env::var(k).ok());
    assert!(!include.is_empty(), "no directory with cuda_bf16.h found");
    Some(include)
}

#[test]
fn kernel_names_come_from_the_cubin_not_the_log() {
    use std::collections::BTreeSet;
    use zhllama::backend::cuda::compile_all;
    let Some(include) = nvrtc_setup() else {
        return;
    };
    let arch = "sm_90";
    // The independent reference: the kernels ptxas reports for an uncached verbose compile.
    let reported: BTreeSet<String> = kernels::SOURCES
        .iter()
        .flat_map(|(file, _)| {
            let c = nvrtc::compile(file, arch, &include, true).unwrap();
            assert!(
                nvrtc::options(arch, &include, true).contains(&"--no-cache".to_string()),
                "a verbose compile must bypass NVRTC's cache"
            );
            c.stats.into_iter().map(|k| k.name)
        })
        .collect();
    assert!(
        reported.len() > 50,
        "only {} kernels reported",
        reported.len()
    );

    // A compile without the report is what a program served from NVRTC's cache looks like: no
    // ptxas text at all (names taken from the log would be none). Its kernels must still be found.
    let c = nvrtc::compile("elementwise.cu", arch, &include, false).unwrap();
    assert!(
        !c.log.contains("Compiling entry function") && c.stats.is_empty(),
        "a plain compile printed a ptxas report:\n{}",
        c.log
    );
    let cast: BTreeSet<String> = c.entry_points.into_iter().collect();
    let cast_reported: BTreeSet<String> = nvrtc::compile("elementwise.cu", arch, &include, true)
        .unwrap()
        .stats
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(
        cast, cast_reported,
        "elementwise.cu: cubin symbols vs ptxas report"
    );

    // The backend's own loader, twice over one cache directory: cold, then warm (cubins and names
    // read back from the cache). Both give exactly the reported kernels, file by file.
    let cache = tempfile::tempdir().unwrap();
    for round in ["cold", "warm"] {
        let files = compile_all(arch, &include, Some(cache.path())).unwrap();
        assert_eq!(files.len(), kernels::SOURCES.len());
        let names: BTreeSet<String> = files.iter().flat_map(|(_, _, n)| n.clone()).collect();
        assert_eq!(
            names, reported,
            "{round} start: kernel names differ from ptxas's"
        );
        for (file, cubin, n) in &files {
            let from_cubin: BTreeSet<String> =
                nvrtc::entry_points(cubin).unwrap().into_iter().collect();
            let listed: BTreeSet<String> = n.iter().cloned().collect();
            assert_eq!(from_cubin, listed, "{round} start: {file}");
        }
    }
    assert!(
        std::fs::read_dir(cache.path()).unwrap().count() >= 2 * kernels::SOURCES.len(),
        "the cache was not written"
    );
}

#[test]
fn entry_points_reject_a_non_elf_cubin() {
    if !ENABLED {
        eprintln!("skipped: built without `--features cuda`");
        return;
    }
    let e = nvrtc::entry_points(b"not an elf file").unwrap_err();
    assert!(format!("{e:#}").contains("not an ELF"), "{e:#}");
}
