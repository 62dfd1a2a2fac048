//! Text generation with a KV cache: sampling (greedy / temperature / top-k / top-p / repetition
//! penalty, HF `generate` semantics), the decode loop, incremental detokenization for streaming,
//! and loading "model dir + PEFT adapters" merged into one ready model on any backend. Prompt
//! templates and their encoding live with the SFT data they must match (`data::sft`).
//!
//! The demo and `zhllama generate` both go through:
//! ```no_run
//! # use zhllama::model::generate::*;
//! # use zhllama::data::sft::Template;
//! # fn main() -> anyhow::Result<()> {
//! let enc = zhllama::data::TokenizerEncoder::load("tokenizer.model".as_ref())?;
//! let expect = ExpectVocab::of_tokenizer(&enc.tokenizer, "tokenizer.model".as_ref());
//! let be = std::sync::Arc::new(zhllama::backend::cpu::CpuBackend::new());
//! let model = load_merged(be, "base".as_ref(), &["sft/adapter".into()], Some(&expect))?;
//! let cfg = SamplingConfig::greedy(64);
//! let answer = generate_text(&model, &enc, "2+3=?", Template::Alpaca, &cfg)?;
//! // Or by ids, streaming each new id to a callback (EOS stops and is not returned):
//! let prompt_ids = vec![1u32, 42, 7];
//! let new_ids = generate(&model, &prompt_ids, &cfg, Some(2), |_id| {})?;
//! # let _ = (answer, new_ids); Ok(()) }
//! ```

use super::config::LlamaConfig;
use super::llama::{Activations, KvCache, Llama};
use super::params::{Kind, TrainSpec};
use super::peft::{Adapter, load_adapter, merge_one};
use super::weights::Checkpoint;
use crate::backend::Backend;
use crate::data::sft::{Template, encode_prompt};
use anyhow::{Context, Result, bail, ensure};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How the next token is chosen. HF `generate` semantics, applied in this order: repetition
/// penalty, temperature, top-k, top-p, then a draw from the softmax (or the argmax when
/// `temperature == 0`).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep the `top_k` largest logits (ties with the k-th kept); 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// Above 1 discourages tokens already in the prompt or output: a seen token's positive logit is
    /// divided by it, a negative one multiplied; 1 = off.
    pub repetition_penalty: f32,
    /// Most tokens to generate (the EOS that stops generation counts).
    pub max_new_tokens: usize,
    /// Seed of the sampling RNG (ChaCha8); the same seed gives the same tokens.
    pub seed: u64,
}

impl SamplingConfig {
    /// Argmax decoding, no penalty.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            max_new_tokens,
            seed: 0,
        }
    }

    /// Every field in its valid range.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a finite number >= 0 (0 = greedy), got {}",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p must be in (0, 1], got {}",
            self.top_p
        );
        ensure!(
            self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0,
            "repetition_penalty must be a finite number > 0, got {}",
            self.repetition_penalty
        );
        Ok(())
    }
}

impl Default for SamplingConfig {
    /// The sampling settings of Chinese-Alpaca's inference scripts: temperature 0.2, top-k 40,
    /// top-p 0.9, repetition penalty 1.1, up to 400 new tokens.
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.2,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.1,
            max_new_tokens: 400,
            seed: 42,
        }
    }
}

