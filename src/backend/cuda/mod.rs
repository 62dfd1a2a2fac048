//! The CUDA backend (issue 9).
