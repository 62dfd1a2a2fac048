//! Where every parameter lives: two flat buffers, *frozen* and *trainable*, and a [`ParamLayout`]
//! mapping each HF tensor name to its shape and its range in one of them.
//!
//! Gradients and optimizer state use the trainable buffer's layout, so a ZeRO-2 shard, a LoRA group
//! or "everything but the embedding" is a range. Which tensors are trainable is a [`TrainSpec`].
//! Each tensor starts at a multiple of [`ALIGN`] elements (zero padding between them), so every
//! tensor is aligned for vector loads on any backend; the padding has zero gradient and stays zero.

use super::config::LlamaConfig;
use super::lora::{LoraConfig, Proj};
use anyhow::{Result, bail};
use std::collections::HashMap;
use std::ops::Range;

/// Every tensor's first element sits at a multiple of this many elements (256 bytes in f32).
pub const ALIGN: usize = 64;

/// Which flat buffer a tensor lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    Frozen,
    Trainable,
}

/// What a tensor is, independent of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Embedding,
    LmHead,
    FinalNorm,
    /// `input_layernorm` (`post = false`) or `post_attention_layernorm` (`post = true`) of a layer.
    Norm {
        layer: usize,
        post: bool,
    },
    Proj {
        layer: usize,
        proj: Proj,
    },
    LoraA {
        layer: usize,
        proj: Proj,
    },
    LoraB {
        layer: usize,
        proj: Proj,
    },
}

/// One named tensor: HF name, shape, which buffer, which range of it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamEntry {
    /// HF name (`model.layers.0.self_attn.q_proj.weight`); LoRA factors use PEFT's names without
    /// the `base_model.model.` prefix (`model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
    pub group: Group,
    pub range: Range<usize>,
}

impl ParamEntry {
    pub fn numel(&self) -> usize {
        self.range.len()
    }

    /// The location as a small copyable handle.
    pub fn loc(&self) -> Loc {
        Loc {
            group: self.group,
            start: self.range.start,
            len: self.range.len(),
        }
    }
}

/// A tensor's place: buffer + offset + length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub group: Group,
    pub start: usize,
    pub len: usize,
}

impl Loc {
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
    pub fn trainable(&self) -> bool {
        self.group == Group::Trainable
    }
}

/// Which tensors train in full, and optional LoRA adapters. The base weight of a LoRA-adapted
/// projection stays frozen unless `projections` is set too.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainSpec {
    pub embed_tokens: bool,
    pub lm_head: bool,
    /// All RMSNorm weights (per layer and final).
    pub norms: bool,
    /// All seven projections of every layer, in full.
    pub projections: bool,
    pub lora: Option<LoraConfig>,
}

impl TrainSpec {
    /// Everything trains in full (no LoRA).
    pub fn full() -> Self {
        TrainSpec {
            embed_tokens: true,
            lm_head: true,
            norms: true,
            projections: true,
            lora: None,
        }
    }

    /// Nothing trains (eval, generate).
    pub fn frozen() -> Self {
        TrainSpec::default()
    }

    /// The recipe's pre-training stage 1: the input embedding only.
    pub fn embeddings_only() -> Self {
        TrainSpec {
            embed_tokens: true,
            ..TrainSpec::default()
        }
    }
}

/// The map from HF names to ranges of the frozen and trainable flat buffers.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    entries: Vec<ParamEntry>,
    by_name: HashMap<String, usize>,
    frozen_len: usize,
    trainable_len: usize,
}

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