/// The next-token chooser: a [`SamplingConfig`] and its seeded RNG.
pub struct Sampler {
    cfg: SamplingConfig,
    rng: ChaCha8Rng,
    /// Scratch: (logit, id) pairs of the candidates.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(cfg: &SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Sampler {
            cfg: cfg.clone(),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            cand: Vec::new(),
        })
    }

    /// `logits[i] =` HF's repetition penalty over the distinct ids of `seen` (ids outside the
    /// vocabulary ignored): `l / p` where `l > 0`, `l · p` otherwise.
    pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
        if penalty == 1.0 {
            return;
        }
        let mut done = vec![false; logits.len()];
        for &id in seen {
            let i = id as usize;
            if i < logits.len() && !done[i] {
                done[i] = true;
                let l = logits[i];
                logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
            }
        }
    }

    /// The id to emit after a sequence `seen` (prompt + generated so far) whose next-token
    /// logits are `logits` (modified in place by the penalty and temperature).
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "sample: empty logits");
        Self::apply_repetition_penalty(logits, seen, self.cfg.repetition_penalty);
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        // Descending by logit, ties by id (a total order, so the draw is reproducible).
        cand.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        // NaN logits sort first under total_cmp's order for positive NaN; never pick them.
        cand.retain(|c| !c.0.is_nan());
        if cand.is_empty() {
            return argmax(logits);
        }
        // Top-k: drop everything strictly below the k-th largest (HF keeps ties).
        if self.cfg.top_k > 0 && self.cfg.top_k < cand.len() {
            let kth = cand[self.cfg.top_k - 1].0;
            let keep = cand.partition_point(|c| c.0 >= kth);
            cand.truncate(keep);
        }
        // Softmax over the survivors (f64).
        let m = cand[0].0 as f64;
        let mut probs: Vec<f64> = cand.iter().map(|c| (c.0 as f64 - m).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        // Top-p, as HF: ascending order, drop tokens while the cumulative mass ≤ 1 - top_p;
        // the most likely token always stays. In descending order: keep a prefix, dropping the
        // tail whose total mass is ≤ 1 - top_p.
        if self.cfg.top_p < 1.0 {
            let limit = 1.0 - self.cfg.top_p as f64;
            let mut tail = 0.0f64;
            let mut keep = probs.len();
            while keep > 1 {
                let t = tail + probs[keep - 1];
                if t <= limit {
                    tail = t;
                    keep -= 1;
                } else {
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let u: f64 = self.rng.random::<f64>();
        let mut acc = 0.0f64;
        for (p, c) in probs.iter().zip(cand.iter()) {
            acc += p;
            if u < acc {
                return c.1;
            }
        }
        cand[cand.len() - 1].1
    }
}

/// Index of the largest value (the first among equals; NaN never wins unless all are NaN).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The new ids after `prompt_ids` (at most `cfg.max_new_tokens`; stops after `eos`, which is not
/// returned), each passed to `on_token` as soon as it is chosen (streaming; `eos` is not passed).
/// One forward over the prompt fills a KV cache, then one single-token forward per new token.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt_ids: &[u32],
    cfg: &SamplingConfig,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(cfg)?;
    ensure!(
        !prompt_ids.is_empty(),
        "empty prompt: generation needs at least one token (e.g. BOS)"
    );
    let vocab = model.config().vocab_size;
    if let Some(&bad) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("prompt token id {bad} is outside the model's vocabulary (size {vocab})");
    }
    let mut out = Vec::new();
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let be = model.backend().clone();
    let t0 = prompt_ids.len();
    // The last new token is never fed back, so the cache needs t0 + max_new - 1 positions.
    let mut cache = KvCache::new(model, 1, t0 + cfg.max_new_tokens - 1)?;
    let mut seen: Vec<u32> = prompt_ids.to_vec();
    let ids: Vec<i32> = prompt_ids.iter().map(|&i| i as i32).collect();
    let mut logits = {
        let mut acts = Activations::new_inference(model, 1, t0)?;
        model.forward_logits_cached(&mut acts, &ids, Some(&mut cache))?;
        let mut all = vec![0.0f32; t0 * vocab];
        be.download(acts.logits(), &mut all)?;
        all.drain(..(t0 - 1) * vocab);
        all
    };
    let mut step = Activations::new_inference(model, 1, 1)?;
    loop {
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            bail!(
                "non-finite logit ({}) for token id {i} at position {}: the model's activations overflowed",
                logits[i],
                t0 + out.len()
            );
        }
        let next = sampler.sample(&mut logits, &seen);
        if Some(next) == eos {
            break;
        }
        on_token(next);
        out.push(next);
        seen.push(next);
        if out.len() == cfg.max_new_tokens {
            break;
        }
        model.forward_logits_cached(&mut step, &[next as i32], Some(&mut cache))?;
        be.download(step.logits(), &mut logits)?;
    }
    Ok(out)
}

