//! `zhllama tokenize`: one input line → one JSON array of ids (no BOS/EOS) per output line.

use anyhow::{Context, Result};
use std::io::Write;

/// Decimal digits of `v` appended to `out` (no `fmt` machinery: this runs once per token).
fn push_u32(out: &mut Vec<u8>, mut v: u32) {
    let mut buf = [0u8; 10];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}
use std::path::PathBuf;
use zhllama::vocab::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// A SentencePiece `.model` file, or a directory holding `tokenizer.model`.
    #[arg(long)]
    tokenizer: PathBuf,
    /// UTF-8 text, one example per line.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the JSON lines (written atomically); stdout when absent.
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(out) = &args.output {
        zhllama::util::output::check_output_file(
            "--output",
            out,
            &[("--input", &args.input), ("--tokenizer", &args.tokenizer)],
        )?;
    }
    let tok = Tokenizer::load(&args.tokenizer)?;
    let bytes = std::fs::read(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!("{}: line {line}: not valid UTF-8", args.input.display())
    })?;
    // One output line per input line; a final newline does not start another line.
    let body = text.strip_suffix('\n').unwrap_or(&text);
    let lines: Vec<&str> = if text.is_empty() {
        Vec::new()
    } else {
        body.split('\n').collect()
    };
    let ids = tok.encode_batch(&lines);
    let mut out = Vec::with_capacity(ids.iter().map(|v| v.len() * 6 + 3).sum());
    for v in &ids {
        out.push(b'[');
        for (i, id) in v.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_u32(&mut out, *id);
        }
        out.extend_from_slice(b"]\n");
    }
    match &args.output {
        Some(p) => zhllama::util::write_atomic(p, &out)?,
        None => std::io::stdout().lock().write_all(&out)?,
    }
    Ok(())
}