impl ParamLayout {
    /// The layout of `config` under `spec`. Tensors appear in HF order (embedding, then each layer's
    /// norms and projections, with each adapted projection's `lora_A`, `lora_B` right after it,
    /// final norm, lm_head). A tied `lm_head` is no entry of its own: it is the embedding, trainable
    /// if either `embed_tokens` or `lm_head` is.
    pub fn new(config: &LlamaConfig, spec: &TrainSpec) -> Result<Self> {
        config.validate()?;
        let (c, f, kv, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.kv_dim(),
            config.vocab_size,
        );
        let mut layout = ParamLayout {
            entries: Vec::new(),
            by_name: HashMap::new(),
            frozen_len: 0,
            trainable_len: 0,
        };
        let group = |t: bool| if t { Group::Trainable } else { Group::Frozen };
        let tied = config.tie_word_embeddings;
        layout.push(
            "model.embed_tokens.weight".into(),
            vec![v, c],
            Kind::Embedding,
            group(spec.embed_tokens || (tied && spec.lm_head)),
        );
        for l in 0..config.num_hidden_layers {
            layout.push(
                format!("model.layers.{l}.input_layernorm.weight"),
                vec![c],
                Kind::Norm {
                    layer: l,
                    post: false,
                },
                group(spec.norms),
            );
            for proj in Proj::ALL {
                if proj == Proj::Gate {
                    layout.push(
                        format!("model.layers.{l}.post_attention_layernorm.weight"),
                        vec![c],
                        Kind::Norm {
                            layer: l,
                            post: true,
                        },
                        group(spec.norms),
                    );
                }
                let (out, inp) = proj_shape(proj, c, f, kv);
                let prefix = proj.prefix(l);
                layout.push(
                    format!("{prefix}.weight"),
                    vec![out, inp],
                    Kind::Proj { layer: l, proj },
                    group(spec.projections),
                );
                if let Some(lora) = &spec.lora
                    && lora.targets_proj(proj)
                {
                    layout.push(
                        format!("{prefix}.lora_A.weight"),
                        vec![lora.r, inp],
                        Kind::LoraA { layer: l, proj },
                        Group::Trainable,
                    );
                    layout.push(
                        format!("{prefix}.lora_B.weight"),
                        vec![out, lora.r],
                        Kind::LoraB { layer: l, proj },
                        Group::Trainable,
                    );
                }
            }
        }
        layout.push(
            "model.norm.weight".into(),
            vec![c],
            Kind::FinalNorm,
            group(spec.norms),
        );
        if !tied {
            layout.push(
                "lm_head.weight".into(),
                vec![v, c],
                Kind::LmHead,
                group(spec.lm_head),
            );
        }
        if layout.trainable_len == 0 && spec != &TrainSpec::frozen() {
            bail!("the training spec selects no tensor");
        }
        Ok(layout)
    }

    fn push(&mut self, name: String, shape: Vec<usize>, kind: Kind, group: Group) {
        let numel: usize = shape.iter().product();
        let len = match group {
            Group::Frozen => &mut self.frozen_len,
            Group::Trainable => &mut self.trainable_len,
        };
        let start = *len;
        *len = align(start + numel);
        self.by_name.insert(name.clone(), self.entries.len());
        self.entries.push(ParamEntry {
            name,
            shape,
            kind,
            group,
            range: start..start + numel,
        });
    }

    /// Every tensor, in layout order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// The tensor named `name` (HF name; `lm_head.weight` of a tied model resolves to the embedding).
    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        let idx = self.by_name.get(name).or_else(|| {
            (name == "lm_head.weight")
                .then(|| self.by_name.get("model.embed_tokens.weight"))
                .flatten()
        })?;
        Some(&self.entries[*idx])
    }

    /// The tensor of `kind`; panics if the layout has none (a bug in the caller's kind).
    pub fn loc(&self, kind: Kind) -> Loc {
        let kind = match kind {
            Kind::LmHead if !self.by_name.contains_key("lm_head.weight") => Kind::Embedding,
            k => k,
        };
        self.entries
            .iter()
            .find(|e| e.kind == kind)
            .unwrap_or_else(|| panic!("no parameter of kind {kind:?} in this layout"))
            .loc()
    }

    /// The tensor of `kind`, if the layout has one (LoRA factors exist only on adapted projections).
    pub fn try_loc(&self, kind: Kind) -> Option<Loc> {
        self.entries
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.loc())
    }

    /// Length of the frozen flat buffer (elements, padding included).
    pub fn frozen_len(&self) -> usize {
        self.frozen_len
    }

    /// Length of the trainable flat buffer, of the gradient buffer and of each optimizer moment.
    pub fn trainable_len(&self) -> usize {
        self.trainable_len
    }

    /// Number of trainable parameters (padding excluded).
    pub fn num_trainable(&self) -> usize {
        self.group_numel(Group::Trainable)
    }

    /// Number of parameters (padding excluded; a tied embedding counted once).
    pub fn num_params(&self) -> usize {
        self.entries.iter().map(|e| e.numel()).sum()
    }

    fn group_numel(&self, g: Group) -> usize {
        self.entries
            .iter()
            .filter(|e| e.group == g)
            .map(|e| e.numel())
            .sum()
    }
}

