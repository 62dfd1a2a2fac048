//! LoRA adapters in PEFT's on-disk layout, and merging them into a base model.
//!
//! An adapter directory holds `adapter_config.json` (PEFT's `LoraConfig`) and
//! `adapter_model.safetensors` with PEFT's tensor names:
//! `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight` for each adapted projection,
//! and `base_model.model.<HF module>.weight` for each module trained in full (PEFT's
//! `modules_to_save`: `model.embed_tokens`, `lm_head`). `PeftModel.from_pretrained` loads it onto
//! the base model (resized to the adapter's vocab first, as the original scripts do).
//!
//! Merging (docs/RECIPE.md §6, PEFT's `merge_and_unload`): `W += (B·A)·(alpha/r)` for every adapted
//! projection; modules saved in full replace the base ones; the config's `vocab_size` becomes the
//! embedding's row count.

use super::config::LlamaConfig;
use super::llama::HostParams;
use super::lora::LoraConfig;
use super::params::Kind;
use super::weights::{Checkpoint, HostTensor, SaveOptions, save_model_dir};
use crate::tensor::DType;
use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The fields of PEFT's `adapter_config.json` that zhllama writes and reads. Keys this struct
/// does not name are ignored when they cannot change the merged weights; the ones that can
/// (`use_dora`, `lora_bias`, `layer_replication`, `trainable_token_indices`, ...) are refused by
/// [`load_adapter`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "none_str")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Scaling `alpha/sqrt(r)` instead of `alpha/r`.
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module ranks: pattern → r (PEFT's `rank_pattern`), in the file's order.
    #[serde(default)]
    pub rank_pattern: Patterns<usize>,
    /// Per-module alphas: pattern → alpha (PEFT's `alpha_pattern`), in the file's order.
    #[serde(default)]
    pub alpha_pattern: Patterns<f32>,
}

/// PEFT's `target_modules`: a list of module names (a module matches when its name equals an
/// entry or ends with `.` + the entry) or one regular expression matched against the whole name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

impl TargetModules {
    /// Whether the module `name` (e.g. `model.layers.0.self_attn.q_proj`) is targeted.
    pub fn matches(&self, name: &str) -> Result<bool> {
        Ok(match self {
            TargetModules::List(v) => v.iter().any(|t| suffix_match(name, t)),
            TargetModules::Regex(re) => regex::Regex::new(&format!("^(?:{re})$"))
                .map_err(|e| {
                    anyhow::anyhow!("target_modules {re:?}: not a regular expression: {e}")
                })?
                .is_match(name),
        })
    }
}

fn suffix_match(name: &str, entry: &str) -> bool {
    name == entry
        || name
            .strip_suffix(entry)
            .is_some_and(|head| head.ends_with('.'))
}

/// An ordered `pattern → value` map (PEFT's `rank_pattern` / `alpha_pattern`): the first pattern
/// (in the file's order, as PEFT iterates its dict) that matches a module name wins. A pattern
/// matches a module when the regular expression `(.*\.)?(pattern)$` matches its whole name.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Patterns<T>(pub Vec<(String, T)>);

impl<T: Copy> Patterns<T> {
    fn lookup(&self, module: &str, key: &str) -> Result<Option<T>> {
        for (pat, v) in &self.0 {
            let re = regex::Regex::new(&format!("^(?:.*\\.)?(?:{pat})$")).map_err(|e| {
                anyhow::anyhow!("{key} entry {pat:?}: not a regular expression: {e}")
            })?;
            if re.is_match(module) {
                return Ok(Some(*v));
            }
        }
        Ok(None)
    }
}

