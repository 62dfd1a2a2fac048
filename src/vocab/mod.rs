//! Vocabulary work (RECIPE.md §1): SentencePiece `ModelProto` read/write ([`proto`]), the
//! Chinese-LLaMA merge ([`merge`]), an encoder/decoder with python-sentencepiece parity
//! ([`Tokenizer`]), HF `tokenizer.json` export ([`hf`]) and a vocabulary trainer ([`train`]).
//! Never touches a backend.

pub mod encode;
pub mod hf;
pub mod merge;
pub mod proto;

pub use encode::Tokenizer;
pub use merge::{MergeStats, merge_models, merge_tokenizers};
pub use proto::ModelProto;
