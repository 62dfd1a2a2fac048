//! `LlamaForCausalLM` over flat parameter buffers: an explicit forward and a full backward, every
//! numerical op through the [`Backend`] trait (the model never sees CUDA).
//!
//! Forward, per HF `modeling_llama` (B batch, T sequence, N = B·T rows, C hidden, F ffn, V vocab):
//! embedding → per layer [RMSNorm → q,k,v (+LoRA) → RoPE(q,k) → causal GQA attention → o (+LoRA)
//! → residual → RMSNorm → gate,up (+LoRA) → SwiGLU → down (+LoRA) → residual] → RMSNorm → lm_head
//! → cross-entropy against the labels shifted left by one, ignore index -100, mean over the
//! non-ignored targets.
//!
//! Backward accumulates (`+=`) into a gradient buffer laid out like the trainable flat buffer;
//! weight-gradient GEMMs of frozen tensors are skipped, but the input gradient flows through every
//! layer, so an embedding-only run still reaches the embedding. The gradient w.r.t. the input
//! embeddings is left in the activations ([`Activations::d_embeddings`]).
//!
//! This file holds the model (construction, the forward and backward over all layers, eval);
//! `llama/layer_forward.rs` and `llama/layer_backward.rs` one decoder layer each way, and
//! `llama/activations.rs` what a forward saves ([`Activations`]) and the KV cache ([`KvCache`]).

mod activations;
mod layer_backward;
mod layer_forward;

pub use activations::{Activations, KvCache};

use super::config::LlamaConfig;
use super::lora::{LoraConfig, Proj, init_lora_a};
use super::params::{Group, Kind, Loc, ParamEntry, ParamLayout, TrainSpec, proj_shape};
use super::weights::{Checkpoint, HostTensor, SaveOptions, save_model_dir};
use crate::backend::{Backend, Role};
use crate::backend::{GemmShape, LmHeadIn, LmHeadSaved, LmHeadShape, RowShape};
use crate::util::hash::mix64;
use anyhow::{Context, Result, bail, ensure};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// The label value that contributes no loss (HF's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Where one projection's tensors live.
#[derive(Clone, Copy, Debug)]
struct ProjLocs {
    w: Loc,
    /// `(A, B)` when the projection is LoRA-adapted.
    lora: Option<(Loc, Loc)>,
    out: usize,
    inp: usize,
}

#[derive(Clone, Debug)]
struct LayerLocs {
    ln1: Loc,
    ln2: Loc,
    proj: [ProjLocs; 7],
}

/// A LLaMA causal LM on backend `B`, parameters in a frozen and a trainable flat buffer.
pub struct Llama<B: Backend> {
    backend: Arc<B>,
    config: LlamaConfig,
    spec: TrainSpec,
    layout: ParamLayout,
    frozen: B::Buf,
    trainable: B::Buf,
    embed: Loc,
    final_norm: Loc,
    lm_head: Loc,
    layers: Vec<LayerLocs>,
    /// [`Activations::new`] allocates checkpointed activations (HF's `gradient_checkpointing`).
    gradient_checkpointing: bool,
}

/// Parameters copied to the host: the two flat buffers and the layout to slice them.
pub struct HostParams {
    pub layout: ParamLayout,
    pub frozen: Vec<f32>,
    pub trainable: Vec<f32>,
}

impl HostParams {
    /// The values of tensor `name` (HF name), if the layout has it.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        let e = self.layout.get(name)?;
        Some(self.entry(e))
    }

    pub fn entry(&self, e: &ParamEntry) -> &[f32] {
        match e.group {
            Group::Frozen => &self.frozen[e.range.clone()],
            Group::Trainable => &self.trainable[e.range.clone()],
        }
    }
}

fn v<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> B::View<'a> {
    be.view(buf, 0..be.buf_len(buf))
}

fn vm<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> B::ViewMut<'a> {
    let n = be.buf_len(buf);
    be.view_mut(buf, 0..n)
}