impl<T: Serialize> Serialize for Patterns<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patterns<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Patterns<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of pattern → value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry()? {
                    v.push(e);
                }
                Ok(Patterns(v))
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(Patterns(Vec::new()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

fn none_str() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The rank of module `module` (`rank_pattern`, else `r`).
    pub fn rank_of(&self, module: &str) -> Result<usize> {
        Ok(self
            .rank_pattern
            .lookup(module, "rank_pattern")?
            .unwrap_or(self.r))
    }

    /// The LoRA scaling of module `module`: `alpha/r`, or `alpha/sqrt(r)` with `use_rslora`
    /// (alpha from `alpha_pattern`, else `lora_alpha`; r from [`Self::rank_of`]), computed in
    /// f64 and rounded once, as PEFT's Python float.
    pub fn scaling_of(&self, module: &str) -> Result<f32> {
        let r = self.rank_of(module)? as f64;
        let alpha = self
            .alpha_pattern
            .lookup(module, "alpha_pattern")?
            .unwrap_or(self.lora_alpha) as f64;
        Ok(if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        } as f32)
    }
}

/// An adapter read back: its config and every tensor (f32) under a normalised name *without*
/// PEFT's `base_model.model.` prefix, so names match the model's HF names:
/// - `<module>.lora_A.weight` `[r, in]` / `<module>.lora_B.weight` `[out, r]`: a linear LoRA;
/// - `<module>.lora_embedding_A` `[r, vocab]` / `<module>.lora_embedding_B` `[dim, r]`: an
///   embedding LoRA (delta `(B·A)ᵀ`);
/// - `<module>.weight`: a module saved in full (PEFT's `modules_to_save` copy, or a base layer PEFT
///   saved because the vocabulary was resized), which replaces the base tensor before any LoRA
///   delta is added.
///
/// PEFT's `<module>.original_module.weight` (the frozen copy next to a `modules_to_save` module)
/// does not change the merged model; it is checked and dropped.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// PEFT's module name of a fully trained tensor kind.
fn module_of(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Embedding => Some("embed_tokens"),
        Kind::LmHead => Some("lm_head"),
        _ => None,
    }
}

/// Write the trained LoRA factors and fully trained modules of `host` as a PEFT adapter in `dir`
/// (atomically: temp dir + rename). `modules_to_save`: which of `embed_tokens`, `lm_head` to
/// include in full (the ones that trained).
pub fn save_adapter(
    dir: &Path,
    host: &HostParams,
    lora: Option<&LoraConfig>,
    modules_to_save: &[String],
    base_model: Option<&str>,
) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for e in host.layout.entries() {
        let keep = match e.kind {
            Kind::LoraA { .. } | Kind::LoraB { .. } => true,
            k => module_of(k).is_some_and(|m| modules_to_save.iter().any(|s| s == m)),
        };
        if keep {
            let bytes = host.entry(e).iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((format!("{PREFIX}{}", e.name), e.shape.clone(), bytes));
        }
    }
    // A tied model's lm_head is the embedding: PEFT saves it once, as embed_tokens.
    let cfg = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        r: lora.map_or(1, |l| l.r),
        lora_alpha: lora.map_or(1.0, |l| l.alpha),
        lora_dropout: lora.map_or(0.0, |l| l.dropout),
        target_modules: TargetModules::List(
            lora.map(|l| {
                l.targets
                    .iter()
                    .map(|p| p.module_name().to_string())
                    .collect()
            })
            .unwrap_or_default(),
        ),
        modules_to_save: (!modules_to_save.is_empty()).then(|| modules_to_save.to_vec()),
        bias: "none".into(),
        fan_in_fan_out: false,
        inference_mode: true,
        base_model_name_or_path: base_model.map(str::to_string),
        use_rslora: false,
        use_dora: false,
        rank_pattern: Patterns::default(),
        alpha_pattern: Patterns::default(),
    };
    ensure!(
        !tensors.is_empty(),
        "nothing to save in the adapter: no LoRA factors and no module trained in full"
    );
    let tmp = crate::util::temp_path(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).expect("sized"),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let wpath = tmp.join(ADAPTER_WEIGHTS);
    safetensors::serialize_to_file(views, Some(meta), &wpath)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", wpath.display()))?;
    let text = serde_json::to_string_pretty(&cfg)? + "\n";
    crate::util::write_atomic(&tmp.join(ADAPTER_CONFIG), text.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    Ok(())
}

