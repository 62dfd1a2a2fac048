//! Grow an embedding (or lm_head) matrix to a larger vocabulary, as the recipe does after the
//! vocabulary merge (docs/RECIPE.md §1: 32000 → 49953/49954 rows).
//!
//! Matrices are plain row-major `[vocab, dim]` f32 slices; no model struct. Old rows are copied
//! unchanged. New rows are initialised one of two ways:
//! - [`NewRows::MeanOfPieces`] (default): the mean of the old rows of the pieces the *old*
//!   tokenizer splits the new token's string into (e.g. `▁你好` → `▁`, `你`, `好`, or byte
//!   pieces). A new token then starts as the average of what the model already saw for the same
//!   text, a better starting point than noise: the model's output on text is nearly unchanged at
//!   step 0, so embedding-only training (pre-training stage 1) starts from a low loss.
//! - [`NewRows::Random`]: HF's `_init_weights` for embeddings, normal(0, `std`) with
//!   `std = initializer_range` (0.02 for LLaMA), seeded.
//!
//! Rows past the new tokenizer's size (padding rows) get the mean of all old rows.

use crate::vocab::Tokenizer;
use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};

/// How new rows are initialised.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum NewRows {
    #[default]
    MeanOfPieces,
    Random {
        std: f32,
        seed: u64,
    },
}

/// The old-vocabulary ids whose rows make new token `id`'s row under [`NewRows::MeanOfPieces`]:
/// the old tokenizer's split of the new piece's string (`None` past the new tokenizer's size).
pub fn source_pieces(old_tok: &Tokenizer, new_tok: &Tokenizer, id: u32) -> Option<Vec<u32>> {
    if id as usize >= new_tok.vocab_size() {
        return None;
    }
    Some(old_tok.encode_normalized(new_tok.id_to_piece(id)))
}

