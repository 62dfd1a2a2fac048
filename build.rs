//! Embeds every CUDA source under kernels/ (`*.cu`, `*.cuh`) into the binary as a name → source
//! table, so the CUDA backend compiles them with NVRTC at run time. Never needs nvcc.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
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
    let mut out = String::new();
    writeln!(out, "/// Kernel sources: (file name, CUDA C++ source).").unwrap();
    writeln!(out, "pub const SOURCES: &[(&str, &str)] = &[\n{sources}];").unwrap();
    writeln!(out, "/// Headers the sources include: (file name, source).").unwrap();
    writeln!(out, "pub const HEADERS: &[(&str, &str)] = &[\n{headers}];").unwrap();
    let out_path = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernel_sources.rs");
    std::fs::write(out_path, out).unwrap();
}
