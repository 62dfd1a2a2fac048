//! NVTX ranges without a GPU: they reach a profiler through NVTX v3's injection mechanism (the one
//! Nsight Systems uses: `NVTX_INJECTION64_PATH`), and are a silent no-op without one or with a
//! library that does not load.
//!
//! The "profiler" is a tiny injection library written here in C (compiled with the system `cc`) that
//! fills NVTX's core function table with its own RangePushA/RangePop, which log to a file. Each case
//! runs in a child process (this test binary, re-run on one test) because NVTX reads its environment
//! once per process.

mod skip_common;

use std::path::Path;
use std::process::Command;
use zhllama::backend::cuda::nvtx;

const CHILD: &str = "ZHLLAMA_NVTX_TEST_CHILD";

/// The injection library. The ABI is NVTX v3's (nvtxDetail/nvtxTypes.h): the loader calls
/// `InitializeInjectionNvtx2(getExportTable)`; export table 1 (callbacks) has
/// `GetModuleFunctionTable`; module 1 (core) is an array of pointers to function-pointer slots,
/// slot 9 = RangePushA, slot 11 = RangePop. A non-zero return means success.
const INJECTION_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>
typedef void (*fnptr)(void);
typedef fnptr **table_t;
typedef struct {
    size_t struct_size;
    int (*GetModuleFunctionTable)(int module, table_t *out_table, unsigned int *out_size);
} callbacks_t;
static FILE *out;
static int push_a(const char *m) { fprintf(out, "push %s\n", m); fflush(out); return 0; }
static int pop(void) { fprintf(out, "pop\n"); fflush(out); return 0; }
int InitializeInjectionNvtx2(const void *(*get_export_table)(uint32_t)) {
    const callbacks_t *cb = (const callbacks_t *)get_export_table(1);
    table_t t = NULL;
    unsigned int n = 0;
    const char *path = getenv("ZH_NVTX_LOG");
    if (!cb || !path || !cb->GetModuleFunctionTable(1, &t, &n) || !t || n <= 11) return 0;
    out = fopen(path, "w");
    if (!out) return 0;
    fprintf(out, "init\n");
    *t[9] = (fnptr)push_a;
    *t[11] = (fnptr)pop;
    return 1;
}
"#;

fn is_child() -> bool {
    std::env::var(CHILD).is_ok()
}

/// Run test `name` of this binary in a child process with `env` (`None` removes the variable).
fn run_child(name: &str, env: &[(&str, Option<&Path>)]) -> std::process::Output {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1");
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().expect("spawning the test binary");
    assert!(
        out.status.success(),
        "child {name} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The child side: a fixed sequence of ranges (also what the no-profiler cases run).
#[test]
fn child_ranges() {
    if !is_child() {
        return;
    }
    nvtx::range_push("layer.0");
    {
        let _r = nvtx::Range::new(true, "rmsnorm_fwd_v1_bf16");
        let _off = nvtx::Range::new(false, "never seen");
    }
    nvtx::range_push("bad\0name");
    nvtx::range_pop();
    nvtx::range_pop();
    // An unmatched pop is ignored by NVTX (and must not crash without a profiler).
    nvtx::range_pop();
    for i in 0..100_000 {
        let _r = nvtx::Range::new(i == usize::MAX, "hot loop");
    }
}

#[test]
fn injection_library_receives_the_ranges() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("inject.c");
    let lib = dir.path().join("libinject.so");
    std::fs::write(&src, INJECTION_C).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    match Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "compiling the NVTX injection library failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            skip_common::skip(&format!(
                "no C compiler `{cc}` to build the fake NVTX injection ({e})"
            ));
            return;
        }
    }
    let log = dir.path().join("nvtx.log");
    run_child(
        "child_ranges",
        &[
            ("NVTX_INJECTION64_PATH", Some(&lib)),
            ("ZH_NVTX_LOG", Some(&log)),
        ],
    );
    let got = std::fs::read_to_string(&log).expect("the injection library wrote no log");
    assert_eq!(
        got,
        "init\npush layer.0\npush rmsnorm_fwd_v1_bf16\npop\npush bad\npop\npop\npop\n"
    );
}

#[test]
fn no_profiler_is_a_silent_no_op() {
    if is_child() {
        return;
    }
    // The child's exit status is checked: a panic or a crash fails this test.
    run_child("child_ranges", &[("NVTX_INJECTION64_PATH", None)]);
}

#[test]
fn a_library_that_does_not_load_leaves_nvtx_off() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-injection.so");
    let not_a_lib = dir.path().join("not-a-lib.so");
    std::fs::write(&not_a_lib, b"not an ELF file").unwrap();
    for p in [&missing, &not_a_lib] {
        let out = run_child("child_ranges", &[("NVTX_INJECTION64_PATH", Some(p))]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
    }
}
