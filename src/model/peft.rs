//! LoRA adapters in PEFT's on-disk layout, and merging them into a base model.
//!
//! An adapter directory holds `adapter_config.json` (PEFT's `LoraConfig`) and
//! `adapter_model.safetensors` with PEFT's tensor names:
//! `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight` for each adapted projection,
//! and `base_model.model.<HF module>.weight` for each module trained in full (PEFT's
//! `modules_to_save`: `model.embed_tokens`, `lm_head`). `PeftModel.from_pretrained` loads it onto
//! the base model (resized to the adapter's vocab first, as the original scripts do).
//!
//! Merging (RECIPE.md §6, PEFT's `merge_and_unload`): `W += (B·A)·(alpha/r)` for every adapted
//! projection; modules saved in full replace the base ones; the config's `vocab_size` becomes the
//! embedding's row count.

use super::config::LlamaConfig;
use super::llama::HostParams;
use super::lora::LoraConfig;
use super::params::Kind;
use super::weights::{Checkpoint, HostTensor, SaveOptions, save_model_dir};
use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The fields of PEFT's `adapter_config.json` that zhllama writes and reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub target_modules: Vec<String>,
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
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
}

fn none_str() -> String {
    "none".into()
}

/// An adapter read back: its config and every tensor (f32) under its name *without* PEFT's
/// `base_model.model.` prefix (so names match the model's HF names).
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
        target_modules: lora
            .map(|l| {
                l.targets
                    .iter()
                    .map(|p| p.module_name().to_string())
                    .collect()
            })
            .unwrap_or_default(),
        modules_to_save: (!modules_to_save.is_empty()).then(|| modules_to_save.to_vec()),
        bias: "none".into(),
        fan_in_fan_out: false,
        inference_mode: true,
        base_model_name_or_path: base_model.map(str::to_string),
        use_rslora: false,
        use_dora: false,
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

/// Read a PEFT LoRA adapter directory (f32, f16 or bf16 tensors).
pub fn load_adapter(dir: &Path) -> Result<Adapter> {
    let cpath = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cpath)
        .with_context(|| format!("cannot read {}", cpath.display()))?;
    let config: AdapterConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a PEFT LoRA adapter config", cpath.display()))?;
    ensure!(
        config.peft_type == "LORA",
        "{}: peft_type {:?}, only LORA is supported",
        cpath.display(),
        config.peft_type
    );
    ensure!(
        !config.fan_in_fan_out && !config.use_dora && !config.use_rslora && config.bias == "none",
        "{}: fan_in_fan_out / DoRA / rsLoRA / bias adapters are not supported",
        cpath.display()
    );
    let wpath = dir.join(ADAPTER_WEIGHTS);
    let bytes =
        std::fs::read(&wpath).with_context(|| format!("cannot read {}", wpath.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", wpath.display()))?;
    let mut tensors = BTreeMap::new();
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
        // PEFT names: base_model.model.<module>[.lora_A|.lora_B][.default].weight
        let short = name
            .strip_prefix(PREFIX)
            .with_context(|| {
                format!(
                    "{}: tensor {name} lacks the {PREFIX} prefix",
                    wpath.display()
                )
            })?
            .replace(".lora_A.default.", ".lora_A.")
            .replace(".lora_B.default.", ".lora_B.")
            .replace(".modules_to_save.default.", ".");
        tensors.insert(short, (view.shape().to_vec(), data));
    }
    Ok(Adapter { config, tensors })
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

/// `W += (B·A)·(alpha/r)` for every LoRA pair of `ad`; full modules replace the base tensors.
pub fn merge_one(
    weights: &mut HashMap<String, (Vec<usize>, Vec<f32>)>,
    ad: &Adapter,
) -> Result<()> {
    let scaling = ad.config.lora_alpha / ad.config.r as f32;
    for (name, (shape, data)) in &ad.tensors {
        if name.contains(".lora_B.") {
            continue;
        }
        if let Some(prefix) = name.strip_suffix(".lora_A.weight") {
            let bname = format!("{prefix}.lora_B.weight");
            let (bshape, b) = ad
                .tensors
                .get(&bname)
                .with_context(|| format!("adapter has {name} but no {bname}"))?;
            let wname = format!("{prefix}.weight");
            let (wshape, w) = weights
                .get_mut(&wname)
                .with_context(|| format!("adapter tensor {name}: the base model has no {wname}"))?;
            let (r, inp) = (shape[0], shape[1]);
            let out = bshape[0];
            ensure!(
                bshape[1] == r && wshape.as_slice() == [out, inp],
                "adapter {name} {shape:?} / {bname} {bshape:?} do not fit {wname} {wshape:?}"
            );
            // delta[o, i] = Σ_k B[o, k]·A[k, i], accumulated in f32 like PEFT's `B @ A`.
            for o in 0..out {
                let row = &mut w[o * inp..(o + 1) * inp];
                let mut delta = vec![0.0f32; inp];
                for k in 0..r {
                    let bk = b[o * r + k];
                    let arow = &data[k * inp..(k + 1) * inp];
                    for (d, a) in delta.iter_mut().zip(arow) {
                        *d += bk * a;
                    }
                }
                for (x, d) in row.iter_mut().zip(&delta) {
                    *x += d * scaling;
                }
            }
        } else if !name.contains(".lora_") {
            let (wshape, w) = weights.get_mut(name).with_context(|| {
                format!("adapter tensor {name}: the base model has no such tensor")
            })?;
            ensure!(
                wshape[1..] == shape[1..],
                "adapter tensor {name} {shape:?} does not fit the base {wshape:?}"
            );
            *wshape = shape.clone();
            *w = data.clone();
        }
    }
    Ok(())
}
