//! The demo's pipeline: the whole recipe, as a user would run it, on the built-in data of
//! [`super::corpus`], in one run folder.
//!
//! 1. train a small base vocabulary (BPE, byte fallback: the stand-in for LLaMA's) and a Chinese
//!    vocabulary (unigram, as the released `chinese_sp.model`) with the project's trainer, and
//!    merge them with the real merge code (plus the `[PAD]` variant for SFT);
//! 2. train a tiny base model from scratch on the mostly-English corpus (the stand-in for LLaMA);
//! 3. resize its embedding and lm_head to the merged vocabulary (mean of the old pieces);
//! 4. pre-training stage 1 (embedding only), stage 2 (LoRA q,k,v,o + embedding + lm_head), merge;
//! 5. SFT (LoRA on all seven projections + embedding + lm_head, response-only loss), merge;
//! 6. measure: held-out Chinese loss after every stage (one tokenizer, so comparable) and
//!    exact-match accuracy of greedy generation on held-out instruction tasks before and after SFT.
//!
//! Everything is seeded; the run folder keeps inputs, tokenizers, shards, every stage's metrics,
//! loss curves, adapters and merged models, and `report.json` / `report.md` / `samples.txt`.

use super::corpus::{self, Record};
use crate::backend::cpu::CpuBackend;
use crate::data::TokenizerEncoder;
use crate::data::pretrain::{PretrainConfig, build_pretrain};
use crate::data::sft::{SftConfig, build_prompt, build_sft};
use crate::distributed::LocalComm;
use crate::model::generate::{SamplingConfig, generate};
use crate::model::resize::{NewRows, resize_rows};
use crate::model::weights::{Checkpoint, HostTensor, SaveOptions, save_model_dir};
use crate::model::{Llama, LlamaConfig, TrainSpec, eval_loss};
use crate::tensor::DType;
use crate::train::config::{Stage, TrainConfig};
use crate::train::data::Data;
use crate::train::{setup, trainer};
use crate::util::write_atomic;
use crate::vocab::proto::ModelType;
use crate::vocab::train::{TrainOptions, train as train_vocab};
use crate::vocab::{Tokenizer, merge_tokenizers};
use anyhow::{Context, Result, ensure};
use serde::Serialize;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Longest SFT example (prompt + answer) in tokens; the demo's are far shorter.
const SFT_MAX_LEN: usize = 256;

/// The instruction of the pre-training paragraphs mixed into the SFT set ("write a paragraph").
const SFT_MIX_INSTRUCTION: &str = "写一段话。";

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The run folder (created; must not exist or be empty).
    pub out_dir: PathBuf,
    /// A smaller, faster run (under a minute on 2 cores).
    pub quick: bool,
    pub seed: u64,
    /// Progress bars and per-stage lines on stderr.
    pub verbose: bool,
}

/// Sizes and step counts of one demo run.
#[derive(Clone, Debug, Serialize)]
pub struct DemoPlan {
    pub data_scale: f64,
    pub base_vocab: usize,
    pub zh_vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub block: usize,
    pub base_steps: u64,
    pub pt1_steps: u64,
    pub pt2_steps: u64,
    pub sft_steps: u64,
    /// Pre-training paragraphs mixed into the SFT set (the SFT tasks are 1200 records).
    pub sft_pretrain_mix: usize,
    pub batch: usize,
}

impl DemoPlan {
    pub fn new(quick: bool) -> DemoPlan {
        if quick {
            DemoPlan {
                data_scale: 1.0,
                base_vocab: 800,
                zh_vocab: 700,
                hidden: 128,
                layers: 3,
                heads: 4,
                kv_heads: 2,
                ffn: 344,
                block: 128,
                base_steps: 150,
                pt1_steps: 10,
                pt2_steps: 50,
                sft_steps: 450,
                sft_pretrain_mix: 30,
                batch: 16,
            }
        } else {
            DemoPlan {
                data_scale: 1.0,
                base_vocab: 800,
                zh_vocab: 700,
                hidden: 128,
                layers: 3,
                heads: 4,
                kv_heads: 2,
                ffn: 344,
                block: 128,
                base_steps: 200,
                pt1_steps: 40,
                pt2_steps: 60,
                sft_steps: 450,
                sft_pretrain_mix: 100,
                batch: 16,
            }
        }
    }
}

/// One row of the results table.
#[derive(Clone, Debug, Serialize)]
pub struct StageRow {
    pub stage: String,
    /// Mean token cross-entropy on held-out Chinese text (merged tokenizer).
    pub heldout_loss: f64,
    pub seconds: f64,
}

