//! The CPU reference for every op, on plain `f32` slices: one file per op, forward and backward side
//! by side. These are the functions the `Backend` trait's CPU implementation calls by the same name,
//! and the spec every CUDA kernel is tested against.
//!
//! Conventions (see `backend/mod.rs`): outputs first, then inputs, saved statistics, the shape (a
//! struct of `shape.rs`); every slice has exactly the length its shape implies (asserted);
//! row-major, contiguous. Numerics follow HF transformers' `LlamaForCausalLM` in f32. Work is spread over rayon's pool; every reduction has a
//! fixed order, so results do not depend on the number of threads.

pub mod adamw;
pub mod attention;
pub mod attention_cached;
pub mod cross_entropy;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod fill;
pub mod math;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod shape;
pub mod swiglu;

pub use adamw::adamw_step;
pub use attention::{attention_backward, attention_forward};
pub use attention_cached::attention_cached_forward;
pub use cross_entropy::{cross_entropy_backward, cross_entropy_forward};
pub use dropout::dropout;
pub use elementwise::{axpy, copy, scale, sum, sum_squares, sum_squares_tree, zero};
pub use embedding::{embedding_backward, embedding_forward};
pub use fill::fill_uniform;
pub use matmul::matmul;
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rope::{rope_backward, rope_forward};
pub use swiglu::{swiglu_backward, swiglu_forward};
