//! Turning a config into a model ready to train: the [`TrainSpec`] of a stage, the vocabulary
//! resize to the tokenizer's size (RECIPE.md §1 allowed pairs), and the run's final outputs.

use super::config::{Stage, TrainConfig};
use crate::backend::Backend;
use crate::model::lora::{LoraConfig, Proj};
use crate::model::params::{Kind, TrainSpec};
use crate::model::weights::{Checkpoint, SaveOptions};
use crate::model::{Llama, LlamaConfig};
use crate::tensor::DType;
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
/// (RECIPE.md §1: the pre-training script's pairs; SFT also moves a 32000 or 49953 model to the
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

/// Initial values of embedding rows `old_rows..` after a resize, written into `table[v, c]`
/// whose first `old_rows` rows are the trained ones. `"hf"`: every new row is the mean of the old
/// rows (HF's `resize_token_embeddings(mean_resizing=True)` centre, without its random spread).
pub fn init_new_rows(table: &mut [f32], old_rows: usize, c: usize, init: &str) -> Result<()> {
    let v = table.len() / c;
    if v <= old_rows {
        return Ok(());
    }
    match init {
        "hf" | "mean" => {
            let mut mean = vec![0.0f64; c];
            for r in 0..old_rows {
                for (m, x) in mean.iter_mut().zip(&table[r * c..(r + 1) * c]) {
                    *m += *x as f64;
                }
            }
            let mean: Vec<f32> = mean.iter().map(|m| (m / old_rows as f64) as f32).collect();
            for r in old_rows..v {
                table[r * c..(r + 1) * c].copy_from_slice(&mean);
            }
            Ok(())
        }
        _ => bail!("unknown new_token_init {init:?}"),
    }
}

/// Load the HF model in `dir` for `cfg`, resized to `tok_vocab` rows of embedding and lm_head.
pub fn load_model<B: Backend>(
    backend: Arc<B>,
    dir: &Path,
    cfg: &TrainConfig,
    stage: Stage,
    tok_vocab: usize,
) -> Result<Llama<B>> {
    let mut config = LlamaConfig::load(&dir.join("config.json"))?;
    check_vocab_pair(stage, config.vocab_size, tok_vocab)?;
    let old_vocab = config.vocab_size;
    config.vocab_size = tok_vocab;
    config
        .raw
        .insert("vocab_size".into(), serde_json::json!(tok_vocab));
    let ck = Checkpoint::open(dir)?;
    let spec = train_spec(cfg)?;
    let c = config.hidden_size;
    Llama::new(backend, config, spec, |e, out| match e.kind {
        Kind::LoraA { .. } | Kind::LoraB { .. } => Ok(false),
        Kind::Embedding | Kind::LmHead if old_vocab != tok_vocab => {
            ck.read_into(&e.name, &[old_vocab, c], &mut out[..old_vocab * c])?;
            init_new_rows(out, old_vocab, c, &cfg.new_token_init)?;
            Ok(true)
        }
        _ => {
            ck.read_into(&e.name, &e.shape, out)?;
            Ok(true)
        }
    })
    .with_context(|| format!("cannot load the model in {}", dir.display()))
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
    let finite = host.trainable.iter().all(|x| x.is_finite());
    ensure!(finite, "refusing to write non-finite weights");
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