impl StageRow {
    /// The row of stage `stage`: the held-out loss of the model in `model_dir`.
    fn measure(
        stage: &str,
        model_dir: &Path,
        heldout: &[Vec<i32>],
        seconds: f64,
    ) -> Result<StageRow> {
        Ok(StageRow {
            stage: stage.into(),
            heldout_loss: heldout_loss(model_dir, heldout)?,
            seconds,
        })
    }
}

/// One held-out instruction task and what the models answered.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub instruction: String,
    pub input: String,
    pub expected: String,
    pub before_sft: String,
    pub after_sft: String,
}

/// What the demo measured.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub plan: DemoPlan,
    pub stages: Vec<StageRow>,
    pub heldout_tasks: usize,
    pub accuracy_before_sft: f64,
    pub accuracy_after_sft: f64,
    pub samples: Vec<Sample>,
    pub total_seconds: f64,
}

impl DemoReport {
    /// The results table printed at the end of the demo.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str("| stage | held-out zh loss | seconds |\n|---|---:|---:|\n");
        for r in &self.stages {
            s.push_str(&format!(
                "| {} | {:.4} | {:.1} |\n",
                r.stage, r.heldout_loss, r.seconds
            ));
        }
        let loss = |prefix: &str| {
            self.stages
                .iter()
                .find(|r| r.stage.starts_with(prefix))
                .map(|r| r.heldout_loss)
        };
        if let (Some(pt2), Some(sft)) = (loss("pt2"), loss("sft")) {
            s.push_str(&format!(
                "\nheld-out zh loss after SFT vs after pt2: {:+.1}%\n",
                100.0 * (sft / pt2 - 1.0)
            ));
        }
        s.push_str(&format!(
            "\nexact match on {} held-out instruction tasks: before SFT {:.1}%, after SFT {:.1}%\n",
            self.heldout_tasks,
            100.0 * self.accuracy_before_sft,
            100.0 * self.accuracy_after_sft
        ));
        s
    }
}

fn log(opts: &DemoOptions, msg: &str) {
    if opts.verbose {
        eprintln!("[demo] {msg}");
    }
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    write_atomic(path, (lines.join("\n") + "\n").as_bytes())
}

fn write_records(path: &Path, recs: &[Record]) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(recs)?.as_bytes())
}

fn vocab(
    sentences: &[String],
    size: usize,
    model_type: ModelType,
    byte_fallback: bool,
    out: &Path,
) -> Result<()> {
    let refs: Vec<&str> = sentences.iter().map(|s| s.as_str()).collect();
    let opt = TrainOptions {
        vocab_size: size,
        model_type,
        character_coverage: 0.9995,
        byte_fallback,
        max_piece_chars: 16,
        input_description: "zhllama demo corpus".into(),
    };
    let (model, _) = train_vocab(&refs, &opt)?;
    std::fs::create_dir_all(out)?;
    write_atomic(&out.join("tokenizer.model"), &model.to_bytes())
}

/// A copy of the HF model in `src` with embedding and lm_head grown to `new_tok`'s size, new rows
/// initialised from the old tokenizer's pieces (docs/RECIPE.md §1's resize, `model::resize`).
fn resize_model(src: &Path, dst: &Path, old_tok: &Tokenizer, new_tok: &Tokenizer) -> Result<()> {
    let mut config = LlamaConfig::load(&src.join("config.json"))?;
    let ck = Checkpoint::open(src)?;
    let (old_v, c, new_v) = (config.vocab_size, config.hidden_size, new_tok.vocab_size());
    let mut tensors = Vec::new();
    for name in ck.names() {
        let name = name.to_string();
        let (shape, data) = ck.read(&name)?;
        let data = if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            resize_rows(
                &data,
                old_v,
                c,
                new_v,
                old_tok,
                new_tok,
                NewRows::MeanOfPieces,
            )
            .with_context(|| format!("resizing {name}"))?
        } else {
            data
        };
        let shape = if data.len() != shape.iter().product::<usize>() {
            vec![new_v, c]
        } else {
            shape
        };
        tensors.push(HostTensor {
            name,
            shape,
            data: Cow::Owned(data),
        });
    }
    config.vocab_size = new_v;
    config
        .raw
        .insert("vocab_size".into(), serde_json::json!(new_v));
    save_model_dir(
        dst,
        &config,
        &tensors,
        SaveOptions {
            dtype: DType::F32,
            max_shard_bytes: None,
        },
    )
}

/// One training stage of the demo: its kind and settings, the shards it reads and its output folder.
struct StageRun<'a> {
    stage: Stage,
    cfg: TrainConfig,
    data_dir: &'a Path,
    out: &'a Path,
}