/// `(out, in)` of a projection's HF `Linear` weight.
pub fn proj_shape(proj: Proj, c: usize, f: usize, kv: usize) -> (usize, usize) {
    match proj {
        Proj::Q | Proj::O => (c, c),
        Proj::K | Proj::V => (kv, c),
        Proj::Gate | Proj::Up => (f, c),
        Proj::Down => (c, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_trainable_shares() {
        // docs/RECIPE.md §3, LLaMA-7B at vocab 49953 (and 49954 for SFT).
        let c = LlamaConfig::new(49953, 4096, 11008, 32, 32, 32);
        let all = c.num_params() as f64;
        let l = ParamLayout::new(&c, &TrainSpec::embeddings_only()).unwrap();
        assert_eq!(l.num_trainable(), 204_607_488);
        assert_eq!(l.num_params(), c.num_params());
        assert_eq!(
            format!("{:.2}", 100.0 * l.num_trainable() as f64 / all),
            "2.97"
        );
        let qkvo = [Proj::Q, Proj::K, Proj::V, Proj::O];
        let pt2 = TrainSpec {
            embed_tokens: true,
            lm_head: true,
            lora: Some(LoraConfig::new(8, 32.0, 0.05, &qkvo, 0).unwrap()),
            ..TrainSpec::default()
        };
        let l = ParamLayout::new(&c, &pt2).unwrap();
        assert_eq!(
            l.num_trainable(),
            2 * 204_607_488 + 32 * 4 * (4096 * 8 + 8 * 4096)
        );
        // The recipe's shares count the LoRA factors in the total.
        let share = 100.0 * l.num_trainable() as f64 / l.num_params() as f64;
        assert_eq!(format!("{share:.2}"), "6.06");
        // Instruction tuning: LoRA on all seven projections, vocab 49954.
        let c = LlamaConfig::new(49954, 4096, 11008, 32, 32, 32);
        let sft = TrainSpec {
            lora: Some(LoraConfig::new(8, 32.0, 0.05, &Proj::ALL, 0).unwrap()),
            ..pt2
        };
        let l = ParamLayout::new(&c, &sft).unwrap();
        let want = 2 * 49954 * 4096 + 32 * (4 * 65536 + 3 * (4096 * 8 + 8 * 11008));
        assert_eq!(l.num_trainable(), want);
        let share = 100.0 * l.num_trainable() as f64 / l.num_params() as f64;
        assert_eq!(format!("{share:.2}"), "6.22");
    }

    #[test]
    fn ranges_disjoint_aligned_and_named() {
        let mut c = LlamaConfig::new(50, 16, 40, 2, 4, 2);
        c.tie_word_embeddings = true;
        let spec = TrainSpec {
            norms: true,
            lora: Some(LoraConfig::new(2, 4.0, 0.0, &[Proj::V, Proj::Down], 0).unwrap()),
            ..TrainSpec::default()
        };
        let l = ParamLayout::new(&c, &spec).unwrap();
        for g in [Group::Frozen, Group::Trainable] {
            let mut rs: Vec<_> = l
                .entries()
                .iter()
                .filter(|e| e.group == g)
                .map(|e| e.range.clone())
                .collect();
            rs.sort_by_key(|r| r.start);
            for w in rs.windows(2) {
                assert!(w[0].end <= w[1].start);
            }
            assert!(rs.iter().all(|r| r.start % ALIGN == 0));
        }
        assert_eq!(
            l.get("lm_head.weight").unwrap().name,
            "model.embed_tokens.weight"
        );
        let a = l.get("model.layers.1.mlp.down_proj.lora_A.weight").unwrap();
        assert_eq!((a.shape.clone(), a.group), (vec![2, 40], Group::Trainable));
        assert!(l.get("model.layers.1.mlp.up_proj.lora_A.weight").is_none());
        assert_eq!(l.loc(Kind::LmHead), l.loc(Kind::Embedding));
    }
}
