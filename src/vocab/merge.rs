//! The Chinese-LLaMA vocabulary merge (RECIPE.md §1): append every piece of a second model whose
//! string the base model lacks, with `score = 0` written explicitly and the type left unset.

use super::proto::{ModelProto, Piece};
use std::collections::HashSet;

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
