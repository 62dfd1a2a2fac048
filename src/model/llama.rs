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

use super::config::LlamaConfig;
use super::lora::{LoraConfig, Proj, dropout_key, init_lora_a};
use super::params::{Group, Kind, Loc, ParamEntry, ParamLayout, TrainSpec, proj_shape};
use super::weights::{Checkpoint, HostTensor, SaveOptions, save_model_dir};
use crate::backend::{Backend, Role};
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
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ super::lora::mix64(index as u64));
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
            let s = seed ^ super::lora::mix64(index as u64);
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
            n,
            vsz,
            self.config.hidden_size,
            false,
            true,
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
            n,
            c,
            cfg.rms_norm_eps,
        );
        drop(r);
        Ok(())
    }

    /// One decoder layer's forward: `la =` everything its backward reads, `next =` (when given)
    /// the residual stream after the layer, from its input `x`. With a KV cache, this layer's new
    /// keys/values are appended at `past` and attention runs over the cache (inference only).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        la: &mut LayerActs<B>,
        x: &B::Buf,
        mut next: Option<&mut B::Buf>,
        ctx: &LinCtx,
        (b, t, past): (usize, usize, usize),
        cache: Option<&mut KvCache<B>>,
    ) -> Result<()> {
        let be = &*self.backend;
        let cfg = &self.config;
        let (li, n) = (ctx.li, ctx.n);
        let ll = &self.layers[li];
        let (c, h, hkv, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        be.rmsnorm_forward(
            vm(be, &mut la.ln1),
            vm(be, &mut la.rstd1),
            v(be, x),
            self.p(ll.ln1),
            n,
            c,
            cfg.rms_norm_eps,
        );
        let [lq, lk, lv, lo, lg, lu, ld] = &mut la.lora;
        self.linear_forward(
            Some(&mut la.q),
            0.0,
            &la.ln1,
            lq.as_mut(),
            &ll.proj[0],
            Proj::Q,
            ctx,
        )?;
        self.linear_forward(
            Some(&mut la.k),
            0.0,
            &la.ln1,
            lk.as_mut(),
            &ll.proj[1],
            Proj::K,
            ctx,
        )?;
        self.linear_forward(
            Some(&mut la.v),
            0.0,
            &la.ln1,
            lv.as_mut(),
            &ll.proj[2],
            Proj::V,
            ctx,
        )?;
        if ctx.train {
            ensure!(cache.is_none(), "a training forward takes no KV cache");
            be.attention_rope_forward(
                vm(be, &mut la.att),
                vm(be, &mut la.lse),
                &mut la.q,
                &mut la.k,
                v(be, &la.v),
                b,
                t,
                h,
                hkv,
                d,
                cfg.rope_theta,
                past,
            );
        } else {
            let qkv = (&mut la.q, &mut la.k, &la.v);
            self.attention_inference(qkv, &mut la.att, &mut la.lse, (b, t, past), li, cache);
        }
        be.copy(vm(be, &mut la.resid_mid), v(be, x));
        self.linear_forward(
            Some(&mut la.resid_mid),
            1.0,
            &la.att,
            lo.as_mut(),
            &ll.proj[3],
            Proj::O,
            ctx,
        )?;
        be.rmsnorm_forward(
            vm(be, &mut la.ln2),
            vm(be, &mut la.rstd2),
            v(be, &la.resid_mid),
            self.p(ll.ln2),
            n,
            c,
            cfg.rms_norm_eps,
        );
        self.linear_forward(
            Some(&mut la.gate),
            0.0,
            &la.ln2,
            lg.as_mut(),
            &ll.proj[4],
            Proj::Gate,
            ctx,
        )?;
        self.linear_forward(
            Some(&mut la.up),
            0.0,
            &la.ln2,
            lu.as_mut(),
            &ll.proj[5],
            Proj::Up,
            ctx,
        )?;
        be.swiglu_forward(vm(be, &mut la.hid), v(be, &la.gate), v(be, &la.up));
        // A recompute passes no `next`: the down projection's output (the next layer's input) is
        // not needed again, only its LoRA intermediates are.
        if let Some(next) = next.as_deref_mut() {
            be.copy(vm(be, next), v(be, &la.resid_mid));
        }
        self.linear_forward(
            next,
            1.0,
            &la.hid,
            ld.as_mut(),
            &ll.proj[6],
            Proj::Down,
            ctx,
        )?;
        Ok(())
    }

    /// Inference attention of one layer (`forward_logits`, generation): RoPE on `la.q`/`la.k` in
    /// place, the new keys/values appended to the cache (when given), then causal attention over
    /// this step's keys, or over the cache when it already holds `past > 0` positions.
    fn attention_inference(
        &self,
        (q, k, vb): (&mut B::Buf, &mut B::Buf, &B::Buf),
        att: &mut B::Buf,
        lse: &mut B::Buf,
        (b, t, past): (usize, usize, usize),
        li: usize,
        mut cache: Option<&mut KvCache<B>>,
    ) {
        let be = &*self.backend;
        let cfg = &self.config;
        let (h, hkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let kvd = hkv * d;
        be.rope_forward(vm(be, q), b, t, h, d, cfg.rope_theta, past);
        be.rope_forward(vm(be, k), b, t, hkv, d, cfg.rope_theta, past);
        if let Some(kc) = cache.as_deref_mut() {
            // Rows past..past+t of each sequence's cache = the new keys/values.
            let tmax = kc.tmax;
            for bi in 0..b {
                let src = bi * t * kvd..(bi + 1) * t * kvd;
                let dst = (bi * tmax + past) * kvd..(bi * tmax + past + t) * kvd;
                be.copy(
                    be.view_mut(&mut kc.k[li], dst.clone()),
                    be.view(k, src.clone()),
                );
                be.copy(be.view_mut(&mut kc.v[li], dst), be.view(vb, src));
            }
        }
        match cache.as_deref() {
            Some(kc) if past > 0 => be.attention_cached_forward(
                vm(be, att),
                v(be, q),
                v(be, &kc.k[li]),
                v(be, &kc.v[li]),
                b,
                t,
                past,
                kc.tmax,
                h,
                hkv,
                d,
            ),
            _ => be.attention_forward(
                vm(be, att),
                vm(be, lse),
                v(be, q),
                v(be, k),
                v(be, vb),
                b,
                t,
                h,
                hkv,
                d,
            ),
        }
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
            v(be, &acts.normf),
            self.p(self.lm_head),
            &acts.targets,
            n,
            self.config.hidden_size,
            vsz,
        );
        // Only the sum comes back: one f64, whatever the batch.
        acts.loss_sum = be.sum(v(be, &acts.losses))?;
        Ok(if count == 0 {
            0.0
        } else {
            (acts.loss_sum / count as f64) as f32
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        mut out: Option<&mut B::Buf>,
        beta: f32,
        x: &B::Buf,
        lora_acts: Option<&mut LoraActs<B>>,
        pl: &ProjLocs,
        proj: Proj,
        ctx: &LinCtx,
    ) -> Result<()> {
        let be = &*self.backend;
        let n = ctx.n;
        // out[n,out] (+)= x[n,in] · W[out,in]ᵀ (no `out`: only the LoRA intermediates)
        if let Some(out) = out.as_deref_mut() {
            be.matmul(
                vm(be, out),
                v(be, x),
                self.p(pl.w),
                n,
                pl.out,
                pl.inp,
                false,
                true,
                1.0,
                beta,
            );
        }
        if let (Some((a, bl)), Some(la)) = (pl.lora, lora_acts) {
            let lora = self.lora().expect("LoRA locs imply a LoRA config");
            let (r, s) = (lora.r, lora.scaling());
            let xin = if ctx.dropout {
                let xd = la.xd.as_mut().expect("dropout buffers allocated");
                be.copy(vm(be, xd), v(be, x));
                be.dropout(vm(be, xd), lora.dropout, dropout_key(ctx.key, ctx.li, proj));
                &*xd
            } else {
                x
            };
            // xa[n,r] = x_d · Aᵀ;  out += s · xa · Bᵀ
            be.matmul(
                vm(be, &mut la.xa),
                v(be, xin),
                self.p(a),
                n,
                r,
                pl.inp,
                false,
                true,
                1.0,
                0.0,
            );
            if let Some(out) = out {
                be.matmul(
                    vm(be, out),
                    v(be, &la.xa),
                    self.p(bl),
                    n,
                    pl.out,
                    r,
                    false,
                    true,
                    s,
                    1.0,
                );
            }
        }
        Ok(())
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
        let (c, h, hkv, d, vsz) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
            cfg.vocab_size,
        );
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
            v(be, &acts.normf),
            self.p(lm),
            &acts.logits,
            &acts.ce_lse,
            &acts.targets,
            n,
            c,
            vsz,
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
        for (li, ll) in self.layers.iter().enumerate().rev() {
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
            let [lq, lk, lv, lo, lg, lu, ld] = &la.lora;
            // MLP: next = resid_mid + down(swiglu(gate(ln2), up(ln2)))
            self.linear_backward(
                &mut bw.dhid,
                0.0,
                &bw.dres,
                &la.hid,
                ld.as_ref(),
                &ll.proj[6],
                Proj::Down,
                &ctx,
                grads,
                &mut bw.scratch,
            )?;
            be.swiglu_backward(
                vm(be, &mut bw.dgate),
                vm(be, &mut bw.dup),
                v(be, &bw.dhid),
                v(be, &la.gate),
                v(be, &la.up),
            );
            self.linear_backward(
                &mut bw.dln,
                0.0,
                &bw.dgate,
                &la.ln2,
                lg.as_ref(),
                &ll.proj[4],
                Proj::Gate,
                &ctx,
                grads,
                &mut bw.scratch,
            )?;
            self.linear_backward(
                &mut bw.dln,
                1.0,
                &bw.dup,
                &la.ln2,
                lu.as_ref(),
                &ll.proj[5],
                Proj::Up,
                &ctx,
                grads,
                &mut bw.scratch,
            )?;
            self.norm_backward(bw, grads, &la.resid_mid, &la.rstd2, ll.ln2, n);
            // Attention: resid_mid = resid_in + o(attn(rope(q(ln1)), rope(k(ln1)), v(ln1)))
            self.linear_backward(
                &mut bw.datt,
                0.0,
                &bw.dres,
                &la.att,
                lo.as_ref(),
                &ll.proj[3],
                Proj::O,
                &ctx,
                grads,
                &mut bw.scratch,
            )?;
            be.attention_rope_backward(
                &mut bw.dq,
                &mut bw.dk,
                vm(be, &mut bw.dv),
                v(be, &bw.datt),
                v(be, &la.q),
                v(be, &la.k),
                v(be, &la.v),
                v(be, &la.att),
                v(be, &la.lse),
                b,
                t,
                h,
                hkv,
                d,
                cfg.rope_theta,
                0,
            );
            self.linear_backward(
                &mut bw.dln,
                0.0,
                &bw.dq,
                &la.ln1,
                lq.as_ref(),
                &ll.proj[0],
                Proj::Q,
                &ctx,
                grads,
                &mut bw.scratch,
            )?;
            self.linear_backward(
                &mut bw.dln,
                1.0,
                &bw.dk,
                &la.ln1,
                lk.as_ref(),
                &ll.proj[1],
                Proj::K,
                &ctx,
                grads,
                &mut bw.scratch,
            )?;
            self.linear_backward(
                &mut bw.dln,
                1.0,
                &bw.dv,
                &la.ln1,
                lv.as_ref(),
                &ll.proj[2],
                Proj::V,
                &ctx,
                grads,
                &mut bw.scratch,
            )?;
            self.norm_backward(bw, grads, &acts.resid[li], &la.rstd1, ll.ln1, n);
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

    /// `bw.dres += ∂/∂x` of `rmsnorm(x, w)` given `bw.dln`; `grads[w] +=` when `w` trains.
    fn norm_backward(
        &self,
        bw: &mut BackwardBufs<B>,
        grads: &mut B::Buf,
        x: &B::Buf,
        rstd: &B::Buf,
        w: Loc,
        n: usize,
    ) {
        let be = &*self.backend;
        let dw = if w.trainable() {
            be.view_mut(grads, w.range())
        } else {
            // A frozen weight's gradient goes to scratch (the op always writes one).
            vm(be, &mut bw.dnorm_scratch)
        };
        be.rmsnorm_backward(
            vm(be, &mut bw.dres),
            dw,
            v(be, &bw.dln),
            v(be, x),
            self.p(w),
            v(be, rstd),
            n,
            self.config.hidden_size,
        );
    }

    /// For `y = x·Wᵀ (+ s·x_d·Aᵀ·Bᵀ)` given `dy`: `dx (beta)=` the input gradient; `grads +=` the
    /// weight gradients of the trainable tensors among W, A, B.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dx: &mut B::Buf,
        dx_beta: f32,
        dy: &B::Buf,
        x: &B::Buf,
        lora_acts: Option<&LoraActs<B>>,
        pl: &ProjLocs,
        proj: Proj,
        ctx: &LinCtx,
        grads: &mut B::Buf,
        scratch: &mut LoraScratch<B>,
    ) -> Result<()> {
        let be = &*self.backend;
        let n = ctx.n;
        if pl.w.trainable() {
            // dW[out,in] += dyᵀ · x
            be.matmul(
                be.view_mut(grads, pl.w.range()),
                v(be, dy),
                v(be, x),
                pl.out,
                pl.inp,
                n,
                true,
                false,
                1.0,
                1.0,
            );
        }
        // dx[n,in] (beta)= dy · W
        be.matmul(
            vm(be, dx),
            v(be, dy),
            self.p(pl.w),
            n,
            pl.inp,
            pl.out,
            false,
            false,
            1.0,
            dx_beta,
        );
        if let (Some((a, bl)), Some(la)) = (pl.lora, lora_acts) {
            let lora = self.lora().expect("LoRA locs imply a LoRA config");
            let (r, s) = (lora.r, lora.scaling());
            let xin = if ctx.dropout {
                la.xd.as_ref().expect("dropout buffers allocated")
            } else {
                x
            };
            let dxa_range = 0..n * r;
            // dB[out,r] += s · dyᵀ · xa
            be.matmul(
                be.view_mut(grads, bl.range()),
                v(be, dy),
                v(be, &la.xa),
                pl.out,
                r,
                n,
                true,
                false,
                s,
                1.0,
            );
            // dxa[n,r] = s · dy · B
            be.matmul(
                be.view_mut(&mut scratch.dxa, dxa_range.clone()),
                v(be, dy),
                self.p(bl),
                n,
                r,
                pl.out,
                false,
                false,
                s,
                0.0,
            );
            // dA[r,in] += dxaᵀ · x_d
            be.matmul(
                be.view_mut(grads, a.range()),
                be.view(&scratch.dxa, dxa_range.clone()),
                v(be, xin),
                r,
                pl.inp,
                n,
                true,
                false,
                1.0,
                1.0,
            );
            if ctx.dropout {
                // dx += mask ⊙ (dxa · A) / (1-p), the same mask as the forward.
                let buf = scratch
                    .dxd
                    .get_mut(&pl.inp)
                    .expect("scratch per input width");
                be.matmul(
                    vm(be, buf),
                    be.view(&scratch.dxa, dxa_range),
                    self.p(a),
                    n,
                    pl.inp,
                    r,
                    false,
                    false,
                    1.0,
                    0.0,
                );
                be.dropout(
                    vm(be, buf),
                    lora.dropout,
                    dropout_key(ctx.key, ctx.li, proj),
                );
                be.axpy(vm(be, dx), 1.0, v(be, buf));
            } else {
                // dx[n,in] += dxa · A
                be.matmul(
                    vm(be, dx),
                    be.view(&scratch.dxa, dxa_range),
                    self.p(a),
                    n,
                    pl.inp,
                    r,
                    false,
                    false,
                    1.0,
                    1.0,
                );
            }
        }
        Ok(())
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

struct LoraActs<B: Backend> {
    /// `x_d · Aᵀ` `[N, r]`.
    xa: B::Buf,
    /// The dropped-out input `[N, in]`, only when the LoRA dropout is on.
    xd: Option<B::Buf>,
}

/// What one decoder layer's backward reads (besides the layer's input, kept in
/// [`Activations::resid`]).
struct LayerActs<B: Backend> {
    ln1: B::Buf,
    rstd1: B::Buf,
    /// After RoPE for inference; in training as [`Backend::attention_rope_forward`] left it
    /// (rotated by the composite default, un-rotated by a fused kernel).
    q: B::Buf,
    /// As `q`.
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    lse: B::Buf,
    resid_mid: B::Buf,
    ln2: B::Buf,
    rstd2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    hid: B::Buf,
    lora: [Option<LoraActs<B>>; 7],
}

struct LoraScratch<B: Backend> {
    dxa: B::Buf,
    /// `dx_d` per input width (only with dropout).
    dxd: std::collections::HashMap<usize, B::Buf>,
}

struct BackwardBufs<B: Backend> {
    /// The gradient of the residual stream, `[N, C]`; after backward, of the input embeddings.
    dres: B::Buf,
    dln: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    datt: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
    dhid: B::Buf,
    dnorm_scratch: B::Buf,
    scratch: LoraScratch<B>,
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
    b: usize,
    t: usize,
    /// One shared [`LayerActs`] instead of one per layer.
    checkpointed: bool,
    /// The layer whose activations `layers[0]` holds (checkpointing).
    resident: Option<usize>,
    /// Device bytes of every buffer below.
    bytes: usize,
    /// Apply the LoRA dropout (training). Off by default: eval and generation want none.
    pub training: bool,
    /// Key of the LoRA dropout masks of the next forward (and its backward). The trainer sets it
    /// per micro-step (e.g. the global micro-step number) so a resumed run draws the same masks.
    pub rng_key: u64,
    dropout_active: bool,
    has_targets: bool,
    count: usize,
    loss_sum: f64,
    ids: B::Ids,
    targets: B::Ids,
    targets_host: Vec<i32>,
    /// `resid[l]` = the input of layer `l` (`[N, C]`; `resid[0]` = the embeddings).
    resid: Vec<B::Buf>,
    /// One per layer, or one shared set with checkpointing.
    layers: Vec<LayerActs<B>>,
    resid_out: B::Buf,
    normf: B::Buf,
    normf_rstd: B::Buf,
    /// `[N, V]` logits: always for inference; for training only when the backend's lm_head +
    /// cross-entropy keeps them ([`crate::backend::LmHeadCeBuffers::logits`]), else empty.
    logits: B::Buf,
    /// The lm_head + cross-entropy's saved statistics and scratch (backend-sized, may be empty).
    ce_lse: B::Buf,
    ce_scratch: B::Buf,
    losses: B::Buf,
    bw: Option<BackwardBufs<B>>,
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
    b: usize,
    tmax: usize,
    kv_dim: usize,
    len: usize,
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
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
