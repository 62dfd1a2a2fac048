//! Built without the `cuda` feature: the CUDA backend's constructor returns a clear error, so callers
//! need no `cfg` of their own (candle's dummy-backend pattern).

use anyhow::{Result, bail};

/// Placeholder for the CUDA backend in builds without the `cuda` feature.
pub struct CudaBackend {
    _private: (),
}

impl CudaBackend {
    /// Always fails: this binary was built without CUDA support.
    pub fn new(_device_ordinal: usize) -> Result<Self> {
        bail!(
            "zhllama was built without the `cuda` feature; rebuild with `cargo build --release --features cuda`"
        )
    }
}