/// Train `model` as `run` says; returns the written output (model dir or adapter dir).
fn run_stage(
    opts: &DemoOptions,
    model: Llama<CpuBackend>,
    run: StageRun<'_>,
    base: &Path,
) -> Result<PathBuf> {
    let StageRun {
        stage,
        cfg,
        data_dir,
        out,
    } = run;
    let comm = LocalComm;
    let data = Data::open(data_dir)?;
    let mut t = trainer::Trainer::new(model, &data, cfg.clone(), stage, &comm, out, None)?;
    let run = trainer::RunOptions {
        progress: opts.verbose,
        ..Default::default()
    };
    let summary = t.run(&run)?;
    ensure!(
        summary.skipped_steps == 0,
        "{}: {} steps skipped (non-finite)",
        out.display(),
        summary.skipped_steps
    );
    let written = setup::save_outputs(&t.model, &cfg, out, base)?;
    if let Err(e) = crate::train::plot::plot_run(out, &out.join("loss.png")) {
        log(opts, &format!("no loss plot for {}: {e:#}", out.display()));
    }
    Ok(written)
}

/// Load `model_dir` for `run.stage` at `vocab` rows, train it as `run` says, and return the
/// stage's model: stage 1 writes a whole model; a LoRA stage's adapter is merged into
/// `run.out/merged`.
fn train_stage(
    opts: &DemoOptions,
    be: &Arc<CpuBackend>,
    model_dir: &Path,
    vocab: usize,
    run: StageRun<'_>,
) -> Result<PathBuf> {
    let lora = !run.cfg.lora_targets.is_empty();
    let out = run.out;
    let model = setup::load_model(be.clone(), model_dir, &run.cfg, run.stage, vocab, None)?;
    let written = run_stage(opts, model, run, model_dir)?;
    if !lora {
        return Ok(written);
    }
    let merged = out.join("merged");
    merge_adapters(model_dir, &[written], &merged)?;
    Ok(merged)
}

fn stage_cfg(stage: Stage, plan: &DemoPlan, steps: u64, lr: f64, seed: u64) -> TrainConfig {
    let mut cfg = TrainConfig::preset(stage);
    cfg.batch_size = plan.batch;
    cfg.micro_batch_size = plan.batch;
    cfg.max_steps = steps;
    cfg.learning_rate = lr;
    cfg.max_length = plan.block.max(128);
    cfg.save_steps = 0;
    cfg.save_total_limit = 1;
    cfg.logging_steps = 1;
    cfg.eval_steps = 0;
    cfg.seed = seed;
    cfg
}

fn heldout_loss(model_dir: &Path, seqs: &[Vec<i32>]) -> Result<f64> {
    let model = Llama::from_dir(Arc::new(CpuBackend::new()), model_dir, TrainSpec::frozen())?;
    let (loss, _tokens) = eval_loss(&model, seqs)?;
    Ok(loss)
}

/// Greedy answers of the model in `model_dir` to `tasks` (Alpaca template, BOS, stop at `</s>`).
fn answers(model_dir: &Path, tok: &Tokenizer, tasks: &[Record]) -> Result<Vec<String>> {
    let model = Llama::from_dir(Arc::new(CpuBackend::new()), model_dir, TrainSpec::frozen())?;
    let eos = tok.eos_id();
    let bos = tok.bos_id().context("tokenizer has no <s>")?;
    tasks
        .iter()
        .map(|r| {
            let mut ids = vec![bos];
            ids.extend(tok.encode(&build_prompt(r)));
            let out = generate(&model, &ids, &SamplingConfig::greedy(24), eos, |_| {})?;
            Ok(tok.decode(&out).trim().to_string())
        })
        .collect()
}