/// HF's `_init_weights` for a LLaMA: normal(0, `initializer_range`) for linear and embedding
/// weights, ones for RMSNorm weights. Seeded per tensor from `(seed, tensor index)`.
fn random_fill(e: &ParamEntry, index: usize, std: f32, seed: u64, out: &mut [f32]) {
    match e.kind {
        Kind::Norm { .. } | Kind::FinalNorm => out.fill(1.0),
        _ => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ mix64(index as u64));
            // Box–Muller: two uniforms give two independent standard normals.
            for pair in out.chunks_mut(2) {
                let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let th = std::f64::consts::TAU * u2;
                pair[0] = (r * th.cos()) as f32 * std;
                if pair.len() > 1 {
                    pair[1] = (r * th.sin()) as f32 * std;
                }
            }
        }
    }
}

impl<B: Backend> Llama<B> {
    /// Build a model: lays out `config` under `spec`, asks `load` for each tensor's values
    /// (`load(entry, out)` fills `out` and returns `true`, or returns `false` for "no value": an
    /// error for a base tensor; LoRA factors then get PEFT's init, A kaiming-uniform from
    /// `lora.init_seed`, B zero), and uploads both flat buffers.
    pub fn new(
        backend: Arc<B>,
        config: LlamaConfig,
        spec: TrainSpec,
        mut load: impl FnMut(&ParamEntry, &mut [f32]) -> Result<bool>,
    ) -> Result<Self> {
        let layout = ParamLayout::new(&config, &spec)?;
        let mut frozen = vec![0.0f32; layout.frozen_len()];
        let mut trainable = vec![0.0f32; layout.trainable_len()];
        for e in layout.entries() {
            let out = match e.group {
                Group::Frozen => &mut frozen[e.range.clone()],
                Group::Trainable => &mut trainable[e.range.clone()],
            };
            if load(e, out)? {
                continue;
            }
            match (e.kind, &spec.lora) {
                (Kind::LoraA { layer, proj }, Some(lora)) => {
                    init_lora_a(out, e.shape[1], lora.init_seed, layer, proj)
                }
                (Kind::LoraB { .. }, _) => out.fill(0.0),
                _ => bail!("no value for tensor {}", e.name),
            }
        }
        let mut frozen_buf = backend.alloc(frozen.len(), Role::Weight)?;
        backend.upload(&mut frozen_buf, &frozen)?;
        drop(frozen);
        let mut trainable_buf = backend.alloc(trainable.len(), Role::Weight)?;
        backend.upload(&mut trainable_buf, &trainable)?;
        Self::assemble(backend, config, spec, layout, frozen_buf, trainable_buf)
    }

    fn assemble(
        backend: Arc<B>,
        config: LlamaConfig,
        spec: TrainSpec,
        layout: ParamLayout,
        frozen: B::Buf,
        trainable: B::Buf,
    ) -> Result<Self> {
        let (c, f, kv) = (
            config.hidden_size,
            config.intermediate_size,
            config.kv_dim(),
        );
        let layers = (0..config.num_hidden_layers)
            .map(|layer| LayerLocs {
                ln1: layout.loc(Kind::Norm { layer, post: false }),
                ln2: layout.loc(Kind::Norm { layer, post: true }),
                proj: Proj::ALL.map(|proj| {
                    let (out, inp) = proj_shape(proj, c, f, kv);
                    ProjLocs {
                        w: layout.loc(Kind::Proj { layer, proj }),
                        lora: layout
                            .try_loc(Kind::LoraA { layer, proj })
                            .zip(layout.try_loc(Kind::LoraB { layer, proj })),
                        out,
                        inp,
                    }
                }),
            })
            .collect();
        Ok(Llama {
            embed: layout.loc(Kind::Embedding),
            final_norm: layout.loc(Kind::FinalNorm),
            lm_head: layout.loc(Kind::LmHead),
            layers,
            gradient_checkpointing: false,
            backend,
            config,
            spec,
            layout,
            frozen,
            trainable,
        })
    }

    /// A randomly initialised model (HF's init: normal(0, `initializer_range`), norms one).
    pub fn random(
        backend: Arc<B>,
        config: LlamaConfig,
        spec: TrainSpec,
        seed: u64,
    ) -> Result<Self> {
        let std = config.initializer_range;
        let mut index = 0usize;
        Self::new(backend, config, spec, |e, out| {
            index += 1;
            if matches!(e.kind, Kind::LoraA { .. } | Kind::LoraB { .. }) {
                return Ok(false);
            }
            random_fill(e, index, std, seed, out);
            Ok(true)
        })
    }