/// Incremental detokenization for streaming: [`Self::push`] returns the text the new id adds to
/// the decoded text so far, holding back a trailing U+FFFD (an incomplete UTF-8 byte sequence
/// from byte-fallback pieces) until the next bytes complete it, so multi-byte characters come out
/// whole. The concatenated deltas plus [`Self::finish`] equal `decode(all ids)`.
pub struct StreamDecoder<'a> {
    tok: &'a crate::vocab::Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a crate::vocab::Tokenizer) -> Self {
        StreamDecoder {
            tok,
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// The text `id` adds (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids);
        if text.ends_with('\u{FFFD}') {
            return String::new();
        }
        self.delta(text)
    }

    /// Whatever is still held back.
    pub fn finish(&mut self) -> String {
        let text = self.tok.decode(&self.ids);
        self.delta(text)
    }

    /// The decoded text of every id pushed.
    pub fn text(&self) -> String {
        self.tok.decode(&self.ids)
    }

    fn delta(&mut self, text: String) -> String {
        // Decoding is prefix-stable except at a held-back byte run; if an earlier part changed,
        // emit nothing until the text grows past what was printed.
        if text.len() > self.printed && text.is_char_boundary(self.printed) {
            let d = text[self.printed..].to_string();
            self.printed = text.len();
            d
        } else {
            String::new()
        }
    }
}

/// The vocabulary a model must have to be used with a tokenizer: its size, or its size + 1 when
/// it has no `[PAD]` piece (the SFT script adds one, so an SFT model has one more row).
pub struct ExpectVocab {
    /// For messages: "tokenizer PATH".
    pub what: String,
    pub sizes: Vec<usize>,
}

impl ExpectVocab {
    pub fn of_tokenizer(tok: &crate::vocab::Tokenizer, path: &Path) -> Self {
        let n = tok.vocab_size();
        let mut sizes = vec![n];
        if tok.pad_id().is_none() {
            sizes.push(n + 1);
        }
        ExpectVocab {
            what: format!("tokenizer {}", path.display()),
            sizes,
        }
    }

    fn describe(&self) -> String {
        match self.sizes.as_slice() {
            [n, m, ..] => format!(
                "{} has {n} tokens ({m} with the [PAD] the SFT script adds)",
                self.what
            ),
            [n] => format!("{} has {n} tokens", self.what),
            [] => format!("{} accepts no vocabulary size", self.what),
        }
    }
}

/// Vocabulary rows of the embedding / lm_head an adapter carries in full, if any.
pub fn adapter_vocab(ad: &Adapter) -> Option<usize> {
    ["model.embed_tokens.weight", "lm_head.weight"]
        .iter()
        .find_map(|n| ad.tensors.get(*n).map(|(s, _)| s[0]))
}

