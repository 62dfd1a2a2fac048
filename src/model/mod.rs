//! The LLaMA model: HF config, safetensors weights, flat parameter layout, LoRA, and the explicit
//! forward/backward over a [`crate::backend::Backend`]. Knows LLaMA, nothing of CUDA or MPI.
//!
//! The public API the trainer builds on:
//! - [`LlamaConfig`] (`config.json`), [`Checkpoint`] / [`save_model_dir`] (safetensors dirs);
//! - [`TrainSpec`] + [`LoraConfig`] → [`ParamLayout`]: every HF name → shape + range of the frozen
//!   or the trainable flat buffer;
//! - [`Llama`]: `from_dir` / `random` / `new`, `forward` (→ loss), `forward_logits`, `backward`
//!   (`grads +=`), `trainable()` / `trainable_mut()`, `download_params`, `save_hf`;
//! - [`Activations`]: the saved forward state for one (batch, seq) shape.

pub mod config;
pub mod llama;
pub mod lora;
pub mod params;
pub mod peft;
pub mod resize;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{Activations, HostParams, IGNORE_INDEX, Llama, eval_loss};
pub use lora::{LoraConfig, Proj};
pub use params::{Group, Kind, Loc, ParamEntry, ParamLayout, TrainSpec};
pub use weights::{Checkpoint, HostTensor, SaveOptions, save_model_dir};
