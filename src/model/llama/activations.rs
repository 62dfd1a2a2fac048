//! What a forward saves for the backward ([`Activations`]) and the generation KV cache.

use super::{IGNORE_INDEX, Llama};
use crate::backend::{Backend, Role};
use anyhow::{Result, ensure};

pub(super) struct LoraActs<B: Backend> {
    /// `x_d · Aᵀ` `[N, r]`.
    pub(super) xa: B::Buf,
    /// The dropped-out input `[N, in]`, only when the LoRA dropout is on.
    pub(super) xd: Option<B::Buf>,
}

/// What one decoder layer's backward reads (besides the layer's input, kept in
/// [`Activations::resid`]).
pub(super) struct LayerActs<B: Backend> {
    pub(super) ln1: B::Buf,
    pub(super) rstd1: B::Buf,
    /// After RoPE for inference; in training as [`Backend::attention_rope_forward`] left it
    /// (rotated by the composite default, un-rotated by a fused kernel).
    pub(super) q: B::Buf,
    /// As `q`.
    pub(super) k: B::Buf,
    pub(super) v: B::Buf,
    pub(super) att: B::Buf,
    pub(super) lse: B::Buf,
    pub(super) resid_mid: B::Buf,
    pub(super) ln2: B::Buf,
    pub(super) rstd2: B::Buf,
    pub(super) gate: B::Buf,
    pub(super) up: B::Buf,
    pub(super) hid: B::Buf,
    pub(super) lora: [Option<LoraActs<B>>; 7],
}

pub(super) struct LoraScratch<B: Backend> {
    pub(super) dxa: B::Buf,
    /// `dx_d` per input width (only with dropout).
    pub(super) dxd: std::collections::HashMap<usize, B::Buf>,
}

pub(super) struct BackwardBufs<B: Backend> {
    /// The gradient of the residual stream, `[N, C]`; after backward, of the input embeddings.
    pub(super) dres: B::Buf,
    pub(super) dln: B::Buf,
    pub(super) dq: B::Buf,
    pub(super) dk: B::Buf,
    pub(super) dv: B::Buf,
    pub(super) datt: B::Buf,
    pub(super) dgate: B::Buf,
    pub(super) dup: B::Buf,
    pub(super) dhid: B::Buf,
    pub(super) dnorm_scratch: B::Buf,
    pub(super) scratch: LoraScratch<B>,
}

/// Everything a forward saves for the backward, plus the backward's scratch, for one (B, T) shape.
/// Allocate once per shape and reuse.
///
/// With gradient checkpointing (HF's `gradient_checkpointing`, per decoder layer) the forward
/// keeps only each layer's input (the residual stream, `[N, C]`) and one set of per-layer
/// buffers shared by all layers; the backward recomputes each layer's forward from its input into
/// that set just before the layer's backward (the last layer's is still there after the forward
/// and is not recomputed; a recompute skips the down projection's output, already saved as the
/// next layer's input). Costs a little less than one more forward per step; the loss and the
/// gradients are the same values (bit-identical on a deterministic backend).
pub struct Activations<B: Backend> {
    pub(super) b: usize,
    pub(super) t: usize,
    /// One shared [`LayerActs`] instead of one per layer.
    pub(super) checkpointed: bool,
    /// The layer whose activations `layers[0]` holds (checkpointing).
    pub(super) resident: Option<usize>,
    /// Device bytes of every buffer below.
    pub(super) bytes: usize,
    /// Apply the LoRA dropout (training). Off by default: eval and generation want none.
    pub training: bool,
    /// Key of the LoRA dropout masks of the next forward (and its backward). The trainer sets it
    /// per micro-step (e.g. the global micro-step number) so a resumed run draws the same masks.
    pub rng_key: u64,
    pub(super) dropout_active: bool,
    pub(super) has_targets: bool,
    pub(super) count: usize,
    pub(super) loss_sum: f64,
    pub(super) ids: B::Ids,
    pub(super) targets: B::Ids,
    pub(super) targets_host: Vec<i32>,
    /// `resid[l]` = the input of layer `l` (`[N, C]`; `resid[0]` = the embeddings).
    pub(super) resid: Vec<B::Buf>,
    /// One per layer, or one shared set with checkpointing.
    pub(super) layers: Vec<LayerActs<B>>,
    pub(super) resid_out: B::Buf,
    pub(super) normf: B::Buf,
    pub(super) normf_rstd: B::Buf,
    /// `[N, V]` logits: always for inference; for training only when the backend's lm_head +
    /// cross-entropy keeps them ([`crate::backend::LmHeadCeBuffers::logits`]), else empty.
    pub(super) logits: B::Buf,
    /// The lm_head + cross-entropy's saved statistics and scratch (backend-sized, may be empty).
    pub(super) ce_lse: B::Buf,
    pub(super) ce_scratch: B::Buf,
    pub(super) losses: B::Buf,
    pub(super) bw: Option<BackwardBufs<B>>,
}

