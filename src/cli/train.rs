//! `zhllama train --stage pt1|pt2|sft ...`: argument parsing and glue; the work is in `zhllama::train`.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::dryrun;

use super::backend::{BackendKind, local_rank, open_cuda};

#[derive(clap::Args)]
#[command(
    after_help = "Any config key can be overridden with `--key value` (dashes or \
underscores), before or after the options above, e.g. `--learning-rate 5e-5 --lora-targets q_proj,v_proj`."
)]
pub struct Args {
    /// Recipe stage: pt1 (embedding only), pt2 (LoRA q,k,v,o + embed + lm_head), sft.
    #[arg(long)]
    pub stage: Stage,
    /// HF LLaMA model directory (config.json + safetensors); config.json alone for --dry-run.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// SentencePiece tokenizer.model; the model's vocab is resized to its size.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The model's original tokenizer, for the mean-of-pieces init of new embedding rows
    /// (default: the first model-vocab pieces of --tokenizer, which a merged tokenizer extends).
    #[arg(long)]
    pub base_tokenizer: Option<PathBuf>,
    /// Token shards directory (pre-training blocks for pt1/pt2, SFT examples for sft).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory: checkpoints, metrics.jsonl, loss.png, the final adapter/weights.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Continue from the newest checkpoint in --output (a fresh start when there is none).
    #[arg(long)]
    pub resume: bool,
    /// Continue from this checkpoint directory (e.g. an older one when the newest is damaged).
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
    /// Start over in an --output that holds an earlier run (its checkpoints and metrics are removed).
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Start from this PEFT LoRA adapter (pt2, sft): its LoRA factors and its modules saved in
    /// full (resized with the vocabulary if it predates the resize); its r, lora_alpha and
    /// target_modules become the run's.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// TOML file of config keys applied over the stage preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print parameter counts and the memory plan as one JSON line, then exit (reads config.json only).
    #[arg(long)]
    pub dry_run: bool,
    /// Ranks to plan the memory for in --dry-run.
    #[arg(long)]
    pub world_size: Option<usize>,
    /// Tokenizer vocab size for --dry-run without a tokenizer file.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Storage precision for the --dry-run memory plan: f32 (CPU backend) or bf16 (CUDA, fp32 master).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Backend that runs the model (`cuda`: one GPU per process, chosen by the local rank).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Multi-process runs: a collective that waits longer than this many seconds (a barrier: ten
    /// times this, e.g. while rank 0 writes a large checkpoint) ends the job with a clear error
    /// instead of hanging; 0 disables the watchdog.
    #[arg(long, default_value_t = 60)]
    pub comm_timeout: u64,
    /// `--key value` config overrides.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0.., hide = true)]
    pub overrides: Vec<String>,
}

/// The run's config: stage preset, then the TOML file, then flags.
pub fn build_config(args: &Args) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::preset(args.stage);
    if let Some(path) = &args.config {
        cfg.merge_toml_file(path)?;
    }
    let mut it = args.overrides.iter();
    while let Some(flag) = it.next() {
        let Some(key) = flag.strip_prefix("--") else {
            bail!("unexpected argument {flag:?}: config overrides take the form --key value");
        };
        let (key, value) = match key.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .with_context(|| format!("--{key} needs a value"))?;
                (key.to_string(), v.clone())
            }
        };
        cfg.set(&key, &value)?;
    }
    if let Some(v) = args.max_steps {
        cfg.max_steps = v;
    }
    if let Some(v) = args.save_steps {
        cfg.save_steps = v;
    }
    if let Some(v) = args.seed {
        cfg.seed = v;
    }
    if let Some(v) = args.world_size {
        cfg.world_size = v;
    }
    Ok(cfg)
}

