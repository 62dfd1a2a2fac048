//! Turning a config into a model ready to train: the [`TrainSpec`] of a stage, the vocabulary
//! resize to the tokenizer's size (docs/RECIPE.md §1 allowed pairs), and the run's final outputs.

use super::config::{Stage, TrainConfig};
use crate::backend::Backend;
use crate::model::lora::{LoraConfig, Proj};
use crate::model::params::{Kind, TrainSpec};
use crate::model::peft::{Adapter, TargetModules};
use crate::model::resize::{NewRows, resize_rows};
use crate::model::weights::{Checkpoint, SaveOptions};
use crate::model::{Llama, LlamaConfig};
use crate::tensor::DType;
use crate::vocab::Tokenizer;
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;
use std::sync::Arc;

/// Which tensors train, from the config (LoRA init seeded from `seed`).
pub fn train_spec(cfg: &TrainConfig) -> Result<TrainSpec> {
    let lora = if cfg.lora_targets.is_empty() {
        None
    } else {
        let targets = cfg
            .lora_targets
            .iter()
            .map(|t| Proj::parse(t))
            .collect::<Result<Vec<_>>>()?;
        Some(LoraConfig::new(
            cfg.lora_rank,
            cfg.lora_alpha as f32,
            cfg.lora_dropout as f32,
            &targets,
            cfg.seed,
        )?)
    };
    Ok(TrainSpec {
        embed_tokens: cfg.modules_to_save.iter().any(|m| m == "embed_tokens"),
        lm_head: cfg.modules_to_save.iter().any(|m| m == "lm_head"),
        norms: false,
        projections: false,
        lora,
    })
}

/// Whether the recipe allows training a model of `model_vocab` with a tokenizer of `tok_vocab`
/// (docs/RECIPE.md §1: the pre-training script's pairs; SFT also moves a 32000 or 49953 model to the
/// Alpaca tokenizer's 49954). Equal sizes are always allowed.
pub fn check_vocab_pair(stage: Stage, model_vocab: usize, tok_vocab: usize) -> Result<()> {
    let ok = model_vocab == tok_vocab
        || (model_vocab == 32000 && tok_vocab == 49953)
        || (stage == Stage::Sft
            && (model_vocab == 32000 || model_vocab == 49953)
            && tok_vocab == 49954);
    if !ok {
        bail!(
            "the model's vocabulary has {model_vocab} entries and the tokenizer {tok_vocab}: not a \
             pair the recipe allows (32000→49953, 32000→32000, 49953→49953, 49954→49954; SFT also \
             32000/49953→49954)"
        );
    }
    Ok(())
}

/// The tokenizers a vocabulary resize needs.
pub struct ResizeTokenizers<'a> {
    /// The tokenizer being trained for (its size is the new vocab).
    pub new: &'a Tokenizer,
    /// The model's original tokenizer; `None`: the new tokenizer's first `old_vocab` pieces
    /// (a merged tokenizer extends the original, docs/RECIPE.md §1, so this is the original).
    pub old: Option<&'a Tokenizer>,
}

/// The original tokenizer recovered from a merged one: its first `old_vocab` pieces.
pub fn truncated_tokenizer(new: &Tokenizer, old_vocab: usize) -> Result<Tokenizer> {
    let mut proto = new.model().clone();
    ensure!(
        proto.pieces.len() >= old_vocab,
        "tokenizer has {} pieces, fewer than the model's {old_vocab}",
        proto.pieces.len()
    );
    proto.pieces.truncate(old_vocab);
    Tokenizer::from_model(proto)
}

/// Load the HF model in `dir` for `cfg`, its embedding and lm_head resized to `tok_vocab` rows
/// (the config's `new_token_init`: `mean` = mean of the old rows of the pieces the original
/// tokenizer splits each new piece into, see [`crate::model::resize`]; `hf` = HF's
/// normal(0, initializer_range), seeded).
pub fn load_model<B: Backend>(
    backend: Arc<B>,
    dir: &Path,
    cfg: &TrainConfig,
    stage: Stage,
    tok_vocab: usize,
    tokenizers: Option<ResizeTokenizers<'_>>,
) -> Result<Llama<B>> {
    load_model_init(backend, dir, cfg, stage, tok_vocab, tokenizers, None)
}