impl<B: Backend> Activations<B> {
    /// Buffers for forward and backward of `model` at batch `b`, sequence `t`; checkpointed when
    /// the model's [`Llama::gradient_checkpointing`] is on.
    pub fn new(model: &Llama<B>, b: usize, t: usize) -> Result<Self> {
        Self::alloc(model, b, t, true, model.gradient_checkpointing)
    }

    /// Buffers for forward and backward with gradient checkpointing, whatever the model's flag.
    pub fn new_checkpointed(model: &Llama<B>, b: usize, t: usize) -> Result<Self> {
        Self::alloc(model, b, t, true, true)
    }

    /// Buffers for the forward only (eval, generation): no gradient scratch.
    pub fn new_inference(model: &Llama<B>, b: usize, t: usize) -> Result<Self> {
        Self::alloc(model, b, t, false, false)
    }

    fn alloc(
        model: &Llama<B>,
        b: usize,
        t: usize,
        backward: bool,
        checkpointed: bool,
    ) -> Result<Self> {
        ensure!(b > 0 && t > 0, "batch and sequence length must be positive");
        let be = &*model.backend;
        let cfg = &model.config;
        let n = b * t;
        let (c, f, kv, h, vsz) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.kv_dim(),
            cfg.num_attention_heads,
            cfg.vocab_size,
        );
        let bytes = std::cell::Cell::new(2 * n * std::mem::size_of::<i32>()); // ids, targets
        let alloc = |len: usize, role: Role| -> Result<B::Buf> {
            let buf = be.alloc(len, role)?;
            bytes.set(bytes.get() + be.buf_bytes(&buf));
            Ok(buf)
        };
        let act = |len: usize| alloc(len, Role::Activation);
        let stat = |len: usize| alloc(len, Role::Fp32);
        let lora = model.lora();
        let dropout = lora.is_some_and(|l| l.dropout > 0.0);
        let sets = if checkpointed { 1 } else { model.layers.len() }.min(model.layers.len());
        let mut layers = Vec::with_capacity(sets);
        // Every layer has the same shapes and LoRA targets: the shared set fits them all.
        for ll in &model.layers[..sets] {
            let mut lora_acts: [Option<LoraActs<B>>; 7] = Default::default();
            for (i, pl) in ll.proj.iter().enumerate() {
                if pl.lora.is_some() {
                    let r = lora.unwrap().r;
                    lora_acts[i] = Some(LoraActs {
                        xa: act(n * r)?,
                        xd: if dropout {
                            Some(act(n * pl.inp)?)
                        } else {
                            None
                        },
                    });
                }
            }
            layers.push(LayerActs {
                ln1: act(n * c)?,
                rstd1: stat(n)?,
                q: act(n * c)?,
                k: act(n * kv)?,
                v: act(n * kv)?,
                att: act(n * c)?,
                lse: stat(b * h * t)?,
                resid_mid: act(n * c)?,
                ln2: act(n * c)?,
                rstd2: stat(n)?,
                gate: act(n * f)?,
                up: act(n * f)?,
                hid: act(n * f)?,
                lora: lora_acts,
            });
        }
        let resid = (0..model.layers.len())
            .map(|_| act(n * c))
            .collect::<Result<_>>()?;
        let bw = if backward {
            let mut dxd = std::collections::HashMap::new();
            if dropout {
                for w in [c, f] {
                    dxd.insert(w, act(n * w)?);
                }
            }
            Some(BackwardBufs {
                dres: act(n * c)?,
                dln: act(n * c)?,
                dq: act(n * c)?,
                dk: act(n * kv)?,
                dv: act(n * kv)?,
                datt: act(n * c)?,
                dgate: act(n * f)?,
                dup: act(n * f)?,
                dhid: act(n * f)?,
                dnorm_scratch: stat(c)?,
                scratch: LoraScratch {
                    dxa: act(n * lora.map_or(1, |l| l.r))?,
                    dxd,
                },
            })
        } else {
            None
        };
        let (resid_out, normf, normf_rstd) = (act(n * c)?, act(n * c)?, stat(n)?);
        // The lm_head + cross-entropy's buffers, as the backend's fused op (or its composite
        // default) wants them; inference activations always hold the logits (`forward_logits`).
        let ce = be.lm_head_cross_entropy_buffers(n, vsz, backward);
        let logits = act(if backward { ce.logits } else { n * vsz })?;
        let (ce_lse, losses) = (stat(ce.lse)?, stat(n)?);
        let ce_scratch = act(ce.scratch)?;
        Ok(Activations {
            b,
            t,
            checkpointed,
            resident: None,
            bytes: bytes.get(),
            training: false,
            rng_key: 0,
            dropout_active: false,
            has_targets: false,
            count: 0,
            loss_sum: 0.0,
            ids: be.alloc_ids(n)?,
            targets: be.alloc_ids(n)?,
            targets_host: vec![IGNORE_INDEX; n],
            resid,
            layers,
            resid_out,
            normf,
            normf_rstd,
            logits,
            ce_lse,
            ce_scratch,
            losses,
            bw,
        })
    }

    pub fn batch(&self) -> usize {
        self.b
    }
    pub fn seq_len(&self) -> usize {
        self.t
    }
    /// Whether these activations use gradient checkpointing.
    pub fn checkpointed(&self) -> bool {
        self.checkpointed
    }
    /// Device bytes held by these activations: every float buffer at its storage size
    /// ([`Backend::buf_bytes`]) plus 4 bytes per position for the ids and the targets.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Non-ignored targets of the last forward (the loss is their mean).
    pub fn num_targets(&self) -> usize {
        self.count
    }
    /// Sum of the per-token losses of the last forward (the loss times [`Self::num_targets`]).
    pub fn loss_sum(&self) -> f64 {
        self.loss_sum
    }
    /// `[B·T, V]` logits of the last forward: always after a `forward_logits`; after a
    /// [`Llama::forward`] only on a backend whose lm_head + cross-entropy keeps them (the CPU
    /// backend's composite default does; CUDA's fused op never holds them, and training
    /// activations then hold an empty buffer here).
    pub fn logits(&self) -> &B::Buf {
        &self.logits
    }
    /// `[B·T, C]` gradient w.r.t. the input embeddings (the output of `embed_tokens`), valid after
    /// a backward.
    pub fn d_embeddings(&self) -> Option<&B::Buf> {
        self.bw.as_ref().map(|bw| &bw.dres)
    }
}