    /// A randomly initialised model generated on the device by [`Backend::fill_uniform`] (no host
    /// copy: a 7B model's 27 GB of f32 never exist). Same scales as [`Llama::random`], not the same
    /// values: uniform `±initializer_range·√3` (HF's standard deviation) for linear and embedding
    /// weights, ones for norms, LoRA A uniform in PEFT's kaiming bound `±1/√fan_in`, LoRA B zero.
    pub fn random_on_device(
        backend: Arc<B>,
        config: LlamaConfig,
        spec: TrainSpec,
        seed: u64,
    ) -> Result<Self> {
        let layout = ParamLayout::new(&config, &spec)?;
        let mut frozen = backend.alloc(layout.frozen_len(), Role::Weight)?;
        let mut trainable = backend.alloc(layout.trainable_len(), Role::Weight)?;
        let a = config.initializer_range * 3f32.sqrt();
        for (index, e) in layout.entries().iter().enumerate() {
            let (lo, hi) = match e.kind {
                Kind::Norm { .. } | Kind::FinalNorm => (1.0, 1.0),
                Kind::LoraB { .. } => continue, // `alloc` zero-fills
                Kind::LoraA { .. } => {
                    let b = 1.0 / (e.shape[1] as f32).sqrt();
                    (-b, b)
                }
                _ => (-a, a),
            };
            let buf = match e.group {
                Group::Frozen => &mut frozen,
                Group::Trainable => &mut trainable,
            };
            let s = seed ^ mix64(index as u64);
            backend.fill_uniform(backend.view_mut(buf, e.range.clone()), s, lo, hi);
        }
        backend.synchronize()?;
        Self::assemble(backend, config, spec, layout, frozen, trainable)
    }

    /// Load `dir/config.json` and its safetensors weights (any of f32/f16/bf16, single or
    /// sharded). Every expected tensor must be present with the right shape, and no unknown tensor
    /// may be present (besides `rotary_emb.inv_freq` buffers, and `lm_head.weight` of a tied model).
    pub fn from_dir(backend: Arc<B>, dir: &Path, spec: TrainSpec) -> Result<Self> {
        let config = LlamaConfig::load(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        let layout = ParamLayout::new(&config, &spec)?;
        for name in ck.names() {
            let tied_head = name == "lm_head.weight" && config.tie_word_embeddings;
            if layout.get(name).is_none() && !name.ends_with("rotary_emb.inv_freq") && !tied_head {
                bail!(
                    "{}: unexpected tensor {name} for a LLaMA with this config",
                    ck.file_of(name).unwrap().display()
                );
            }
        }
        check_tensor_shapes(dir, &layout, &ck)?;
        Self::new(backend, config, spec, |e, out| {
            if matches!(e.kind, Kind::LoraA { .. } | Kind::LoraB { .. }) {
                return Ok(false);
            }
            ck.read_into(&e.name, &e.shape, out)?;
            Ok(true)
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    pub fn spec(&self) -> &TrainSpec {
        &self.spec
    }
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.spec.lora.as_ref()
    }
    /// Whether [`Activations::new`] recomputes each layer in the backward instead of keeping its
    /// activations (HF's `gradient_checkpointing_enable`); see [`Activations`].
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// The trainable flat buffer (layout: [`ParamLayout`] entries with `Group::Trainable`).
    pub fn trainable(&self) -> &B::Buf {
        &self.trainable
    }
    /// The trainable flat buffer, for the optimizer to update in place.
    pub fn trainable_mut(&mut self) -> &mut B::Buf {
        &mut self.trainable
    }
    /// The frozen flat buffer.
    pub fn frozen(&self) -> &B::Buf {
        &self.frozen
    }
    /// Mutable frozen buffer (merging LoRA into base weights, resizing).
    pub fn frozen_mut(&mut self) -> &mut B::Buf {
        &mut self.frozen
    }

    /// A zero gradient buffer with the trainable layout (fp32 on every backend).
    pub fn alloc_grads(&self) -> Result<B::Buf> {
        self.backend.alloc(self.layout.trainable_len(), Role::Fp32)
    }

    /// Both flat buffers copied to the host.
    pub fn download_params(&self) -> Result<HostParams> {
        let mut frozen = vec![0.0; self.layout.frozen_len()];
        self.backend.download(&self.frozen, &mut frozen)?;
        let mut trainable = vec![0.0; self.layout.trainable_len()];
        self.backend.download(&self.trainable, &mut trainable)?;
        Ok(HostParams {
            layout: self.layout.clone(),
            frozen,
            trainable,
        })
    }

    /// The base model's tensors under their HF names (no LoRA factors; a tied model has no
    /// `lm_head.weight`), ready for [`crate::model::weights::save_model_dir`].
    pub fn export_hf<'a>(&self, host: &'a HostParams) -> Vec<HostTensor<'a>> {
        host.layout
            .entries()
            .iter()
            .filter(|e| !matches!(e.kind, Kind::LoraA { .. } | Kind::LoraB { .. }))
            .map(|e| HostTensor {
                name: e.name.clone(),
                shape: e.shape.clone(),
                data: Cow::Borrowed(host.entry(e)),
            })
            .collect()
    }

    /// Save the base model (config + weights, no LoRA) as an HF directory, atomically.
    pub fn save_hf(&self, dir: &Path, opts: SaveOptions) -> Result<()> {
        let host = self.download_params()?;
        save_model_dir(dir, &self.config, &self.export_hf(&host), opts)
    }

    fn p(&self, loc: Loc) -> B::View<'_> {
        match loc.group {
            Group::Frozen => self.backend.view(&self.frozen, loc.range()),
            Group::Trainable => self.backend.view(&self.trainable, loc.range()),
        }
    }