/// Config keys that change what the adapter computes and that zhllama does not implement: refused
/// when set to anything but their neutral value.
const UNSUPPORTED_KEYS: [&str; 7] = [
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "megatron_config",
    "use_qalora",
];

/// What one PEFT tensor key is, after the prefix and the adapter name are removed.
enum KeyKind {
    /// A tensor kept under its normalised name.
    Keep(String),
    /// `<module>.original_module.weight`: checked, then dropped.
    Original(String),
}

/// Normalise one PEFT key (without the `base_model.model.` prefix); `None`: not a layout zhllama
/// knows.
fn normalise(key: &str) -> Option<KeyKind> {
    // PEFT removes the adapter name on save; a state dict taken from a live model keeps it.
    let key = key
        .replace(".lora_A.default.", ".lora_A.")
        .replace(".lora_B.default.", ".lora_B.")
        .replace(".modules_to_save.default.", ".modules_to_save.");
    let key = key
        .strip_suffix(".lora_embedding_A.default")
        .map(|m| format!("{m}.lora_embedding_A"))
        .or_else(|| {
            key.strip_suffix(".lora_embedding_B.default")
                .map(|m| format!("{m}.lora_embedding_B"))
        })
        .unwrap_or(key);
    if let Some(m) = key.strip_suffix(".modules_to_save.weight") {
        return Some(KeyKind::Keep(format!("{m}.weight")));
    }
    if let Some(m) = key.strip_suffix(".original_module.weight") {
        return Some(KeyKind::Original(format!("{m}.weight")));
    }
    if let Some(m) = key.strip_suffix(".base_layer.weight") {
        return Some(KeyKind::Keep(format!("{m}.weight")));
    }
    for suffix in [
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_embedding_A",
        ".lora_embedding_B",
    ] {
        if let Some(m) = key.strip_suffix(suffix) {
            return (!m.is_empty() && !m.contains("lora_") && !m.contains("modules_to_save"))
                .then(|| KeyKind::Keep(key.clone()));
        }
    }
    let m = key.strip_suffix(".weight")?;
    (!m.is_empty()
        && !m.contains("lora_")
        && !m.contains("modules_to_save")
        && !m.contains("original_module")
        && !m.ends_with("base_layer"))
    .then(|| KeyKind::Keep(key.clone()))
}

