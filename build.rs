//! Embeds every CUDA source under kernels/ (`*.cu`, `*.cuh`) into the binary as a name → source
//! table, so the CUDA backend compiles them with NVRTC at run time. Never needs nvcc.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    // The manifest directory as cargo sets it for this run, not as it was when this script was
    // compiled (`env!`): a target directory reused from another checkout would otherwise read a
    // kernels/ that no longer exists and embed nothing.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("kernels");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the kernel directory {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .collect();
    entries.sort();
    let mut sources = String::new();
    let mut headers = String::new();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        println!("cargo:rerun-if-changed={}", path.display());
        let line = format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        );
        if name.ends_with(".cu") {
            sources.push_str(&line);
        } else if name.ends_with(".cuh") {
            headers.push_str(&line);
        }
    }
    assert!(
        !sources.is_empty(),
        "no kernel sources (*.cu) in {}",
        dir.display()
    );
    let mut out = String::new();
    writeln!(out, "/// Kernel sources: (file name, CUDA C++ source).").unwrap();
    writeln!(out, "pub const SOURCES: &[(&str, &str)] = &[\n{sources}];").unwrap();
    writeln!(out, "/// Headers the sources include: (file name, source).").unwrap();
    writeln!(out, "pub const HEADERS: &[(&str, &str)] = &[\n{headers}];").unwrap();
    let out_path = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernel_sources.rs");
    std::fs::write(out_path, out).unwrap();
}