/// Per-layer key/value cache for generation: `k`/`v[b, tmax, hkv, d]` post-RoPE rows of
/// positions `0..len()`, allocated once. Filled by [`Llama::forward_logits_cached`]; every
/// sequence of the batch is at the same position (no padding).
pub struct KvCache<B: Backend> {
    pub(super) b: usize,
    pub(super) tmax: usize,
    pub(super) kv_dim: usize,
    pub(super) len: usize,
    pub(super) k: Vec<B::Buf>,
    pub(super) v: Vec<B::Buf>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `b` sequences of up to `tmax` positions of `model`.
    pub fn new(model: &Llama<B>, b: usize, tmax: usize) -> Result<Self> {
        ensure!(
            b > 0 && tmax > 0,
            "KV cache batch and length must be positive"
        );
        let be = &*model.backend;
        let kv_dim = model.config.kv_dim();
        let layers = model.config.num_hidden_layers;
        let alloc = || be.alloc(b * tmax * kv_dim, Role::Activation);
        Ok(KvCache {
            b,
            tmax,
            kv_dim,
            len: 0,
            k: (0..layers).map(|_| alloc()).collect::<Result<_>>()?,
            v: (0..layers).map(|_| alloc()).collect::<Result<_>>()?,
        })
    }
    /// Positions cached so far (the `past` of the next step).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Most positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.tmax
    }
    pub fn batch(&self) -> usize {
        self.b
    }
    /// Forget every position (the buffers are kept; stale rows are overwritten before use).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}
