//! How a test skips. Two kinds:
//! - `skip`: something this machine lacks that the suite can install or ship (`../shared` data,
//!   g++, a Python oracle, OpenMPI, the NCCL wheel). With `ZHLLAMA_REQUIRE_ALL=1` (what `.ci/run`
//!   sets) it is a failure, so CI cannot pass by skipping.
//! - `skip_no_gpu`: no usable GPU, the one thing no CI machine here has; never a failure.
//!
//! Both print `SKIP <target>::<test>: <reason>` and, when `ZHLLAMA_SKIP_LOG` names a file, append that line
//! to it; `tools/test.sh` prints the collected lines as its closing summary.
#![allow(dead_code)]

use std::io::Write;

/// Whether `ZHLLAMA_REQUIRE_ALL=1`: every skip but "no GPU" fails.
pub fn require_all() -> bool {
    std::env::var("ZHLLAMA_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// `<test target>::<test>` of the calling test (libtest names each test's thread after it).
fn test_name() -> String {
    let t = std::thread::current();
    format!("{}::{}", env!("CARGO_CRATE_NAME"), t.name().unwrap_or("?"))
}

fn log(reason: &str) {
    let line = format!("SKIP {}: {reason}", test_name());
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("ZHLLAMA_SKIP_LOG") {
        // One short write per line in append mode: lines of parallel tests do not interleave.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("ZHLLAMA_SKIP_LOG {}: {e}", path.to_string_lossy()));
        f.write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("ZHLLAMA_SKIP_LOG {}: {e}", path.to_string_lossy()));
    }
}

/// Skip the calling test for want of something installable: logged, or a panic under
/// `ZHLLAMA_REQUIRE_ALL=1`.
pub fn skip(reason: &str) {
    if require_all() {
        panic!(
            "{}: would skip ({reason}), and ZHLLAMA_REQUIRE_ALL=1 allows no skip but \"no GPU\"",
            test_name()
        );
    }
    log(reason);
}

/// Skip the calling test because there is no usable GPU (allowed everywhere).
pub fn skip_no_gpu(reason: &str) {
    log(&format!("no usable GPU: {reason}"));
}
