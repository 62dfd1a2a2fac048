//! The Chinese-LLaMA vocabulary merge (docs/RECIPE.md §1): append every piece of a second model whose
//! string the base model lacks, with `score = 0` written explicitly and the type left unset.

use super::proto::{ModelProto, Piece};
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What [`merge_models`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeStats {
    /// Pieces of `extra` appended to `base`.
    pub appended: usize,
    /// Pieces of `extra` already in `base` (exact string match, so `<unk>`, `<s>`, `</s>` too).
    pub skipped: usize,
    /// Pieces in the result (including `[PAD]` when added).
    pub total: usize,
}

/// Merge `extra` into `base` in place: walk `extra`'s pieces in order, append those whose string
/// is not yet a piece of `base`. `add_pad` then appends `[PAD]` (the Chinese-Alpaca variant).
/// `base`'s trainer and normalizer specs are kept unchanged.
pub fn merge_models(base: &mut ModelProto, extra: &ModelProto, add_pad: bool) -> MergeStats {
    let mut seen: HashSet<String> = base.pieces.iter().map(|p| p.piece.clone()).collect();
    let (mut appended, mut skipped) = (0, 0);
    for p in &extra.pieces {
        if seen.insert(p.piece.clone()) {
            base.pieces.push(Piece::new(&p.piece, 0.0));
            appended += 1;
        } else {
            skipped += 1;
        }
    }
    if add_pad && seen.insert("[PAD]".to_string()) {
        base.pieces.push(Piece::new("[PAD]", 0.0));
    }
    MergeStats {
        appended,
        skipped,
        total: base.pieces.len(),
    }
}

/// Write `files` (name → bytes) as directory `out_dir`, whole or not at all: everything goes into
/// a temp directory beside it (fsynced, removed on failure or signal), which then replaces
/// `out_dir` through [`crate::util::replace_dir`] (the old content stays until the new is complete).
/// Callers check the output first with [`crate::util::check_output`].
pub fn write_dir_atomic(out_dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let name = out_dir
        .file_name()
        .with_context(|| format!("{}: not a directory name", out_dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp.{}", std::process::id()));
    let guard = crate::util::TempGuard::new(&tmp);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for (file, bytes) in files {
        let p = tmp.join(file);
        let mut f =
            std::fs::File::create(&p).with_context(|| format!("cannot create {}", p.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", p.display()))?;
        f.sync_all()?;
    }
    crate::util::replace_dir(&tmp, out_dir)?;
    guard.disarm();
    Ok(())
}

/// Read a SentencePiece model from a `.model` file or a directory holding `tokenizer.model`.
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let file = super::encode::resolve_model_path(path)?;
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    ModelProto::parse(&bytes)
        .with_context(|| format!("{}: not a valid SentencePiece model", file.display()))
}

/// The whole merge step: read both models, merge, and write `tokenizer.model` plus the HF files
/// (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) into `out_dir`
/// atomically. Returns the counts.
pub fn merge_tokenizers(
    llama: &Path,
    chinese: &Path,
    out_dir: &Path,
    add_pad: bool,
) -> Result<MergeStats> {
    let mut base = read_model(llama)?;
    let extra = read_model(chinese)?;
    let stats = merge_models(&mut base, &extra, add_pad);
    let files = [
        ("tokenizer.model", base.to_bytes()),
        (
            "tokenizer.json",
            super::hf::tokenizer_json(&base)?.into_bytes(),
        ),
        (
            "tokenizer_config.json",
            super::hf::tokenizer_config_json(&base)?.into_bytes(),
        ),
        (
            "special_tokens_map.json",
            super::hf::special_tokens_map_json(&base)?.into_bytes(),
        ),
    ];
    write_dir_atomic(out_dir, &files)?;
    Ok(stats)
}