/// `out = [new_vocab, dim]`: `old` (`[old_vocab, dim]`, row-major) with rows appended per `init`.
/// Checks the new tokenizer extends the old one (same pieces for the first `old_vocab` ids, as
/// the merge guarantees) so that old rows keep their meaning.
pub fn resize_rows(
    old: &[f32],
    old_vocab: usize,
    dim: usize,
    new_vocab: usize,
    old_tok: &Tokenizer,
    new_tok: &Tokenizer,
    init: NewRows,
) -> Result<Vec<f32>> {
    if old.len() != old_vocab * dim {
        bail!(
            "embedding has {} values, expected {old_vocab}×{dim}",
            old.len()
        );
    }
    if new_vocab < old_vocab {
        bail!("cannot shrink the embedding from {old_vocab} to {new_vocab} rows");
    }
    if old_tok.vocab_size() > old_vocab {
        bail!(
            "old tokenizer has {} pieces but the embedding only {old_vocab} rows",
            old_tok.vocab_size()
        );
    }
    for id in 0..old_vocab
        .min(new_tok.vocab_size())
        .min(old_tok.vocab_size()) as u32
    {
        if old_tok.id_to_piece(id) != new_tok.id_to_piece(id) {
            bail!(
                "new tokenizer does not extend the old one: id {id} is {:?}, was {:?}",
                new_tok.id_to_piece(id),
                old_tok.id_to_piece(id)
            );
        }
    }
    let mut out = Vec::with_capacity(new_vocab * dim);
    out.extend_from_slice(old);
    let row = |i: usize| &old[i * dim..(i + 1) * dim];
    let mut all_mean = vec![0f64; dim];
    for i in 0..old_vocab {
        for (m, &x) in all_mean.iter_mut().zip(row(i)) {
            *m += f64::from(x);
        }
    }
    let all_mean: Vec<f32> = all_mean
        .iter()
        .map(|&m| (m / old_vocab.max(1) as f64) as f32)
        .collect();
    match init {
        NewRows::MeanOfPieces => {
            let mut acc = vec![0f64; dim];
            for id in old_vocab..new_vocab {
                let src = source_pieces(old_tok, new_tok, id as u32).unwrap_or_default();
                let src: Vec<u32> = src
                    .into_iter()
                    .filter(|&s| (s as usize) < old_vocab)
                    .collect();
                if src.is_empty() {
                    out.extend_from_slice(&all_mean);
                    continue;
                }
                acc.iter_mut().for_each(|a| *a = 0.0);
                for &s in &src {
                    for (a, &x) in acc.iter_mut().zip(row(s as usize)) {
                        *a += f64::from(x);
                    }
                }
                let n = src.len() as f64;
                out.extend(acc.iter().map(|&a| (a / n) as f32));
            }
        }
        NewRows::Random { std, seed } => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut uniform = || (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            for _ in old_vocab * dim..new_vocab * dim {
                // Box–Muller; 1 - u keeps the log argument in (0, 1].
                let (u1, u2) = (1.0 - uniform(), uniform());
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                out.push((z * f64::from(std)) as f32);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::proto::{Message, ModelProto, Piece, PieceType, normalizer, trainer};

    /// A tiny BPE tokenizer: specials, then `pieces` with descending scores.
    fn tok(pieces: &[&str]) -> Tokenizer {
        let mut ps = vec![
            Piece::new("<unk>", 0.0).with_type(PieceType::Unknown),
            Piece::new("<s>", 0.0).with_type(PieceType::Control),
            Piece::new("</s>", 0.0).with_type(PieceType::Control),
        ];
        for (i, p) in pieces.iter().enumerate() {
            ps.push(Piece::new(p, -(i as f32)));
        }
        let mut ts = Message::default();
        ts.set_i32(trainer::MODEL_TYPE, 2);
        let mut ns = Message::default();
        ns.set_str(normalizer::NAME, "identity");
        ns.set_bool(normalizer::REMOVE_EXTRA_WHITESPACES, false);
        Tokenizer::from_model(ModelProto::new(ps, &ts, &ns)).unwrap()
    }

    #[test]
    fn mean_of_old_pieces() {
        // old: 3 specials + ▁ a b ab ; new adds "▁ab" and "ba".
        let old_pieces = ["▁", "a", "b", "ab"];
        let old = tok(&old_pieces);
        let mut new_pieces = old_pieces.to_vec();
        new_pieces.extend(["▁ab", "ba"]);
        let new = tok(&new_pieces);
        let (v, d) = (7, 2);
        let emb: Vec<f32> = (0..v * d).map(|i| i as f32).collect();
        let out = resize_rows(&emb, v, d, 10, &old, &new, NewRows::default()).unwrap();
        assert_eq!(&out[..v * d], &emb[..]);
        // "▁ab" → old pieces ▁ (3) and ab (6): mean of rows 3 and 6.
        assert_eq!(source_pieces(&old, &new, 7), Some(vec![3, 6]));
        assert_eq!(&out[7 * d..8 * d], &[9.0, 10.0]);
        // "ba" → b (5), a (4).
        assert_eq!(&out[8 * d..9 * d], &[9.0, 10.0]);
        // Row 9 is past the new tokenizer: mean of all old rows.
        assert_eq!(&out[9 * d..10 * d], &[6.0, 7.0]);
    }

    #[test]
    fn random_rows_have_the_requested_spread_and_are_seeded() {
        let t = tok(&["a"]);
        let (v, d) = (4, 8);
        let emb = vec![0.5f32; v * d];
        let init = NewRows::Random { std: 0.02, seed: 7 };
        let a = resize_rows(&emb, v, d, v + 5000, &t, &t, init).unwrap();
        let b = resize_rows(&emb, v, d, v + 5000, &t, &t, init).unwrap();
        assert_eq!(a, b);
        let new = &a[v * d..];
        let n = new.len() as f64;
        let mean = new.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = new
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        // 40000 samples: the standard error of the mean is 0.02/200 = 1e-4 and of the std
        // about 0.02/283 ≈ 7e-5; 5 standard errors keep the test from flaking.
        assert!(mean.abs() < 5e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 3.5e-4, "std {}", var.sqrt());
    }

    #[test]
    fn rejects_shrinking_and_mismatched_tokenizers() {
        let old = tok(&["a", "b"]);
        let other = tok(&["b", "a"]);
        let emb = vec![0f32; 5 * 2];
        assert!(resize_rows(&emb, 5, 2, 4, &old, &old, NewRows::default()).is_err());
        assert!(resize_rows(&emb, 5, 2, 6, &old, &other, NewRows::default()).is_err());
        assert!(resize_rows(&emb[1..], 5, 2, 6, &old, &old, NewRows::default()).is_err());
    }
}