/// Read a PEFT LoRA adapter directory (f32, f16 or bf16 tensors) in any layout PEFT writes for
/// LLaMA (see [`Adapter`]), and check it is consistent: `r` (and `rank_pattern`) against the
/// factors' ranks, `target_modules` against the LoRA tensors present, `modules_to_save` against
/// the full modules, every value finite. Errors name the file and the key or tensor.
pub fn load_adapter(dir: &Path) -> Result<Adapter> {
    let cpath = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cpath)
        .with_context(|| format!("cannot read {}", cpath.display()))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", cpath.display()))?;
    let config: AdapterConfig = serde_json::from_value(raw.clone())
        .with_context(|| format!("{}: not a PEFT LoRA adapter config", cpath.display()))?;
    ensure!(
        config.peft_type == "LORA",
        "{}: peft_type {:?}, only LORA is supported",
        cpath.display(),
        config.peft_type
    );
    for key in UNSUPPORTED_KEYS {
        let neutral = match raw.get(key) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => true,
            Some(serde_json::Value::Array(a)) if a.is_empty() => true,
            Some(serde_json::Value::Object(o)) if o.is_empty() => true,
            _ => false,
        };
        ensure!(
            neutral,
            "{}: key {key} = {} is not supported",
            cpath.display(),
            raw[key]
        );
    }
    ensure!(
        config.bias == "none",
        "{}: key bias = {:?} is not supported (only \"none\")",
        cpath.display(),
        config.bias
    );
    ensure!(
        config.r > 0,
        "{}: key r = 0: a LoRA rank must be at least 1",
        cpath.display()
    );
    for (pat, r) in &config.rank_pattern.0 {
        ensure!(
            *r > 0,
            "{}: key rank_pattern entry {pat:?} = 0: a LoRA rank must be at least 1",
            cpath.display()
        );
    }
    ensure!(
        config.lora_alpha.is_finite() && config.alpha_pattern.0.iter().all(|(_, a)| a.is_finite()),
        "{}: key lora_alpha / alpha_pattern is not finite",
        cpath.display()
    );
    let wpath = dir.join(ADAPTER_WEIGHTS);
    let bytes =
        std::fs::read(&wpath).with_context(|| format!("cannot read {}", wpath.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", wpath.display()))?;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut originals = Vec::new();
    // normalised name → the file's key, for error messages
    let mut source: HashMap<String, String> = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => crate::tensor::DType::F32,
            Dtype::F16 => crate::tensor::DType::F16,
            Dtype::BF16 => crate::tensor::DType::BF16,
            d => bail!(
                "{}: tensor {name} has unsupported dtype {d:?}",
                wpath.display()
            ),
        };
        let mut data = Vec::new();
        crate::tensor::bytes_to_f32(view.data(), dtype, &mut data)
            .with_context(|| format!("{}: tensor {name}", wpath.display()))?;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor {name} has a non-finite value ({}) at element {i}",
                wpath.display(),
                data[i]
            );
        }
        let short = name.strip_prefix(PREFIX).with_context(|| {
            format!(
                "{}: tensor {name} lacks the {PREFIX} prefix",
                wpath.display()
            )
        })?;
        let kind = normalise(short).with_context(|| {
            format!(
                "{}: tensor {name} is not a LoRA factor, a module saved in full or a \
                 modules_to_save/original_module copy: not supported",
                wpath.display()
            )
        })?;
        match kind {
            KeyKind::Keep(n) => {
                // PEFT >= 0.7 writes a modules_to_save module twice when it saves the embedding
                // layers (`<m>.weight` and `<m>.modules_to_save.weight`): equal copies are one.
                if let Some((pshape, pdata)) = tensors.get(&n) {
                    let prev = &source[&n];
                    ensure!(
                        pshape.as_slice() == view.shape() && *pdata == data,
                        "{}: tensors {prev} and {name} both give {n} but differ",
                        wpath.display()
                    );
                    if !short.contains(".modules_to_save.") {
                        continue;
                    }
                }
                source.insert(n.clone(), name.clone());
                if short.contains(".modules_to_save.") {
                    let module = n.strip_suffix(".weight").unwrap_or(&n);
                    let listed = config
                        .modules_to_save
                        .iter()
                        .flatten()
                        .any(|m| suffix_match(module, m));
                    ensure!(
                        listed,
                        "{}: tensor {name} is a modules_to_save copy but {module} is not in \
                         modules_to_save of {}",
                        wpath.display(),
                        cpath.display()
                    );
                }
                tensors.insert(n, (view.shape().to_vec(), data));
            }
            KeyKind::Original(n) => originals.push((name.clone(), n, view.shape().to_vec())),
        }
    }
    for (name, n, shape) in &originals {
        let full = source
            .get(n)
            .filter(|k| k.contains(".modules_to_save."))
            .with_context(|| {
                format!(
                    "{}: tensor {name} (original_module) has no modules_to_save copy next to it",
                    wpath.display()
                )
            })?;
        let (fshape, _) = &tensors[n];
        ensure!(
            fshape == shape,
            "{}: tensor {name} {shape:?} and {full} {fshape:?} differ in shape",
            wpath.display()
        );
    }
    let ad = Adapter { config, tensors };
    ad.check_lora(&wpath, &cpath, &source)?;
    Ok(ad)
}