/// Load the HF model in `model_dir` with the PEFT adapters in `adapter_dirs` merged in order
/// (`W += B·A·alpha/r`, full modules replace the base ones: the `merge-lora` code), frozen, on
/// `backend`. An adapter carrying the embedding or lm_head sets the vocabulary (as PEFT loads it
/// onto a base resized to its size). With `expect`, every such adapter and the final model must
/// have one of `expect.sizes` rows; errors name both sizes.
pub fn load_merged<B: Backend>(
    backend: Arc<B>,
    model_dir: &Path,
    adapter_dirs: &[PathBuf],
    expect: Option<&ExpectVocab>,
) -> Result<Llama<B>> {
    ensure!(
        model_dir.is_dir(),
        "model directory {} does not exist",
        model_dir.display()
    );
    let mut adapters = Vec::with_capacity(adapter_dirs.len());
    for dir in adapter_dirs {
        ensure!(
            dir.is_dir(),
            "adapter directory {} does not exist",
            dir.display()
        );
        let ad =
            load_adapter(dir).with_context(|| format!("cannot load adapter {}", dir.display()))?;
        if let (Some(ex), Some(v)) = (expect, adapter_vocab(&ad)) {
            ensure!(
                ex.sizes.contains(&v),
                "adapter {} was made for a vocabulary of {v} tokens but {}",
                dir.display(),
                ex.describe()
            );
        }
        adapters.push(ad);
    }
    let model = if adapters.is_empty() {
        Llama::from_dir(backend, model_dir, TrainSpec::frozen())
            .with_context(|| format!("cannot load model {}", model_dir.display()))?
    } else {
        merged(backend, model_dir, adapter_dirs, &adapters)?
    };
    if let Some(ex) = expect {
        let v = model.config().vocab_size;
        ensure!(
            ex.sizes.contains(&v),
            "model {}{} has a vocabulary of {v} tokens but {}",
            model_dir.display(),
            if adapters.is_empty() {
                ""
            } else {
                " (with its adapters)"
            },
            ex.describe()
        );
    }
    Ok(model)
}

fn merged<B: Backend>(
    backend: Arc<B>,
    model_dir: &Path,
    adapter_dirs: &[PathBuf],
    adapters: &[Adapter],
) -> Result<Llama<B>> {
    let ctx = || format!("cannot load model {}", model_dir.display());
    let mut config = LlamaConfig::load(&model_dir.join("config.json")).with_context(ctx)?;
    let ck = Checkpoint::open(model_dir).with_context(ctx)?;
    let mut weights: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    for name in ck.names() {
        if !name.ends_with("rotary_emb.inv_freq") {
            weights.insert(name.to_string(), ck.read(name).with_context(ctx)?);
        }
    }
    for (ad, dir) in adapters.iter().zip(adapter_dirs) {
        merge_one(&mut weights, ad).with_context(|| {
            format!(
                "cannot merge adapter {} into {}",
                dir.display(),
                model_dir.display()
            )
        })?;
    }
    let vocab = weights
        .get("model.embed_tokens.weight")
        .map(|(s, _)| s[0])
        .with_context(|| format!("{}: no model.embed_tokens.weight", model_dir.display()))?;
    if let Some((s, _)) = weights.get("lm_head.weight") {
        ensure!(
            s[0] == vocab,
            "after merging the adapters, lm_head has {} rows but embed_tokens {vocab}: an adapter \
             resized one without the other",
            s[0]
        );
    }
    config.vocab_size = vocab;
    config
        .raw
        .insert("vocab_size".into(), serde_json::json!(vocab));
    Llama::new(backend, config, TrainSpec::frozen(), |e, out| {
        if matches!(e.kind, Kind::LoraA { .. } | Kind::LoraB { .. }) {
            return Ok(false);
        }
        let (shape, data) = weights
            .get(&e.name)
            .with_context(|| format!("{}: missing tensor {}", model_dir.display(), e.name))?;
        ensure!(
            shape == &e.shape,
            "{}: tensor {} has shape {shape:?}, expected {:?}",
            model_dir.display(),
            e.name,
            e.shape
        );
        out.copy_from_slice(data);
        Ok(true)
    })
    .with_context(ctx)
}

/// The decoded text `model` generates for `prompt` (wrapped by `template`, stopped at the
/// tokenizer's `</s>`): [`encode_prompt`] → [`generate`] → `decode`, for callers that do not
/// stream (the demo's exact-match evaluation).
pub fn generate_text<B: Backend>(
    model: &Llama<B>,
    enc: &crate::data::TokenizerEncoder,
    prompt: &str,
    template: Template,
    cfg: &SamplingConfig,
) -> Result<String> {
    use crate::data::Encoder;
    let ids = encode_prompt(&crate::data::HfText::new(enc), prompt, template);
    let out = generate(model, &ids, cfg, Some(enc.eos_id()), |_| {})?;
    Ok(enc.tokenizer.decode(&out))
}
