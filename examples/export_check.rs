//! Helper for the llama.cpp oracle (`tools/oracle/llamacpp_check.sh`) and the export measurement
//! (docs/PERF.md): makes random HF models and prints our logits for fixed ids.
//!
//! - `make-model DIR VOCAB HIDDEN INTERMEDIATE LAYERS HEADS KV_HEADS f32|bf16 SEED INIT_STD`:
//!   a random model (HF init, normal(0, INIT_STD)) saved as an HF directory.
//! - `logits DIR IDS OUT`: the logits of `zhllama eval`'s forward (`Llama::forward_logits`, CPU)
//!   for the comma-separated ids IDS (one sequence), written to OUT as little-endian f32 `[T, V]`.
//! - `greedy DIR TOKENIZER PROMPT N`: the prompt ids and the greedy new ids that
//!   `zhllama generate --template raw --temperature 0 --repetition-penalty 1 --max-new-tokens N`
//!   computes (the same `encode_prompt` + `generate` calls), and their decoded text, as JSON.
//!
//! Run: `cargo run --release --example export_check -- make-model ...`.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::{Activations, Llama, LlamaConfig, SaveOptions, TrainSpec};
use zhllama::tensor::DType;

fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T> {
    s.parse()
        .ok()
        .with_context(|| format!("{what}: {s:?} is not a number"))
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    match a.first().map(String::as_str) {
        Some("make-model") if a.len() == 11 => {
            let n = |i: usize, w: &str| num::<usize>(&a[i], w);
            let mut cfg = LlamaConfig::new(
                n(2, "VOCAB")?,
                n(3, "HIDDEN")?,
                n(4, "INTERMEDIATE")?,
                n(5, "LAYERS")?,
                n(6, "HEADS")?,
                n(7, "KV_HEADS")?,
            );
            let dtype = match a[8].as_str() {
                "f32" => DType::F32,
                "bf16" => DType::BF16,
                d => bail!("dtype {d:?}: expected f32 or bf16"),
            };
            cfg.torch_dtype = Some(
                if dtype == DType::F32 {
                    "float32"
                } else {
                    "bfloat16"
                }
                .into(),
            );
            cfg.initializer_range = num(&a[10], "INIT_STD")?;
            let m = Llama::random(
                Arc::new(CpuBackend::new()),
                cfg,
                TrainSpec::frozen(),
                num(&a[9], "SEED")?,
            )?;
            m.save_hf(
                Path::new(&a[1]),
                SaveOptions {
                    dtype,
                    max_shard_bytes: None,
                },
            )
        }
        Some("logits") if a.len() == 4 => {
            let m = Llama::from_dir(
                Arc::new(CpuBackend::new()),
                Path::new(&a[1]),
                TrainSpec::frozen(),
            )?;
            let ids: Vec<i32> = a[2]
                .split(',')
                .map(|s| num(s.trim(), "IDS"))
                .collect::<Result<_>>()?;
            let v = m.config().vocab_size;
            let mut acts = Activations::new_inference(&m, 1, ids.len())?;
            m.forward_logits(&mut acts, &ids)?;
            let mut l = vec![0.0f32; ids.len() * v];
            m.backend().download(acts.logits(), &mut l)?;
            let bytes: Vec<u8> = l.iter().flat_map(|x| x.to_le_bytes()).collect();
            zhllama::util::write_atomic(Path::new(&a[3]), &bytes)
        }
        Some("greedy") if a.len() == 5 => {
            use zhllama::data::sft::{Template, encode_prompt};
            use zhllama::model::generate::{SamplingConfig, generate};
            let m = Llama::from_dir(
                Arc::new(CpuBackend::new()),
                Path::new(&a[1]),
                TrainSpec::frozen(),
            )?;
            let enc = zhllama::data::TokenizerEncoder::new(zhllama::vocab::Tokenizer::load(
                Path::new(&a[2]),
            )?)?;
            let prompt = encode_prompt(&zhllama::data::HfText::new(&enc), &a[3], Template::Raw);
            let cfg = SamplingConfig::greedy(num(&a[4], "N")?);
            let eos = zhllama::data::Encoder::eos_id(&enc);
            let ids = generate(&m, &prompt, &cfg, Some(eos), |_| {})?;
            let text = enc.tokenizer.decode(&ids);
            println!(
                "{}",
                serde_json::json!({"prompt_ids": prompt, "ids": ids, "text": text})
            );
            Ok(())
        }
        _ => bail!(
            "usage: export_check make-model DIR VOCAB HIDDEN INTERMEDIATE LAYERS HEADS KV_HEADS \
             f32|bf16 SEED INIT_STD | logits DIR IDS OUT | greedy DIR TOKENIZER PROMPT N"
        ),
    }
}