/// Named options that appear after a config override (clap hands everything after the first
/// unknown `--key` to `overrides`) are moved back into their fields.
fn take_named_options(args: &mut Args) -> Result<()> {
    let rest = std::mem::take(&mut args.overrides);
    let mut it = rest.into_iter().peekable();
    while let Some(flag) = it.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.clone(), None),
        };
        let is_flag = matches!(name.as_str(), "--resume" | "--dry-run" | "--overwrite");
        let named = matches!(
            name.as_str(),
            "--model"
                | "--tokenizer"
                | "--base-tokenizer"
                | "--data"
                | "--output"
                | "--max-steps"
                | "--save-steps"
                | "--seed"
                | "--config"
                | "--world-size"
                | "--vocab-size"
                | "--precision"
                | "--resume-from"
                | "--init-adapter"
                | "--backend"
                | "--comm-timeout"
        );
        if is_flag {
            match name.as_str() {
                "--resume" => args.resume = true,
                "--overwrite" => args.overwrite = true,
                _ => args.dry_run = true,
            }
            continue;
        }
        if !named {
            args.overrides.push(flag);
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().with_context(|| format!("{name} needs a value"))?,
        };
        let bad = || format!("{name}: cannot parse {value:?}");
        match name.as_str() {
            "--model" => args.model = Some(value.clone().into()),
            "--tokenizer" => args.tokenizer = Some(value.clone().into()),
            "--base-tokenizer" => args.base_tokenizer = Some(value.clone().into()),
            "--data" => args.data = Some(value.clone().into()),
            "--output" => args.output = Some(value.clone().into()),
            "--config" => args.config = Some(value.clone().into()),
            "--resume-from" => args.resume_from = Some(value.clone().into()),
            "--init-adapter" => args.init_adapter = Some(value.clone().into()),
            "--precision" => args.precision = value.clone(),
            "--backend" => {
                args.backend = <BackendKind as clap::ValueEnum>::from_str(&value, false)
                    .map_err(|e| anyhow::anyhow!("--backend: {e}"))?
            }
            "--max-steps" => args.max_steps = Some(value.parse().with_context(bad)?),
            "--save-steps" => args.save_steps = Some(value.parse().with_context(bad)?),
            "--seed" => args.seed = Some(value.parse().with_context(bad)?),
            "--world-size" => args.world_size = Some(value.parse().with_context(bad)?),
            "--comm-timeout" => args.comm_timeout = value.parse().with_context(bad)?,
            _ => args.vocab_size = Some(value.parse().with_context(bad)?),
        }
    }
    if args.model.is_none() {
        bail!("--model DIR is required");
    }
    Ok(())
}

pub fn run(mut args: Args) -> Result<()> {
    take_named_options(&mut args)?;
    let cfg = build_config(&args)?;
    let model_dir = args.model.clone().expect("checked above");
    if args.dry_run {
        cfg.validate()?;
        let dims = dryrun::Dims::from_model_dir(&model_dir)?;
        let vocab = match (args.vocab_size, &args.tokenizer) {
            (Some(v), _) => v,
            (None, Some(path)) => tokenizer_size(path)?,
            (None, None) => dims.vocab_size,
        };
        let line = dryrun::plan(
            &dims,
            &cfg,
            &args.stage.to_string(),
            vocab,
            cfg.world_size,
            &args.precision,
        )?;
        println!("{line}");
        return Ok(());
    }
    match args.backend {
        BackendKind::Cpu => train(
            std::sync::Arc::new(zhllama::backend::cpu::CpuBackend::new()),
            args,
            cfg,
            &model_dir,
        ),
        // fp16 mode: f16 storage on the device (the loss scaler keeps its gradients in range).
        BackendKind::Cuda => {
            let be = open_cuda(local_rank()?, false, cfg.fp16)?;
            check_device_memory(&be, &args, &cfg, &model_dir)?;
            train(std::sync::Arc::new(be), args, cfg, &model_dir)
        }
    }
}

/// Refuse a GPU run whose memory plan (the dry run's, bf16 storage, this launch's world size)
/// exceeds the device's free memory, before any weight is loaded.
fn check_device_memory(
    be: &zhllama::backend::cuda::CudaBackend,
    args: &Args,
    cfg: &TrainConfig,
    model_dir: &std::path::Path,
) -> Result<()> {
    zhllama::model::llama::check_model_dir(model_dir)?;
    let vars: std::collections::HashMap<String, String> = std::env::vars().collect();
    let world = zhllama::distributed::launch_info(&vars)?.map_or(1, |l| l.world_size);
    let (free, _) = be.mem_info()?;
    let stage = args.stage.to_string();
    super::memory::check_device(model_dir, "training", be.device_name(), free as u64, |d| {
        let vocab = match (args.vocab_size, &args.tokenizer) {
            (Some(v), _) => v,
            (None, Some(path)) => tokenizer_size(path)?,
            (None, None) => d.vocab_size,
        };
        let plan = dryrun::plan(d, cfg, &stage, vocab, world, "bf16")?;
        Ok(plan["total_bytes_per_rank"].as_u64().unwrap_or(u64::MAX))
    })
}