/// Run the demo; see the module docs.
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    let t0 = Instant::now();
    let plan = DemoPlan::new(opts.quick);
    let out = &opts.out_dir;
    if out.exists() {
        ensure!(
            std::fs::read_dir(out)?.next().is_none(),
            "{} exists and is not empty: choose another --output",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let seed = opts.seed;

    log(opts, "generating the built-in corpus and instruction tasks");
    let data = corpus::generate(seed, plan.data_scale);
    let inputs = out.join("inputs");
    std::fs::create_dir_all(&inputs)?;
    write_lines(&inputs.join("base_corpus.txt"), &data.base_corpus)?;
    write_lines(&inputs.join("zh_corpus.txt"), &data.zh_corpus)?;
    write_lines(&inputs.join("zh_heldout.txt"), &data.zh_heldout)?;
    write_records(&inputs.join("sft_train.json"), &data.sft_train)?;
    // The recipe's SFT data keeps the language model: pre-training text mixed into the SFT set, as
    // "write a paragraph" records whose response is a Chinese paragraph (response-only loss).
    let mix: Vec<Record> = data
        .zh_corpus
        .iter()
        .take(plan.sft_pretrain_mix)
        .map(|p| Record {
            instruction: SFT_MIX_INSTRUCTION.into(),
            input: String::new(),
            output: p.clone(),
        })
        .collect();
    write_records(&inputs.join("sft_pretrain_mix.json"), &mix)?;
    write_records(&inputs.join("sft_heldout.json"), &data.sft_heldout)?;

    log(
        opts,
        "training the base and Chinese vocabularies, merging them",
    );
    let toks = out.join("tokenizers");
    vocab(
        &data.base_corpus,
        plan.base_vocab,
        ModelType::Bpe,
        true,
        &toks.join("base"),
    )?;
    vocab(
        &data.zh_corpus,
        plan.zh_vocab,
        ModelType::Unigram,
        false,
        &toks.join("chinese"),
    )?;
    let zh_model = toks.join("chinese/tokenizer.model");
    let merged = merge_tokenizers(&toks.join("base"), &zh_model, &toks.join("merged"), false)?;
    let _ = merge_tokenizers(
        &toks.join("base"),
        &zh_model,
        &toks.join("merged_pad"),
        true,
    )?;
    log(
        opts,
        &format!(
            "merged vocabulary: {} appended, {} skipped, {} pieces",
            merged.appended, merged.skipped, merged.total
        ),
    );
    let base_tok = Tokenizer::load(&toks.join("base"))?;
    let merged_tok = Tokenizer::load(&toks.join("merged"))?;
    let pad_tok = Tokenizer::load(&toks.join("merged_pad"))?;

    log(opts, "tokenizing: pre-training blocks and SFT examples");
    let shards = out.join("data");
    std::fs::create_dir_all(&shards)?;
    let pcfg = PretrainConfig {
        block_size: plan.block,
        validation_fraction: 0.02,
        seed,
        ..Default::default()
    };
    build_pretrain(
        &TokenizerEncoder::new(Tokenizer::load(&toks.join("base"))?)?,
        &[inputs.join("base_corpus.txt")],
        &shards.join("base"),
        &pcfg,
    )?;
    build_pretrain(
        &TokenizerEncoder::new(Tokenizer::load(&toks.join("merged"))?)?,
        &[inputs.join("zh_corpus.txt")],
        &shards.join("zh"),
        &pcfg,
    )?;
    let scfg = SftConfig {
        max_len: SFT_MAX_LEN,
        ..Default::default()
    };
    build_sft(
        &TokenizerEncoder::new(Tokenizer::load(&toks.join("merged_pad"))?)?,
        &[
            inputs.join("sft_train.json"),
            inputs.join("sft_pretrain_mix.json"),
        ],
        &shards.join("sft"),
        &scfg,
    )?;
    let bos = merged_tok.bos_id().context("merged tokenizer has no <s>")? as i32;
    let heldout: Vec<Vec<i32>> = data
        .zh_heldout
        .iter()
        .map(|l| {
            std::iter::once(bos)
                .chain(merged_tok.encode(l).into_iter().map(|i| i as i32))
                .take(plan.block)
                .collect()
        })
        .collect();

    let mut stages = Vec::new();
    let be = Arc::new(CpuBackend::new());

    // 2. The stand-in for LLaMA: a tiny model trained from scratch on the base corpus.
    log(opts, "training the base model from scratch");
    let ts = Instant::now();
    let mut config = LlamaConfig::new(
        base_tok.vocab_size(),
        plan.hidden,
        plan.ffn,
        plan.layers,
        plan.heads,
        plan.kv_heads,
    );
    config.max_position_embeddings = 512;
    let base_model = Llama::random(be.clone(), config, TrainSpec::full(), seed)?;
    let mut cfg = stage_cfg(Stage::Pt1, &plan, plan.base_steps, 3e-3, seed);
    cfg.warmup_ratio = 0.05;
    cfg.weight_decay = 0.01;
    let base_dir = run_stage(
        opts,
        base_model,
        StageRun {
            stage: Stage::Pt1,
            cfg,
            data_dir: &shards.join("base"),
            out: &out.join("base"),
        },
        &out.join("base"),
    )?;
    let base_secs = ts.elapsed().as_secs_f64();

    // 3. Resize to the merged vocabulary.
    let resized = out.join("base_resized");
    resize_model(&base_dir, &resized, &base_tok, &merged_tok)?;
    stages.push(StageRow::measure(
        "base (resized, before pt1)",
        &resized,
        &heldout,
        base_secs,
    )?);

    // 4. Pre-training stage 1: embedding only.
    log(opts, "pre-training stage 1 (embedding only)");
    let ts = Instant::now();
    let cfg = stage_cfg(Stage::Pt1, &plan, plan.pt1_steps, 2e-3, seed);
    let pt1_dir = train_stage(
        opts,
        &be,
        &resized,
        merged_tok.vocab_size(),
        StageRun {
            stage: Stage::Pt1,
            cfg,
            data_dir: &shards.join("zh"),
            out: &out.join("pt1"),
        },
    )?;
    stages.push(StageRow::measure(
        "pt1 (embedding)",
        &pt1_dir,
        &heldout,
        ts.elapsed().as_secs_f64(),
    )?);

    // Pre-training stage 2: LoRA q,k,v,o + embedding + lm_head, merged back.
    log(opts, "pre-training stage 2 (LoRA + embedding + lm_head)");
    let ts = Instant::now();
    let cfg = stage_cfg(Stage::Pt2, &plan, plan.pt2_steps, 2e-3, seed);
    let pt2_dir = train_stage(
        opts,
        &be,
        &pt1_dir,
        merged_tok.vocab_size(),
        StageRun {
            stage: Stage::Pt2,
            cfg,
            data_dir: &shards.join("zh"),
            out: &out.join("pt2"),
        },
    )?;
    stages.push(StageRow::measure(
        "pt2 (LoRA, merged)",
        &pt2_dir,
        &heldout,
        ts.elapsed().as_secs_f64(),
    )?);

    // 5. SFT on the Alpaca-format tasks, with the [PAD] tokenizer (one more row).
    log(
        opts,
        "instruction tuning (LoRA on all projections + embedding + lm_head)",
    );
    let ts = Instant::now();
    let pt2_pad = out.join("pt2/merged_pad");
    resize_model(&pt2_dir, &pt2_pad, &merged_tok, &pad_tok)?;
    let mut cfg = stage_cfg(Stage::Sft, &plan, plan.sft_steps, 2e-3, seed);
    cfg.max_length = SFT_MAX_LEN;
    let sft_dir = train_stage(
        opts,
        &be,
        &pt2_pad,
        pad_tok.vocab_size(),
        StageRun {
            stage: Stage::Sft,
            cfg,
            data_dir: &shards.join("sft"),
            out: &out.join("sft"),
        },
    )?;
    stages.push(StageRow::measure(
        "sft (LoRA, merged)",
        &sft_dir,
        &heldout,
        ts.elapsed().as_secs_f64(),
    )?);

    // 6. Held-out instruction tasks, before and after SFT.
    log(opts, "generating answers to held-out instruction tasks");
    let before = answers(&pt2_dir, &pad_tok, &data.sft_heldout)?;
    let after = answers(&sft_dir, &pad_tok, &data.sft_heldout)?;
    let acc = |ans: &[String]| {
        ans.iter()
            .zip(&data.sft_heldout)
            .filter(|(a, r)| **a == r.output)
            .count() as f64
            / data.sft_heldout.len() as f64
    };
    let samples: Vec<Sample> = data
        .sft_heldout
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(r, (b, a))| Sample {
            instruction: r.instruction.clone(),
            input: r.input.clone(),
            expected: r.output.clone(),
            before_sft: b.clone(),
            after_sft: a.clone(),
        })
        .collect();
    let report = DemoReport {
        plan,
        stages,
        heldout_tasks: data.sft_heldout.len(),
        accuracy_before_sft: acc(&before),
        accuracy_after_sft: acc(&after),
        samples,
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomic(&out.join("report.md"), report.table().as_bytes())?;
    let text: Vec<String> = report
        .samples
        .iter()
        .map(|s| {
            format!(
                "instruction: {}\ninput: {}\nexpected: {}\nbefore SFT: {}\nafter SFT: {}\n",
                s.instruction, s.input, s.expected, s.before_sft, s.after_sft
            )
        })
        .collect();
    write_lines(&out.join("samples.txt"), &text)?;
    Ok(report)
}

fn merge_adapters(base: &Path, adapters: &[PathBuf], out: &Path) -> Result<()> {
    let loaded = adapters
        .iter()
        .map(|a| crate::model::peft::load_adapter(a))
        .collect::<Result<Vec<_>>>()?;
    crate::model::peft::merge_into_dir(base, &loaded, out, 2 << 30)
}