    /// A profiler range named `name` (see [`Backend::range_push`]), closed when dropped.
    fn range(&self, name: &str) -> RangeGuard<'_, B> {
        self.backend.range_push(name);
        RangeGuard(&*self.backend)
    }

    // ---- forward ------------------------------------------------------------------------------

    /// `acts.logits[B·T, V] =` the logits for `ids` (`[B, T]` row-major, every id in `0..V`).
    pub fn forward_logits(&self, acts: &mut Activations<B>, ids: &[i32]) -> Result<()> {
        self.forward_logits_cached(acts, ids, None)
    }

    /// `acts.logits[B·T, V] =` the logits for `ids` (`[B, T]`), the continuation of the
    /// `past = cache.len()` positions already in `cache` (when given): RoPE at positions
    /// `past..past+T`, each layer's new post-RoPE keys/values appended to the cache, attention
    /// over the whole cache; `cache.len() += T`. With an empty cache (or none) the arithmetic is
    /// exactly [`Self::forward_logits`]'s (the regular causal attention), so a generation's first
    /// step equals `eval`'s forward bit for bit. Inference only: no backward after a cached step.
    pub fn forward_logits_cached(
        &self,
        acts: &mut Activations<B>,
        ids: &[i32],
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<()> {
        let (n, vsz) = (acts.b * acts.t, self.config.vocab_size);
        ensure!(
            self.backend.buf_len(&acts.logits) >= n * vsz,
            "these activations hold no logits (training activations on a backend whose fused \
             lm_head + cross-entropy never materialises them): use Activations::new_inference"
        );
        self.forward_hidden(acts, ids, cache.as_deref_mut(), false)?;
        let be = &*self.backend;
        let _r = self.range("lm_head");
        be.matmul(
            be.view_mut(&mut acts.logits, 0..n * vsz),
            v(be, &acts.normf),
            self.p(self.lm_head),
            GemmShape::nt(n, vsz, self.config.hidden_size),
            1.0,
            0.0,
        );
        if let Some(kc) = cache {
            kc.len += acts.t;
        }
        Ok(())
    }

    /// `acts.normf[B·T, C] =` the final-normed hidden states for `ids` (everything of the forward
    /// before the lm_head), continuing `cache` as [`Self::forward_logits_cached`] describes (which
    /// advances `cache.len()`, not this). `train`: the training forward (attention through the
    /// backend's fused [`Backend::attention_rope_forward`]; no cache).
    fn forward_hidden(
        &self,
        acts: &mut Activations<B>,
        ids: &[i32],
        mut cache: Option<&mut KvCache<B>>,
        train: bool,
    ) -> Result<()> {
        let be = &*self.backend;
        let (b, t) = (acts.b, acts.t);
        let n = b * t;
        let cfg = &self.config;
        let (c, kvd) = (cfg.hidden_size, cfg.kv_dim());
        ensure!(
            ids.len() == n,
            "got {} token ids for a batch of {b}×{t}",
            ids.len()
        );
        let past = cache.as_ref().map_or(0, |kc| kc.len);
        if let Some(kc) = cache.as_ref() {
            ensure!(
                kc.b == b && kc.k.len() == self.layers.len() && kc.kv_dim == kvd,
                "KV cache for batch {} does not fit this model/batch ({b})",
                kc.b
            );
            ensure!(
                past + t <= kc.tmax,
                "KV cache full: {past} cached + {t} new positions exceed its {} positions",
                kc.tmax
            );
        }
        for (i, &id) in ids.iter().enumerate() {
            if id < 0 || id as usize >= cfg.vocab_size {
                bail!(
                    "token id {id} at position {} of sequence {} is outside the vocabulary (size {})",
                    i % t,
                    i / t,
                    cfg.vocab_size
                );
            }
        }
        be.upload_ids(&mut acts.ids, ids)?;
        acts.has_targets = false;
        acts.dropout_active = acts.training && self.lora().is_some_and(|l| l.dropout > 0.0);
        let key = acts.rng_key;
        let dropout = acts.dropout_active;

        {
            let _r = self.range("embedding");
            be.embedding_forward(
                vm(be, &mut acts.resid[0]),
                &acts.ids,
                self.p(self.embed),
                n,
                c,
            );
        }
        for li in 0..self.layers.len() {
            let _r = self.range(&format!("layer {li} fwd"));
            let (cur, rest) = acts.resid.split_at_mut(li + 1);
            let next = match rest.first_mut() {
                Some(nr) => nr,
                None => &mut acts.resid_out,
            };
            let ctx = LinCtx {
                n,
                li,
                key,
                dropout,
                train,
            };
            let la = &mut acts.layers[if acts.checkpointed { 0 } else { li }];
            self.layer_forward(
                la,
                &cur[li],
                Some(next),
                &ctx,
                (b, t, past),
                cache.as_deref_mut(),
            )?;
        }
        // The shared set (checkpointing) now holds the last layer's activations.
        acts.resident = self.layers.len().checked_sub(1);
        let r = self.range("final norm");
        be.rmsnorm_forward(
            vm(be, &mut acts.normf),
            vm(be, &mut acts.normf_rstd),
            v(be, &acts.resid_out),
            self.p(self.final_norm),
            RowShape { n, c },
            cfg.rms_norm_eps,
        );
        drop(r);
        Ok(())
    }

    /// The mean cross-entropy of `ids` against `labels` (both `[B, T]`; HF semantics: position
    /// `t` predicts `labels[t+1]`, `-100` ignored, mean over the non-ignored targets). Leaves the
    /// logits and everything the backward needs in `acts`. With no target at all the loss is 0
    /// (HF would give NaN) and the backward adds nothing.
    pub fn forward(&self, acts: &mut Activations<B>, ids: &[i32], labels: &[i32]) -> Result<f32> {
        let (b, t, vsz) = (acts.b, acts.t, self.config.vocab_size);
        let n = b * t;
        ensure!(
            labels.len() == n,
            "got {} labels for a batch of {b}×{t}",
            labels.len()
        );
        // Shift: target of (bi, ti) is labels[bi, ti+1]; the last position has none.
        let mut count = 0usize;
        for bi in 0..b {
            for ti in 0..t {
                let tgt = if ti + 1 < t {
                    labels[bi * t + ti + 1]
                } else {
                    IGNORE_INDEX
                };
                if tgt != IGNORE_INDEX {
                    if tgt < 0 || tgt as usize >= vsz {
                        bail!(
                            "label {tgt} at position {} of sequence {bi} is outside the vocabulary (size {vsz}) and is not -100",
                            ti + 1
                        );
                    }
                    count += 1;
                }
                acts.targets_host[bi * t + ti] = tgt;
            }
        }
        // Before the layers: an upload synchronizes the stream, so after them it would make the
        // host wait for the whole forward before queueing the loss.
        let be = &*self.backend;
        be.upload_ids(&mut acts.targets, &acts.targets_host)?;
        self.forward_hidden(acts, ids, None, true)?;
        acts.count = count;
        acts.has_targets = true;
        let _r = self.range("lm_head+CE");
        be.lm_head_cross_entropy_forward(
            vm(be, &mut acts.losses),
            &mut acts.ce_lse,
            &mut acts.logits,
            &mut acts.ce_scratch,
            LmHeadIn {
                x: v(be, &acts.normf),
                w: self.p(self.lm_head),
                targets: &acts.targets,
            },
            LmHeadShape {
                n,
                c: self.config.hidden_size,
                v: vsz,
            },
        );
        // Only the sum comes back: one f64, whatever the batch.
        acts.loss_sum = be.sum(v(be, &acts.losses))?;
        Ok(if count == 0 {
            0.0
        } else {
            (acts.loss_sum / count as f64) as f32
        })
    }

    // ---- backward -----------------------------------------------------------------------------

    /// `grads +=` `scale · ∂loss/∂θ` for every trainable tensor (`grads` has the trainable layout,
    /// see [`Llama::alloc_grads`]), where `loss` is what the last [`Llama::forward`] on `acts`
    /// returned. `scale` carries a loss scale or a micro-batch weight for gradient accumulation.
    /// Afterwards [`Activations::d_embeddings`] holds `scale · ∂loss/∂(input embeddings)`.
    pub fn backward(
        &self,
        acts: &mut Activations<B>,
        grads: &mut B::Buf,
        scale: f32,
    ) -> Result<()> {
        self.backward_with(acts, grads, scale, &mut |_, _| {})
    }

    /// [`Llama::backward`], calling `on_ready(grads, range)` for each trainable tensor's range of
    /// `grads` as soon as the backward will add nothing more to it: the final norm and lm_head
    /// first, then each layer's tensors (last layer first), the embedding (and a tied lm_head)
    /// last. For overlapping the gradient reduce-scatter with the backward (`Zero2::grads_ready`).
    /// A batch without targets reports nothing (its gradient is zero).
    pub fn backward_with(
        &self,
        acts: &mut Activations<B>,
        grads: &mut B::Buf,
        scale: f32,
        on_ready: &mut dyn FnMut(&B::Buf, Range<usize>),
    ) -> Result<()> {
        let be = &*self.backend;
        ensure!(
            acts.has_targets,
            "backward needs a forward with labels first"
        );
        ensure!(
            be.buf_len(grads) == self.layout.trainable_len(),
            "gradient buffer has {} elements, the trainable layout {}",
            be.buf_len(grads),
            self.layout.trainable_len()
        );
        let cfg = &self.config;
        let (b, t) = (acts.b, acts.t);
        let n = b * t;
        let (c, vsz) = (cfg.hidden_size, cfg.vocab_size);
        let bw = acts
            .bw
            .as_mut()
            .context("these activations were allocated for inference only")?;
        be.zero(vm(be, &mut bw.dres));
        if acts.count == 0 {
            return Ok(());
        }
        let r = self.range("lm_head+CE bwd");
        // logits = normf · lm_headᵀ; dln =, the lm_head's gradient += (when trainable).
        let lm = self.lm_head;
        be.lm_head_cross_entropy_backward(
            vm(be, &mut bw.dln),
            lm.trainable().then(|| be.view_mut(grads, lm.range())),
            &mut acts.ce_scratch,
            LmHeadSaved {
                x: v(be, &acts.normf),
                w: self.p(lm),
                logits: &acts.logits,
                lse: &acts.ce_lse,
                targets: &acts.targets,
            },
            LmHeadShape { n, c, v: vsz },
            scale / acts.count as f32,
        );
        drop(r);
        let r = self.range("final norm bwd");
        self.norm_backward(
            bw,
            grads,
            &acts.resid_out,
            &acts.normf_rstd,
            self.final_norm,
            n,
        );
        drop(r);
        self.ready_where(grads, on_ready, |k| {
            matches!(k, Kind::FinalNorm | Kind::LmHead)
        });
        let key = acts.rng_key;
        let dropout = acts.dropout_active;
        for li in (0..self.layers.len()).rev() {
            let ctx = LinCtx {
                n,
                li,
                key,
                dropout,
                train: true,
            };
            if acts.checkpointed && acts.resident != Some(li) {
                // Gradient checkpointing: rerun this layer's forward from its saved input into the
                // shared set (the same ops on the same inputs, and the LoRA dropout masks are a
                // function of (key, layer, proj), so every value is the forward's). Its output,
                // layer li+1's input, is not needed again and is not recomputed.
                let _r = self.range(&format!("layer {li} recompute"));
                self.layer_forward(
                    &mut acts.layers[0],
                    &acts.resid[li],
                    None,
                    &ctx,
                    (b, t, 0),
                    None,
                )?;
                acts.resident = Some(li);
            }
            let _r = self.range(&format!("layer {li} bwd"));
            let la = &acts.layers[if acts.checkpointed { 0 } else { li }];
            self.layer_backward(la, &acts.resid[li], &ctx, (b, t), bw, grads)?;
            self.ready_where(grads, on_ready, |k| match k {
                Kind::Norm { layer, .. }
                | Kind::Proj { layer, .. }
                | Kind::LoraA { layer, .. }
                | Kind::LoraB { layer, .. } => layer == li,
                _ => false,
            });
        }
        if self.embed.trainable() {
            let _r = self.range("embedding bwd");
            be.embedding_backward(
                be.view_mut(grads, self.embed.range()),
                v(be, &bw.dres),
                &acts.ids,
                n,
                c,
            );
        }
        self.ready_where(grads, on_ready, |k| k == Kind::Embedding);
        Ok(())
    }

    /// `on_ready(grads, range)` for every trainable entry whose kind satisfies `pick`.
    fn ready_where(
        &self,
        grads: &B::Buf,
        on_ready: &mut dyn FnMut(&B::Buf, Range<usize>),
        pick: impl Fn(Kind) -> bool,
    ) {
        for e in self.layout.entries() {
            if e.group == Group::Trainable && pick(e.kind) {
                on_ready(grads, e.range.clone());
            }
        }
    }
}

