//! The LLaMA model: HF config, safetensors weights, flat parameter layout, LoRA, and the explicit
//! forward/backward over a [`crate::backend::Backend`]. Knows LLaMA, nothing of CUDA or MPI.
//!
//! The public API the trainer builds on:
//! - [`LlamaConfig`] (`config.json`), [`Checkpoint`] / [`save_model_dir`] (safetensors dirs);
//! - [`TrainSpec`] + [`LoraConfig`] → [`ParamLayout`]: every HF name → shape + range of the frozen
//!   or the trainable flat buffer;
//! - [`Llama`]: `from_dir` / `random` / `new`, `forward` (→ loss), `forward_logits`, `backward`
//!   (`grads +=`), `trainable()` / `trainable_mut()`, `download_params`, `save_hf`;
//! - [`Activations`]: the saved forward state for one (batch, seq) shape; with gradient
//!   checkpointing (`Activations::new_checkpointed`, or `Llama::set_gradient_checkpointing`) only
//!   each layer's input is kept and the backward recomputes the layer; `bytes()` = device bytes.
//!
//! One training micro-step on any backend:
//! ```no_run
//! # use std::sync::Arc;
//! # use zhllama::backend::{Backend, cpu::CpuBackend};
//! # use zhllama::model::*;
//! # fn main() -> anyhow::Result<()> {
//! let be = Arc::new(CpuBackend::new());
//! let model = Llama::from_dir(be.clone(), "base".as_ref(), TrainSpec::embeddings_only())?;
//! let (b, t) = (2, 512);
//! let mut acts = Activations::new(&model, b, t)?; // once per shape
//! let mut grads = model.alloc_grads()?; // trainable layout, zero
//! # let (ids, labels) = (vec![1i32; b * t], vec![1i32; b * t]);
//! acts.training = true; // LoRA dropout on
//! acts.rng_key = 0; // the micro-step number: masks replay on resume
//! let loss = model.forward(&mut acts, &ids, &labels)?;
//! model.backward(&mut acts, &mut grads, 1.0)?; // grads += ∂loss/∂θ (trainable tensors only)
//! for e in model.layout().entries().iter().filter(|e| e.group == Group::Trainable) {
//!     let _slice = be.view(&grads, e.range.clone()); // e.name, e.shape, e.kind
//! }
//! # let _ = loss; Ok(()) }
//! ```

pub mod config;
pub mod generate;
pub mod llama;
pub mod lora;
pub mod params;
pub mod peft;
pub mod resize;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{Activations, HostParams, IGNORE_INDEX, KvCache, Llama, eval_loss};
pub use lora::{LoraConfig, Proj};
pub use params::{Group, Kind, Loc, ParamEntry, ParamLayout, TrainSpec};
pub use weights::{Checkpoint, HostTensor, SaveOptions, save_model_dir};