impl Adapter {
    /// Every LoRA factor has its partner, the rank the config gives its module, and a module the
    /// config targets; every `target_modules` list entry has a LoRA tensor.
    fn check_lora(
        &self,
        wpath: &Path,
        cpath: &Path,
        source: &HashMap<String, String>,
    ) -> Result<()> {
        let file_key = |n: &str| source.get(n).cloned().unwrap_or_else(|| n.to_string());
        let mut modules: Vec<&str> = Vec::new();
        for (name, (shape, _)) in &self.tensors {
            let (module, partner, a_side) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
                (m, format!("{m}.lora_B.weight"), true)
            } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
                (m, format!("{m}.lora_A.weight"), false)
            } else if let Some(m) = name.strip_suffix(".lora_embedding_A") {
                (m, format!("{m}.lora_embedding_B"), true)
            } else if let Some(m) = name.strip_suffix(".lora_embedding_B") {
                (m, format!("{m}.lora_embedding_A"), false)
            } else {
                continue;
            };
            let key = file_key(name);
            ensure!(
                self.tensors.contains_key(&partner),
                "{}: tensor {key} has no partner {partner}",
                wpath.display()
            );
            ensure!(
                shape.len() == 2,
                "{}: tensor {key} has shape {shape:?}, not a matrix",
                wpath.display()
            );
            let r = self.config.rank_of(module)?;
            let got = if a_side { shape[0] } else { shape[1] };
            ensure!(
                got == r,
                "{}: tensor {key} {shape:?} has rank {got} but {} gives r = {r} for {module} \
                 (key {})",
                wpath.display(),
                cpath.display(),
                if self
                    .config
                    .rank_pattern
                    .lookup(module, "rank_pattern")?
                    .is_some()
                {
                    "rank_pattern"
                } else {
                    "r"
                }
            );
            ensure!(
                self.config.target_modules.matches(module)?,
                "{}: tensor {key} adapts {module}, which key target_modules of {} does not name",
                wpath.display(),
                cpath.display()
            );
            modules.push(module);
        }
        if let TargetModules::List(list) = &self.config.target_modules {
            for t in list {
                ensure!(
                    modules.iter().any(|m| suffix_match(m, t)),
                    "{}: key target_modules names {t:?} but {} has no LoRA tensor for it",
                    cpath.display(),
                    wpath.display()
                );
            }
        }
        Ok(())
    }
}

/// Merge `adapters` (in order) into the base model in `base` and write the merged HF model to
/// `output` (config with the new `vocab_size`, safetensors in the base's dtype, sharded at
/// `max_shard_bytes` with an index). Every adapter tensor must find its base tensor.
pub fn merge_into_dir(
    base: &Path,
    adapters: &[Adapter],
    output: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    let mut config = LlamaConfig::load(&base.join("config.json"))?;
    let ck = Checkpoint::open(base)?;
    let dtype = ck.main_dtype();
    let mut order: Vec<String> = Vec::new();
    let mut weights: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    for name in ck.names() {
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let (shape, data) = ck.read(name)?;
        order.push(name.to_string());
        weights.insert(name.to_string(), (shape, data));
    }
    for ad in adapters {
        merge_one(&mut weights, ad)?;
    }
    // Finite adapters on finite weights can still overflow (large factors, or a value beyond the
    // output dtype's range): refuse before writing anything.
    for n in &order {
        let (_, data) = &weights[n];
        if let Some(i) = data.iter().position(|&x| !finite_in(dtype, x)) {
            bail!(
                "merged tensor {n} has a non-finite value at element {i} ({} in f32, stored as \
                 {dtype:?}): the adapters overflow the base weights; nothing written to {}",
                data[i],
                output.display()
            );
        }
    }
    let (emb_shape, _) = weights
        .get("model.embed_tokens.weight")
        .context("the base model has no model.embed_tokens.weight")?;
    let vocab = emb_shape[0];
    if let Some((s, _)) = weights.get("lm_head.weight") {
        ensure!(
            s[0] == vocab,
            "after merging, lm_head has {} rows but embed_tokens {vocab}: an adapter resized one \
             without the other",
            s[0]
        );
    }
    config.vocab_size = vocab;
    config
        .raw
        .insert("vocab_size".into(), serde_json::json!(vocab));
    let tensors: Vec<HostTensor<'_>> = order
        .iter()
        .map(|n| {
            let (shape, data) = &weights[n];
            HostTensor {
                name: n.clone(),
                shape: shape.clone(),
                data: Cow::Borrowed(data.as_slice()),
            }
        })
        .collect();
    save_model_dir(
        output,
        &config,
        &tensors,
        SaveOptions {
            dtype,
            max_shard_bytes: Some(max_shard_bytes),
        },
    )
}