/// Closes a [`Backend::range_push`] range when dropped (also on an early `?` return).
struct RangeGuard<'a, B: Backend>(&'a B);

impl<B: Backend> Drop for RangeGuard<'_, B> {
    fn drop(&mut self) {
        self.0.range_pop();
    }
}

/// Per-projection context of a forward/backward call.
struct LinCtx {
    n: usize,
    li: usize,
    key: u64,
    dropout: bool,
    /// A training forward (or its recompute): attention via the fused
    /// [`Backend::attention_rope_forward`], whose saved q/k its backward reads.
    train: bool,
}

/// Mean token cross-entropy of `model` over `seqs` (each a full sequence, no padding; every
/// position but the first is predicted), and the number of predicted tokens. Sequences run one at
/// a time at their own length (activations reused while the length repeats). Errors name the
/// offending sequence.
pub fn eval_loss<B: Backend>(model: &Llama<B>, seqs: &[Vec<i32>]) -> Result<(f64, usize)> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut acts: Option<Activations<B>> = None;
    let (mut sum, mut count) = (0.0f64, 0usize);
    for i in order {
        let s = &seqs[i];
        if s.is_empty() {
            bail!("sequence {i} is empty");
        }
        if acts.as_ref().is_none_or(|a| a.seq_len() != s.len()) {
            drop(acts.take()); // free the previous shape first
            acts = Some(Activations::new_inference(model, 1, s.len())?);
        }
        let a = acts.as_mut().unwrap();
        model
            .forward(a, s, s)
            .with_context(|| format!("sequence {i}"))?;
        sum += a.loss_sum();
        count += a.num_targets();
    }
    ensure!(
        count > 0,
        "no predicted positions (every sequence has fewer than 2 tokens)"
    );
    Ok((sum / count as f64, count))
}

/// Every tensor the config implies must be present in `ck` with its shape, checked before anything
/// is allocated: a config.json with enormous sizes fails here, naming the tensor.
fn check_tensor_shapes(dir: &Path, layout: &ParamLayout, ck: &Checkpoint) -> Result<()> {
    for e in layout.entries() {
        if matches!(e.kind, Kind::LoraA { .. } | Kind::LoraB { .. }) {
            continue;
        }
        match ck.info(&e.name) {
            None => bail!(
                "{}: missing tensor {} (config.json implies shape {:?})",
                dir.display(),
                e.name,
                e.shape
            ),
            Some(info) if info.shape != e.shape => bail!(
                "{}: tensor {} has shape {:?}, config.json implies {:?}",
                ck.file_of(&e.name).unwrap().display(),
                e.name,
                info.shape,
                e.shape
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Check a model directory's config.json against its tensors (names, shapes, sizes) without
/// loading or allocating the weights.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    let config = LlamaConfig::load(&dir.join("config.json"))?;
    let ck = Checkpoint::open(dir)?;
    let layout = ParamLayout::new(&config, &TrainSpec::frozen())?;
    check_tensor_shapes(dir, &layout, &ck)
}
