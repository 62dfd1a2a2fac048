//! The CUDA kernel sources embedded by build.rs (`kernels/*.cu`, `kernels/*.cuh`). Plain strings:
//! available in every build, so tools can compile-check them with NVRTC even without a GPU.

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// The source of kernel file `name` (e.g. `"rmsnorm.cu"`), if embedded.
pub fn source(name: &str) -> Option<&'static str> {
    SOURCES
        .iter()
        .chain(HEADERS.iter())
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
}