/// `x` is finite and stays finite when stored as `dtype` (f16 overflows past 65504).
fn finite_in(dtype: DType, x: f32) -> bool {
    match dtype {
        DType::F32 => x.is_finite(),
        DType::F16 => half::f16::from_f32(x).is_finite(),
        DType::BF16 => half::bf16::from_f32(x).is_finite(),
    }
}

/// Merge one adapter into `weights` (PEFT's `merge_and_unload`): modules saved in full replace
/// the base tensors first, then every LoRA pair adds its delta, `W += (B·A)·s` for a linear
/// layer and `W += (B·A)ᵀ·s` for an embedding, with the module's scaling `s`
/// ([`AdapterConfig::scaling_of`]: `alpha/r`, `rank_pattern`/`alpha_pattern`, rsLoRA).
pub fn merge_one(
    weights: &mut HashMap<String, (Vec<usize>, Vec<f32>)>,
    ad: &Adapter,
) -> Result<()> {
    for (name, (shape, data)) in &ad.tensors {
        if name.contains(".lora_") {
            continue;
        }
        let (wshape, w) = weights
            .get_mut(name)
            .with_context(|| format!("adapter tensor {name}: the base model has no such tensor"))?;
        ensure!(
            wshape.len() == shape.len() && wshape[1..] == shape[1..],
            "adapter tensor {name} {shape:?} does not fit the base {wshape:?}"
        );
        *wshape = shape.clone();
        *w = data.clone();
    }
    for (name, (shape, a)) in &ad.tensors {
        let (prefix, bname, embedding) = if let Some(p) = name.strip_suffix(".lora_A.weight") {
            (p, format!("{p}.lora_B.weight"), false)
        } else if let Some(p) = name.strip_suffix(".lora_embedding_A") {
            (p, format!("{p}.lora_embedding_B"), true)
        } else {
            continue;
        };
        let (bshape, b) = ad
            .tensors
            .get(&bname)
            .with_context(|| format!("adapter has {name} but no {bname}"))?;
        let wname = format!("{prefix}.weight");
        let (wshape, w) = weights
            .get_mut(&wname)
            .with_context(|| format!("adapter tensor {name}: the base model has no {wname}"))?;
        let scaling = ad.config.scaling_of(prefix)?;
        // Linear: A [r, in], B [out, r], W [out, in]. Embedding: A [r, vocab], B [dim, r],
        // W [vocab, dim].
        let (r, a_cols) = (shape[0], shape[1]);
        let b_rows = bshape[0];
        let want = if embedding {
            [a_cols, b_rows]
        } else {
            [b_rows, a_cols]
        };
        ensure!(
            bshape.len() == 2 && bshape[1] == r && wshape.as_slice() == want,
            "adapter {name} {shape:?} / {bname} {bshape:?} do not fit {wname} {wshape:?}"
        );
        // delta[o, i] = Σ_k B[o, k]·A[k, i], accumulated in f32 like PEFT's `B @ A`, then
        // scaled (PEFT: `(B @ A) * scaling`, transposed for an embedding).
        let mut delta = vec![0.0f32; a_cols];
        for o in 0..b_rows {
            delta.iter_mut().for_each(|d| *d = 0.0);
            for k in 0..r {
                let bk = b[o * r + k];
                let arow = &a[k * a_cols..(k + 1) * a_cols];
                for (d, x) in delta.iter_mut().zip(arow) {
                    *d += bk * x;
                }
            }
            if embedding {
                // column o of W (W[i, o] for every vocab row i)
                for (i, d) in delta.iter().enumerate() {
                    w[i * b_rows + o] += d * scaling;
                }
            } else {
                let row = &mut w[o * a_cols..(o + 1) * a_cols];
                for (x, d) in row.iter_mut().zip(&delta) {
                    *x += d * scaling;
                }
            }
        }
    }
    Ok(())
}