/// Number of pieces in a SentencePiece model file.
fn tokenizer_size(path: &std::path::Path) -> Result<usize> {
    Ok(zhllama::vocab::encode::Tokenizer::load(path)?.vocab_size())
}

fn train<B: zhllama::backend::Backend>(
    backend: std::sync::Arc<B>,
    args: Args,
    cfg: TrainConfig,
    model_dir: &std::path::Path,
) -> Result<()> {
    cfg.validate()?;
    let data_dir = args.data.clone().context("--data DIR is required")?;
    let output = args.output.clone().context("--output DIR is required")?;
    let vars: std::collections::HashMap<String, String> = std::env::vars().collect();
    let launch = zhllama::distributed::launch_info(&vars)?;
    let watchdog =
        (args.comm_timeout > 0).then(|| std::time::Duration::from_secs(args.comm_timeout));
    let comm = zhllama::distributed::init(launch.as_ref(), watchdog)?;
    // GPUs at world > 1: the gradients travel over NCCL (bootstrapped over the MPI communicator);
    // `ZHLLAMA_NCCL_LIB` names a libnccl to try before `libnccl.so.2`.
    let comm = if args.backend == BackendKind::Cuda && comm.world_size() > 1 {
        let paths: Vec<PathBuf> = std::env::var_os("ZHLLAMA_NCCL_LIB")
            .map(|p| vec![PathBuf::from(p)])
            .unwrap_or_default();
        let device = super::backend::cuda_device(launch.as_ref().map_or(0, |l| l.local_rank))?;
        zhllama::distributed::init_nccl(comm, device, &paths, watchdog)?
    } else {
        comm
    };
    let comm: &dyn zhllama::distributed::Comm = &*comm;
    let result = train_rank(backend, args, cfg, model_dir, &data_dir, &output, comm);
    // A rank that fails alone must not leave the others waiting in a collective: say why and end
    // the whole job (MPI_Abort; NCCL's communicator is aborted first).
    if let (Err(e), true) = (&result, comm.world_size() > 1) {
        eprintln!(
            "error: rank {} of {}: {e:#}",
            comm.rank(),
            comm.world_size()
        );
        comm.abort(1);
    }
    result
}

