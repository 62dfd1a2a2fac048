//! Vocabulary work (docs/RECIPE.md §1): SentencePiece `ModelProto` read/write ([`proto`]), the
//! Chinese-LLaMA merge ([`merge`]), an encoder/decoder with python-sentencepiece parity
//! ([`Tokenizer`]), HF `tokenizer.json` export ([`hf`]) and BPE/unigram vocabulary trainers ([`mod@train`]).
//! Never touches a backend.

pub mod charsmap;
pub mod encode;
pub mod hf;
pub mod merge;
pub mod proto;
pub mod train;

pub use encode::Tokenizer;
pub use merge::{MergeStats, merge_models, merge_tokenizers};
pub use proto::ModelProto;
pub use train::{TrainOptions, TrainReport, train};
