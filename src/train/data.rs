//! The training data as the loop sees it: pre-training blocks or SFT examples, cut into
//! micro-batches of `i32` ids and labels (`-100` = no loss).

use crate::data::{PretrainShards, SftShards};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// An opened data directory.
pub enum Data {
    /// Fixed-length blocks; labels = ids (docs/RECIPE.md §2).
    Pretrain(PretrainShards),
    /// Prompt + response examples, labels -100 on the prompt, right-padded (docs/RECIPE.md §4).
    Sft(SftShards),
    /// Fixed-length blocks held in memory, labels = ids, no validation split (`zhllama bench`
    /// trains on random tokens through the same loop, with no files).
    Memory(MemoryBlocks),
}

/// In-memory pre-training blocks: every block is `block_size` ids below `vocab_size`.
#[derive(Clone, Debug)]
pub struct MemoryBlocks {
    vocab_size: usize,
    block_size: usize,
    blocks: Vec<Vec<i32>>,
}

impl MemoryBlocks {
    /// Blocks of equal length `block_size > 0`, ids in `0..vocab_size`, at least one block.
    pub fn new(vocab_size: usize, block_size: usize, blocks: Vec<Vec<i32>>) -> Result<Self> {
        if block_size == 0 || blocks.is_empty() {
            bail!("in-memory data needs at least one block of at least one token");
        }
        for (i, b) in blocks.iter().enumerate() {
            if b.len() != block_size {
                bail!(
                    "in-memory block {i} has {} ids, expected {block_size}",
                    b.len()
                );
            }
            if let Some(x) = b.iter().find(|&&x| x < 0 || x as usize >= vocab_size) {
                bail!("in-memory block {i} has id {x}, outside the vocabulary of {vocab_size}");
            }
        }
        Ok(MemoryBlocks {
            vocab_size,
            block_size,
            blocks,
        })
    }
}

/// One micro-batch, row-major `[b, t]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub ids: Vec<i32>,
    pub labels: Vec<i32>,
    /// Input tokens that are not padding (the tokens/s numerator).
    pub tokens: usize,
}

impl Data {
    /// Open a directory written by `zhllama data pretrain` or `zhllama data sft` (told apart by
    /// the `format` of its `manifest.json`).
    pub fn open(dir: &Path) -> Result<Data> {
        let mpath = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mpath)
            .with_context(|| format!("cannot read {}", mpath.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not JSON", mpath.display()))?;
        let is_sft = v.get("pad_id").is_some() && v.get("examples").is_some();
        let is_pt = v.get("block_size").is_some() && v.get("train_blocks").is_some();
        match (is_pt, is_sft) {
            (true, _) => Ok(Data::Pretrain(PretrainShards::open(dir)?)),
            (_, true) => {
                let s = SftShards::open(dir)?;
                // Training on it would run at loss 0 and learn nothing.
                if s.manifest.target_tokens == 0 {
                    bail!(
                        "{}: no example has a target token (all {} are prompt only); rebuild it with a larger `data sft --max-len`",
                        dir.display(),
                        s.manifest.examples
                    );
                }
                Ok(Data::Sft(s))
            }
            _ => bail!(
                "{}: neither a pre-training nor an SFT data manifest",
                mpath.display()
            ),
        }
    }

    pub fn is_sft(&self) -> bool {
        matches!(self, Data::Sft(_))
    }

    /// Vocabulary size the ids were made with (`len(tokenizer)`, pad included).
    pub fn vocab_size(&self) -> usize {
        match self {
            Data::Pretrain(p) => p.manifest.vocab_size,
            Data::Sft(s) => s.manifest.vocab_size,
            Data::Memory(m) => m.vocab_size,
        }
    }

    /// Training examples (blocks or SFT records).
    pub fn train_len(&self) -> usize {
        match self {
            Data::Pretrain(p) => p.train.len(),
            Data::Sft(s) => s.len(),
            Data::Memory(m) => m.blocks.len(),
        }
    }

    /// Validation blocks (SFT data has no validation split).
    pub fn validation_len(&self) -> usize {
        match self {
            Data::Pretrain(p) => p.validation.len(),
            Data::Sft(_) | Data::Memory(_) => 0,
        }
    }

    /// The longest sequence a batch can have.
    pub fn max_seq_len(&self) -> usize {
        match self {
            Data::Pretrain(p) => p.manifest.block_size,
            Data::Sft(s) => s.manifest.max_len,
            Data::Memory(m) => m.block_size,
        }
    }

    /// Training micro-batch of examples `indices`.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        match self {
            Data::Pretrain(p) => blocks(&p.train, indices),
            Data::Sft(s) => {
                let sb = s.batch(indices);
                let pad = s.manifest.pad_id;
                Batch {
                    b: sb.batch,
                    t: sb.seq_len,
                    tokens: sb.input_ids.iter().filter(|&&x| x != pad).count(),
                    ids: sb.input_ids.iter().map(|&x| x as i32).collect(),
                    labels: sb.labels.iter().map(|&x| x as i32).collect(),
                }
            }
            Data::Memory(m) => {
                let ids: Vec<i32> = indices
                    .iter()
                    .flat_map(|&i| m.blocks[i].iter().copied())
                    .collect();
                Batch {
                    b: indices.len(),
                    t: m.block_size,
                    tokens: ids.len(),
                    labels: ids.clone(),
                    ids,
                }
            }
        }
    }

    /// Validation micro-batch of blocks `indices`.
    pub fn validation_batch(&self, indices: &[usize]) -> Batch {
        match self {
            Data::Pretrain(p) => blocks(&p.validation, indices),
            Data::Sft(_) | Data::Memory(_) => {
                unreachable!("SFT and in-memory data have no validation split")
            }
        }
    }
}

fn blocks(shard: &crate::data::shard::BlockShard, indices: &[usize]) -> Batch {
    let t = shard.block_size();
    let mut buf = vec![0u32; t];
    let mut ids = Vec::with_capacity(indices.len() * t);
    for &i in indices {
        shard.read_block(i, &mut buf);
        ids.extend(buf.iter().map(|&x| x as i32));
    }
    Batch {
        b: indices.len(),
        t,
        tokens: ids.len(),
        labels: ids.clone(),
        ids,
    }
}