/// The run on one rank once the communicator is up (see [`train`]).
fn train_rank<B: zhllama::backend::Backend>(
    backend: std::sync::Arc<B>,
    args: Args,
    mut cfg: TrainConfig,
    model_dir: &std::path::Path,
    data_dir: &std::path::Path,
    output: &std::path::Path,
    comm: &dyn zhllama::distributed::Comm,
) -> Result<()> {
    use zhllama::train::{checkpoint, data::Data, setup, trainer};
    if args.overwrite && (args.resume || args.resume_from.is_some()) {
        bail!("--overwrite starts over and --resume continues: give one of them");
    }
    let start = match (args.overwrite, args.resume || args.resume_from.is_some()) {
        (true, _) => zhllama::train::rundir::Start::Overwrite,
        (false, true) => zhllama::train::rundir::Start::Resume,
        (false, false) => zhllama::train::rundir::Start::Fresh,
    };
    let mut inputs: Vec<(&str, &std::path::Path)> =
        vec![("--model", model_dir), ("--data", data_dir)];
    if let Some(t) = &args.tokenizer {
        inputs.push(("--tokenizer", t));
    }
    if let Some(t) = &args.base_tokenizer {
        inputs.push(("--base-tokenizer", t));
    }
    // Held until the run ends: no second run writes this directory meanwhile.
    let _run_lock = zhllama::train::rundir::prepare(output, &inputs, start, comm.rank() == 0)?;
    let data = Data::open(data_dir)?;
    if let Some(t) = &args.tokenizer {
        zhllama::train::identity::check_tokenizer_matches_data(t, data_dir)?;
    }
    if (args.stage == Stage::Sft) != data.is_sft() {
        bail!(
            "stage {} needs {} data, {} holds {} data",
            args.stage,
            if args.stage == Stage::Sft {
                "SFT"
            } else {
                "pre-training"
            },
            data_dir.display(),
            if data.is_sft() { "SFT" } else { "pre-training" }
        );
    }
    let tokenizer = match &args.tokenizer {
        Some(p) => Some(zhllama::vocab::Tokenizer::load(p)?),
        None => None,
    };
    let base_tokenizer = match &args.base_tokenizer {
        Some(p) => Some(zhllama::vocab::Tokenizer::load(p)?),
        None => None,
    };
    // The data's vocab can exceed the tokenizer's by an added [PAD] (SFT on a 49953 tokenizer).
    let tok_vocab = match (&tokenizer, args.vocab_size) {
        (Some(t), _) => t.vocab_size().max(data.vocab_size()),
        (None, Some(v)) => v,
        // No tokenizer: keep the model's vocabulary (the data must fit in it).
        (None, None) => {
            let cfg_path = model_dir.join("config.json");
            zhllama::model::LlamaConfig::load(&cfg_path)?
                .vocab_size
                .max(data.vocab_size())
        }
    };
    let resume = match (&args.resume_from, args.resume) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => None,
        (None, true) => match checkpoint::latest(output)? {
            Some((dir, _)) => Some(dir),
            None => {
                if comm.rank() == 0 {
                    eprintln!(
                        "no checkpoint in {}: starting from the beginning",
                        output.display()
                    );
                }
                None
            }
        },
    };
    let resize_toks = tokenizer.as_ref().map(|new| setup::ResizeTokenizers {
        new,
        old: base_tokenizer.as_ref(),
    });
    let init = match &args.init_adapter {
        Some(dir) => {
            let ad = zhllama::model::peft::load_adapter(dir)
                .with_context(|| format!("--init-adapter {}", dir.display()))?;
            for note in setup::adopt_adapter_config(&mut cfg, args.stage, &ad, dir)? {
                if comm.rank() == 0 {
                    eprintln!("--init-adapter: {note}");
                }
            }
            cfg.validate()?;
            Some(ad)
        }
        None => None,
    };
    if args.backend == BackendKind::Cpu {
        zhllama::model::llama::check_model_dir(model_dir)?;
        let stage = args.stage.to_string();
        super::memory::check(model_dir, "training", |d| {
            let plan = dryrun::plan(d, &cfg, &stage, tok_vocab, cfg.world_size, "f32")?;
            Ok(plan["total_bytes_per_rank"].as_u64().unwrap_or(u64::MAX))
        })?;
    }
    let model = setup::load_model_init(
        backend,
        model_dir,
        &cfg,
        args.stage,
        tok_vocab,
        resize_toks,
        init.as_ref(),
    )?;
    if comm.rank() == 0 {
        let l = model.layout();
        eprintln!(
            "stage {}: {} trainable of {} parameters ({:.2}%), vocab {}, world {}, accumulation {}",
            args.stage,
            l.num_trainable(),
            l.num_params(),
            100.0 * l.num_trainable() as f64 / l.num_params() as f64,
            model.config().vocab_size,
            comm.world_size(),
            cfg.accumulation_steps(comm.world_size())?
        );
    }
    // Recorded (fresh run) or compared (resume) once every input has loaded.
    if comm.rank() == 0 {
        use zhllama::train::identity::{RunIdentity, record_or_check};
        let now = RunIdentity::compute(model_dir, args.tokenizer.as_deref(), data_dir)?;
        record_or_check(output, &now, start == zhllama::train::rundir::Start::Resume)?;
    }
    let mut t = trainer::Trainer::new(
        model,
        &data,
        cfg.clone(),
        args.stage,
        comm,
        output,
        resume.as_deref(),
    )?;
    let opts = trainer::RunOptions {
        resume_from: resume.clone(),
        progress: true,
        ..Default::default()
    };
    let summary = t.run(&opts)?;
    if comm.rank() == 0 {
        let out = setup::save_outputs(&t.model, &cfg, output, model_dir)?;
        let png = output.join("loss.png");
        if let Err(e) = zhllama::train::plot::plot_run(output, &png) {
            eprintln!("warning: no loss plot: {e:#}");
        }
        println!(
            "{}",
            serde_json::json!({
                "step": summary.step,
                "skipped_steps": summary.skipped_steps,
                "final_loss": summary.losses.last(),
                "output": out.display().to_string(),
                "checkpoint": summary.last_checkpoint.map(|p| p.display().to_string()),
            })
        );
    }
    comm.barrier()?;
    Ok(())
}