/// Make the run's LoRA settings (`lora_rank`, `lora_alpha`, `lora_targets`) those of the PEFT
/// adapter a run starts from (`train --init-adapter`), so its factors fit; returns one line per
/// setting that changed. Refused: stage pt1 (no LoRA), and what the trainer cannot train
/// (`rank_pattern`, `alpha_pattern`, rsLoRA, a LoRA on the embedding or lm_head, a
/// `target_modules` regular expression), each named by key or tensor.
pub fn adopt_adapter_config(
    cfg: &mut TrainConfig,
    stage: Stage,
    ad: &Adapter,
    dir: &Path,
) -> Result<Vec<String>> {
    let d = dir.display();
    ensure!(
        stage != Stage::Pt1,
        "--init-adapter {d}: stage pt1 trains the embedding alone, without LoRA; start pt2 or sft \
         from an adapter"
    );
    let c = &ad.config;
    ensure!(
        c.rank_pattern.0.is_empty() && c.alpha_pattern.0.is_empty() && !c.use_rslora,
        "--init-adapter {d}: keys rank_pattern / alpha_pattern / use_rslora set: per-module ranks \
         and rsLoRA cannot be trained; merge the adapter with merge-lora and train a new one"
    );
    let TargetModules::List(list) = &c.target_modules else {
        bail!(
            "--init-adapter {d}: key target_modules is a regular expression; training needs a list"
        )
    };
    if let Some(n) = ad
        .tensors
        .keys()
        .find(|n| n.contains(".lora_") && !n.starts_with("model.layers."))
    {
        bail!(
            "--init-adapter {d}: tensor {n}: a LoRA on the embedding or lm_head cannot be trained"
        )
    }
    let mut targets = Vec::new();
    for p in Proj::ALL {
        if list.iter().any(|t| t == p.module_name()) {
            targets.push(p.module_name().to_string());
        }
    }
    if let Some(t) = list.iter().find(|t| Proj::parse(t).is_err()) {
        bail!("--init-adapter {d}: key target_modules names {t:?}, not a LLaMA projection")
    }
    let mut notes = Vec::new();
    if cfg.lora_rank != c.r {
        notes.push(format!(
            "lora_rank {} -> {} (the adapter's r)",
            cfg.lora_rank, c.r
        ));
        cfg.lora_rank = c.r;
    }
    if cfg.lora_alpha as f32 != c.lora_alpha {
        notes.push(format!(
            "lora_alpha {} -> {} (the adapter's lora_alpha)",
            cfg.lora_alpha, c.lora_alpha
        ));
        cfg.lora_alpha = c.lora_alpha as f64;
    }
    let mut ours = cfg.lora_targets.clone();
    ours.sort();
    let mut theirs = targets.clone();
    theirs.sort();
    if ours != theirs {
        notes.push(format!(
            "lora_targets {} -> {} (the adapter's target_modules)",
            cfg.lora_targets.join(","),
            targets.join(",")
        ));
        cfg.lora_targets = targets;
    }
    Ok(notes)
}

