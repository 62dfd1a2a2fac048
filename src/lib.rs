//! zhllama: the Chinese-LLaMA-Alpaca recipe (vocabulary expansion, two-stage pre-training, LoRA
//! instruction tuning) as a Rust trainer with explicit forward/backward passes, a CPU reference
//! backend and hand-written CUDA kernels. See ARCHITECTURE.md for the map.

pub mod backend;
pub mod data;
pub mod demo;
pub mod distributed;
pub mod export;
pub mod instruct;
pub mod model;
pub mod ops;
pub mod tensor;
pub mod train;
pub mod util;
pub mod vocab;
