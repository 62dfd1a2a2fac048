//! `zhllama generate --model DIR [--adapter DIR ...] --tokenizer PATH (--prompt TEXT | --input FILE
//! | interactive stdin)`: text from a model (adapters merged in order), with a KV cache, streamed
//! to stdout as tokens come.
//!
//! `--prompt`: one generation, then a newline. `--input FILE`: one prompt per line, one output
//! line each (newlines inside an output are written as `\n`). Neither: read prompts from stdin
//! line by line (interactive), answering each.

use anyhow::{Context, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::data::sft::{Template, encode_prompt};
use zhllama::data::{HfText, TokenizerEncoder};
use zhllama::model::Llama;
use zhllama::model::generate::{ExpectVocab, SamplingConfig, StreamDecoder, generate, load_merged};

use super::backend::{BackendKind, local_rank, open_cuda};

#[derive(Clone, Copy, clap::ValueEnum)]
enum TemplateArg {
    /// Stanford Alpaca's instruction prompt (as SFT training used).
    Alpaca,
    /// The prompt as is.
    Raw,
}

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory, merged into the model; repeat to merge several in order.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// A SentencePiece `.model` file, or a directory holding `tokenizer.model`.
    #[arg(long)]
    tokenizer: PathBuf,
    /// One prompt.
    #[arg(long, conflicts_with = "input")]
    prompt: Option<String>,
    /// A UTF-8 file of prompts, one per line.
    #[arg(long)]
    input: Option<PathBuf>,
    /// How the prompt is wrapped before tokenization.
    #[arg(long, value_enum, default_value = "alpaca")]
    template: TemplateArg,
    /// Most tokens generated per prompt.
    #[arg(long, default_value_t = SamplingConfig::default().max_new_tokens)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = SamplingConfig::default().temperature)]
    temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    #[arg(long, default_value_t = SamplingConfig::default().top_k)]
    top_k: usize,
    /// Nucleus sampling mass; 1 = off.
    #[arg(long, default_value_t = SamplingConfig::default().top_p)]
    top_p: f32,
    /// Penalty on tokens already in the prompt or output (HF semantics); 1 = off.
    #[arg(long, default_value_t = SamplingConfig::default().repetition_penalty)]
    repetition_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = SamplingConfig::default().seed)]
    seed: u64,
    /// Backend that runs the model.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

struct Session<'a, B: Backend> {
    model: Llama<B>,
    enc: &'a TokenizerEncoder,
    cfg: SamplingConfig,
    template: Template,
}

impl<B: Backend> Session<'_, B> {
    /// Generate for `prompt`, writing the text to `out` as it comes (newlines escaped when
    /// `one_line`), then a newline.
    fn answer(&self, prompt: &str, out: &mut impl Write, one_line: bool) -> Result<()> {
        let hf = HfText::new(self.enc);
        let ids = encode_prompt(&hf, prompt, self.template);
        let mut dec = StreamDecoder::new(&self.enc.tokenizer);
        let mut io_err: Option<std::io::Error> = None;
        let mut emit = |s: String, out: &mut dyn Write| {
            if s.is_empty() || io_err.is_some() {
                return;
            }
            let s = if one_line { s.replace('\n', "\\n") } else { s };
            if let Err(e) = out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
                io_err = Some(e);
            }
        };
        generate(
            &self.model,
            &ids,
            &self.cfg,
            Some(
                self.enc
                    .tokenizer
                    .eos_id()
                    .expect("checked by TokenizerEncoder"),
            ),
            |id| emit(dec.push(id), out),
        )?;
        emit(dec.finish(), out);
        if let Some(e) = io_err {
            return Err(e).context("cannot write to stdout");
        }
        writeln!(out).context("cannot write to stdout")?;
        Ok(())
    }
}

pub fn run(args: Args) -> Result<()> {
    match args.backend {
        BackendKind::Cpu => {
            zhllama::model::llama::check_model_dir(&args.model)
                .with_context(|| format!("cannot load model {}", args.model.display()))?;
            super::memory::check_inference(&args.model, "generate")?;
            run_on(Arc::new(CpuBackend::new()), &args)
        }
        BackendKind::Cuda => run_on(Arc::new(open_cuda(local_rank()?, false, false)?), &args),
    }
}

fn run_on<B: Backend>(backend: Arc<B>, args: &Args) -> Result<()> {
    let cfg = SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
    };
    cfg.validate()?;
    let enc = TokenizerEncoder::load(&args.tokenizer)?;
    let expect = ExpectVocab::of_tokenizer(&enc.tokenizer, &args.tokenizer);
    let model = load_merged(backend, &args.model, &args.adapter, Some(&expect))?;
    let session = Session {
        model,
        enc: &enc,
        cfg,
        template: match args.template {
            TemplateArg::Alpaca => Template::Alpaca,
            TemplateArg::Raw => Template::Raw,
        },
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Some(p) = &args.prompt {
        return session.answer(p, &mut out, false);
    }
    if let Some(path) = &args.input {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            session
                .answer(line, &mut out, true)
                .with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        }
        return Ok(());
    }
    // Interactive: one prompt per stdin line until EOF.
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut lines = stdin.lock().lines();
    loop {
        if tty {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read stdin")?;
        session.answer(&line, &mut out, false)?;
    }
    Ok(())
}
