//! The CUDA backend (feature `cuda`).

pub mod nvrtc;

/// True in builds with the `cuda` feature.
pub const ENABLED: bool = true;
