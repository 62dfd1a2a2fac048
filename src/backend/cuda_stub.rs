//! Built without the `cuda` feature: the CUDA backend's constructor returns a clear error, so callers
//! need no `cfg` of their own (candle's dummy-backend pattern).

use anyhow::{Result, bail};

const NO_CUDA: &str = "zhllama was built without the `cuda` feature; rebuild with `cargo build --release --features cuda`";

/// False: this build has no CUDA backend.
pub const ENABLED: bool = false;

/// Placeholder for the CUDA backend in builds without the `cuda` feature.
pub struct CudaBackend {
    _private: (),
}

impl CudaBackend {
    /// Always fails: this binary was built without CUDA support.
    pub fn new(_device_ordinal: usize) -> Result<Self> {
        bail!(NO_CUDA)
    }
}

/// The NVRTC compile check's API, failing with the same error.
pub mod nvrtc {
    use super::*;
    use crate::kernels::KernelStats;
    use std::path::PathBuf;

    /// See the `cuda` build's `nvrtc::Compiled`.
    pub struct Compiled {
        pub file: String,
        pub arch: String,
        pub cubin: Vec<u8>,
        pub log: String,
        pub stats: Vec<KernelStats>,
    }
    pub fn ensure_present() -> Result<()> {
        bail!(NO_CUDA)
    }
    pub fn version() -> Result<(i32, i32)> {
        bail!(NO_CUDA)
    }
    pub fn compile(
        _file: &str,
        _arch: &str,
        _include: &[PathBuf],
        _verbose: bool,
    ) -> Result<Compiled> {
        bail!(NO_CUDA)
    }
}