/// [`load_model`], then the trainable tensors from the PEFT adapter `init` when given
/// (`train --init-adapter`): every LoRA factor the run trains must be in it with the run's shape;
/// its modules saved in full (embed_tokens, lm_head) must be ones the run trains, and are
/// resized like the base when the adapter predates the vocabulary resize (same rows as the base
/// model). Every adapter tensor must be used. Errors name the tensor.
pub fn load_model_init<B: Backend>(
    backend: Arc<B>,
    dir: &Path,
    cfg: &TrainConfig,
    stage: Stage,
    tok_vocab: usize,
    tokenizers: Option<ResizeTokenizers<'_>>,
    init: Option<&Adapter>,
) -> Result<Llama<B>> {
    // config.json against the tensors before anything is allocated (enormous sizes, wrong shapes).
    crate::model::llama::check_model_dir(dir)?;
    let mut config = LlamaConfig::load(&dir.join("config.json"))?;
    check_vocab_pair(stage, config.vocab_size, tok_vocab)?;
    let old_vocab = config.vocab_size;
    let std = config.initializer_range;
    config.vocab_size = tok_vocab;
    config
        .raw
        .insert("vocab_size".into(), serde_json::json!(tok_vocab));
    let ck = Checkpoint::open(dir)?;
    let spec = train_spec(cfg)?;
    let c = config.hidden_size;
    let resize = |name: &str, old: &[f32], out: &mut [f32], salt: u64| -> Result<()> {
        let init = match cfg.new_token_init.as_str() {
            "hf" => NewRows::Random {
                std,
                seed: cfg.seed ^ salt,
            },
            _ => NewRows::MeanOfPieces,
        };
        let toks = tokenizers.as_ref().with_context(|| {
            format!(
                "resizing the vocabulary from {old_vocab} to {tok_vocab} needs the tokenizer                  (--tokenizer)"
            )
        })?;
        let truncated;
        let old_tok = match toks.old {
            Some(t) => t,
            None => {
                truncated = truncated_tokenizer(toks.new, old_vocab)?;
                &truncated
            }
        };
        let rows = resize_rows(old, old_vocab, c, tok_vocab, old_tok, toks.new, init)
            .with_context(|| format!("resizing {name}"))?;
        out.copy_from_slice(&rows);
        Ok(())
    };
    let mut used: Vec<&str> = Vec::new();
    let model = Llama::new(backend, config, spec, |e, out| {
        let salt = if e.kind == Kind::LmHead { 1 } else { 0 };
        let from_adapter = init.and_then(|ad| ad.tensors.get_key_value(&e.name));
        match e.kind {
            Kind::LoraA { .. } | Kind::LoraB { .. } => {
                let Some(ad) = init else { return Ok(false) };
                let (name, (shape, data)) = ad.tensors.get_key_value(&e.name).with_context(|| {
                    format!("--init-adapter: the adapter has no {} (the run trains it)", e.name)
                })?;
                ensure!(
                    *shape == e.shape,
                    "--init-adapter: adapter tensor {name} is {shape:?}, the run's is {:?}",
                    e.shape
                );
                out.copy_from_slice(data);
                used.push(name);
                Ok(true)
            }
            Kind::Embedding | Kind::LmHead if from_adapter.is_some() => {
                let (name, (shape, data)) = from_adapter.expect("checked");
                ensure!(
                    e.loc().trainable(),
                    "--init-adapter: adapter tensor {name}: this run does not train it (config key \
                     modules_to_save)"
                );
                ensure!(
                    shape.len() == 2 && shape[1] == c && (shape[0] == tok_vocab || shape[0] == old_vocab),
                    "--init-adapter: adapter tensor {name} is {shape:?}; the run needs [{tok_vocab}, {c}] \
                     (or [{old_vocab}, {c}] from before the vocabulary resize)"
                );
                if shape[0] == tok_vocab {
                    out.copy_from_slice(data);
                } else {
                    resize(name, data, out, salt)?;
                }
                used.push(name);
                Ok(true)
            }
            Kind::Embedding | Kind::LmHead if old_vocab != tok_vocab => {
                let mut old = vec![0.0f32; old_vocab * c];
                ck.read_into(&e.name, &[old_vocab, c], &mut old)?;
                resize(&e.name, &old, out, salt)?;
                Ok(true)
            }
            _ => {
                ck.read_into(&e.name, &e.shape, out)?;
                Ok(true)
            }
        }
    })
    .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    if let Some(n) = init.and_then(|ad| ad.tensors.keys().find(|n| !used.contains(&n.as_str()))) {
        bail!("--init-adapter: adapter tensor {n} has no place in this run's model")
    }
    Ok(model)
}

/// Write the run's result under `output`: for LoRA stages the PEFT adapter (`adapter/`), for
/// stage 1 the whole model with its trained embedding (`model/`, HF layout, f32).
pub fn save_outputs<B: Backend>(
    model: &Llama<B>,
    cfg: &TrainConfig,
    output: &Path,
    base: &Path,
) -> Result<std::path::PathBuf> {
    let host = model.download_params()?;
    let bad = host.trainable.iter().position(|x| !x.is_finite());
    if let Some(i) = bad {
        let name = model
            .layout()
            .entries()
            .iter()
            .find(|e| e.group == crate::model::params::Group::Trainable && e.range.contains(&i))
            .map_or("?".to_string(), |e| e.name.clone());
        anyhow::bail!(
            "refusing to write non-finite weights: tensor {name} went non-finite during training; the likely cause is learning_rate = {} (with max_grad_norm = {}): lower it",
            cfg.learning_rate,
            cfg.max_grad_norm
        );
    }
    if model.lora().is_some() {
        let dir = output.join("adapter");
        crate::model::peft::save_adapter(
            &dir,
            &host,
            model.lora(),
            &cfg.modules_to_save,
            Some(&base.display().to_string()),
        )?;
        Ok(dir)
    } else {
        let dir = output.join("model");
        crate::model::weights::save_model_dir(
            &dir,
            model.config(),
            &model.export_hf(&host),
            SaveOptions {
                dtype: DType::F32,
                max_shard_bytes: Some(2 << 30),
            },
        )?;
        Ok(dir)
    }
}
