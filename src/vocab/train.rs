//! SentencePiece-compatible vocabulary trainers, BPE and unigram (how a user makes their own
//! "chinese_sp.model" before merging).
//!
//! The output is a model python `sentencepiece` loads: `<unk>`, `<s>`, `</s>`, then (with byte
//! fallback) the 256 `<0xXX>` pieces, then the learned pieces. BPE (LLaMA-style): the merges in
//! the order they were learned with scores 0, -1, -2, …, then the single characters (most
//! frequent first) with the scores continuing downwards. Unigram: all pieces, characters
//! included, sorted by their log-probability score. Normalizer: identity, dummy prefix, spaces →
//! `▁` (sentencepiece's nmt_nfkc map cannot be generated here without copying its tables).
//! Every covered character is a piece, so encode → decode is lossless for covered text (and for
//! all text with byte fallback).
//!
//! Training: sentences are normalized like the encoder does, then split into words at `▁` (which
//! starts a word) and where the character class changes (Han / letters / digits / other), so
//! pieces never cross those boundaries, as sentencepiece's `split_by_whitespace` and
//! `split_by_unicode_script` do. BPE then repeatedly merges the most frequent adjacent pair
//! (ties: the smaller pair of symbol ids), with counts updated incrementally per affected word.
//! Unigram: see `train_unigram`.

use super::encode::SPACE;
use super::proto::{Message, ModelProto, ModelType, Piece, PieceType, normalizer, trainer};
use anyhow::{Result, bail};
use std::collections::{BinaryHeap, HashMap, HashSet};

/// Trainer options (the `train-vocab` flags).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Pieces in the output model, all included.
    pub vocab_size: usize,
    pub model_type: ModelType,
    /// Fraction of character occurrences the kept characters must cover (sentencepiece's
    /// `character_coverage`); the rarest characters beyond it are left out.
    pub character_coverage: f64,
    /// Add the 256 `<0xXX>` pieces so uncovered characters encode losslessly as bytes.
    pub byte_fallback: bool,
    /// Longest piece, in characters (sentencepiece's `max_sentencepiece_length`).
    pub max_piece_chars: usize,
    /// Recorded in the trainer spec's `input` field.
    pub input_description: String,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 8000,
            model_type: ModelType::Bpe,
            character_coverage: 0.9995,
            byte_fallback: false,
            max_piece_chars: 16,
            input_description: String::new(),
        }
    }
}

/// What [`train`] produced, for the tool to print.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub sentences: usize,
    pub characters: usize,
    pub kept_characters: usize,
    pub merges: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Han,
    Letter,
    Digit,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c == '\u{2581}' {
        Class::Space
    } else if c.is_ascii_digit() || c.is_numeric() && !is_han(c) {
        Class::Digit
    } else if is_han(c) {
        Class::Han
    } else if c.is_alphabetic() {
        Class::Letter
    } else {
        Class::Other
    }
}

fn is_han(c: char) -> bool {
    matches!(c as u32,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F | 0x3007)
}

/// Normalize one sentence as the encoder does (identity map, dummy prefix, ' ' → `▁`).
fn normalize(line: &str) -> String {
    let mut s = String::with_capacity(line.len() + 3);
    s.push_str(SPACE);
    for c in line.chars() {
        if c == ' ' {
            s.push_str(SPACE);
        } else {
            s.push(c);
        }
    }
    s
}

/// Split a normalized sentence into training words: `▁` starts a word; a class change ends one.
fn split_words<'a>(s: &'a str, mut emit: impl FnMut(&'a str)) {
    let mut start = 0;
    let mut prev: Option<Class> = None;
    for (i, c) in s.char_indices() {
        let cl = class(c);
        let boundary = match prev {
            None => false,
            Some(_) if cl == Class::Space => true,
            Some(Class::Space) => false, // `▁` attaches to what follows
            Some(p) => p != cl,
        };
        if boundary {
            emit(&s[start..i]);
            start = i;
        }
        prev = Some(cl);
    }
    if start < s.len() {
        emit(&s[start..]);
    }
}

/// Train a vocabulary from `sentences` (one example each; empty ones are skipped).
pub fn train(sentences: &[&str], opt: &TrainOptions) -> Result<(ModelProto, TrainReport)> {
    if !matches!(opt.model_type, ModelType::Bpe | ModelType::Unigram) {
        bail!(
            "model type {:?} is not implemented by this trainer (use bpe or unigram)",
            opt.model_type
        );
    }
    if !(opt.character_coverage > 0.0 && opt.character_coverage <= 1.0) {
        bail!(
            "character_coverage must be in (0, 1], got {}",
            opt.character_coverage
        );
    }
    // 1. Characters and their frequencies; keep the most frequent up to the coverage.
    let mut char_freq: HashMap<char, u64> = HashMap::new();
    let mut n_sent = 0;
    let normalized: Vec<String> = sentences
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| normalize(s))
        .collect();
    for s in &normalized {
        n_sent += 1;
        for c in s.chars() {
            *char_freq.entry(c).or_default() += 1;
        }
    }
    if n_sent == 0 {
        bail!("the corpus has no non-empty lines");
    }
    let total: u64 = char_freq.values().sum();
    let mut chars: Vec<(char, u64)> = char_freq.into_iter().collect();
    chars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = Vec::new();
    let mut acc = 0u64;
    for &(c, f) in &chars {
        if c != '\u{2581}' && acc as f64 / total as f64 >= opt.character_coverage {
            continue;
        }
        acc += f;
        kept.push(c);
    }
    let meta = 3 + if opt.byte_fallback { 256 } else { 0 };
    if opt.vocab_size < meta + kept.len() {
        bail!(
            "vocab size {} is smaller than the {} special pieces plus {} covered characters \
             (raise --vocab-size or lower --character-coverage)",
            opt.vocab_size,
            meta,
            kept.len()
        );
    }
    let n_merges = opt.vocab_size - meta - kept.len();

    // 2. Words (symbol sequences) with counts. Symbols: 0..kept.len() are the characters.
    let mut sym_str: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
    let mut sym_chars: Vec<usize> = vec![1; kept.len()];
    let char_id: HashMap<char, u32> = kept
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, i as u32))
        .collect();
    let mut word_count: HashMap<&str, u64> = HashMap::new();
    for s in &normalized {
        split_words(s, |w| *word_count.entry(w).or_default() += 1);
    }
    let mut words: Vec<Vec<u32>> = Vec::new();
    let mut freq: Vec<i64> = Vec::new();
    let mut wc: Vec<(&str, u64)> = word_count.into_iter().collect();
    wc.sort_unstable();
    for (w, f) in wc {
        // Uncovered characters split a word (they never take part in a piece).
        let mut cur = Vec::new();
        for c in w.chars() {
            match char_id.get(&c) {
                Some(&id) => cur.push(id),
                None => {
                    if cur.len() > 1 {
                        words.push(std::mem::take(&mut cur));
                        freq.push(f as i64);
                    }
                    cur.clear();
                }
            }
        }
        if cur.len() > 1 {
            words.push(cur);
            freq.push(f as i64);
        }
    }

    if opt.model_type == ModelType::Unigram {
        let target = opt.vocab_size - meta;
        let scored = train_unigram(&words, &freq, &kept, target, opt.max_piece_chars)?;
        let report = TrainReport {
            sentences: n_sent,
            characters: chars.len(),
            kept_characters: kept.len(),
            merges: scored.len() - kept.len(),
        };
        let mut pieces = specials(opt.byte_fallback);
        pieces.extend(scored.iter().map(|(p, sc)| Piece::new(p, *sc)));
        return Ok((finish_model(pieces, opt, ModelType::Unigram), report));
    }

    // 3. BPE with incremental pair counts and a lazy max-heap.
    let mut pair_count: HashMap<(u32, u32), i64> = HashMap::new();
    let mut pair_words: HashMap<(u32, u32), Vec<u32>> = HashMap::new();
    for (wi, w) in words.iter().enumerate() {
        for p in w.windows(2) {
            let k = (p[0], p[1]);
            *pair_count.entry(k).or_default() += freq[wi];
            pair_words.entry(k).or_default().push(wi as u32);
        }
    }
    let mut heap: BinaryHeap<(i64, std::cmp::Reverse<(u32, u32)>)> = pair_count
        .iter()
        .map(|(&k, &c)| (c, std::cmp::Reverse(k)))
        .collect();
    let mut reserved: HashSet<String> = ["<unk>", "<s>", "</s>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if opt.byte_fallback {
        reserved.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    }
    let mut str_sym: HashMap<String, u32> = sym_str
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as u32))
        .collect();
    let mut learned: Vec<u32> = Vec::new();
    let mut touched: HashMap<(u32, u32), i64> = HashMap::new();
    while learned.len() < n_merges {
        let Some((c, std::cmp::Reverse(pair))) = heap.pop() else {
            break;
        };
        if c <= 0 || pair_count.get(&pair) != Some(&c) {
            continue; // stale heap entry
        }
        let (a, b) = pair;
        let merged = format!("{}{}", sym_str[a as usize], sym_str[b as usize]);
        let n_chars = sym_chars[a as usize] + sym_chars[b as usize];
        if n_chars > opt.max_piece_chars || reserved.contains(&merged) {
            pair_count.insert(pair, 0);
            continue;
        }
        let id = match str_sym.get(&merged) {
            Some(&id) => id,
            None => {
                let id = sym_str.len() as u32;
                sym_str.push(merged.clone());
                sym_chars.push(n_chars);
                str_sym.insert(merged, id);
                learned.push(id);
                id
            }
        };
        // Re-segment every word holding the pair; update the counts by difference.
        let mut ws = pair_words.remove(&pair).unwrap_or_default();
        ws.sort_unstable();
        ws.dedup();
        touched.clear();
        for &wi in &ws {
            let w = &mut words[wi as usize];
            let f = freq[wi as usize];
            if !w.windows(2).any(|p| p[0] == a && p[1] == b) {
                continue;
            }
            for p in w.windows(2) {
                *touched.entry((p[0], p[1])).or_default() -= f;
            }
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(id);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
            for p in w.windows(2) {
                let k = (p[0], p[1]);
                *touched.entry(k).or_default() += f;
                if p[0] == id || p[1] == id {
                    pair_words.entry(k).or_default().push(wi);
                }
            }
        }
        for (&k, &d) in &touched {
            if d != 0 {
                let e = pair_count.entry(k).or_default();
                *e += d;
                heap.push((*e, std::cmp::Reverse(k)));
            }
        }
        pair_count.remove(&pair);
    }
    if learned.len() < n_merges {
        bail!(
            "the corpus supports at most {} pieces (only {} merges found); lower --vocab-size",
            meta + kept.len() + learned.len(),
            learned.len()
        );
    }

    // 4. The model.
    let mut pieces = specials(opt.byte_fallback);
    let mut score = 0.0f32;
    for &id in &learned {
        pieces.push(Piece::new(&sym_str[id as usize], score));
        score -= 1.0;
    }
    for c in &kept {
        pieces.push(Piece::new(&c.to_string(), score));
        score -= 1.0;
    }
    debug_assert_eq!(pieces.len(), opt.vocab_size);
    let model = finish_model(pieces, opt, ModelType::Bpe);
    let report = TrainReport {
        sentences: n_sent,
        characters: chars.len(),
        kept_characters: kept.len(),
        merges: learned.len(),
    };
    Ok((model, report))
}

/// `<unk>`, `<s>`, `</s>` and, with byte fallback, `<0x00>`..`<0xFF>`.
fn specials(byte_fallback: bool) -> Vec<Piece> {
    let mut pieces = vec![
        Piece::new("<unk>", 0.0).with_type(PieceType::Unknown),
        Piece::new("<s>", 0.0).with_type(PieceType::Control),
        Piece::new("</s>", 0.0).with_type(PieceType::Control),
    ];
    if byte_fallback {
        for b in 0..=255u8 {
            pieces.push(Piece::new(&format!("<0x{b:02X}>"), 0.0).with_type(PieceType::Byte));
        }
    }
    pieces
}

/// The model file around `pieces`: trainer spec recording the options, identity normalizer.
fn finish_model(pieces: Vec<Piece>, opt: &TrainOptions, kind: ModelType) -> ModelProto {
    let mut ts = Message::default();
    ts.set_str(trainer::INPUT, &opt.input_description);
    ts.set_str(trainer::MODEL_PREFIX, "zhllama");
    ts.set_i32(trainer::MODEL_TYPE, kind as i32);
    ts.set_i32(trainer::VOCAB_SIZE, opt.vocab_size as i32);
    ts.set_f32(trainer::CHARACTER_COVERAGE, opt.character_coverage as f32);
    ts.set_i32(
        trainer::MAX_SENTENCEPIECE_LENGTH,
        opt.max_piece_chars as i32,
    );
    ts.set_bool(trainer::BYTE_FALLBACK, opt.byte_fallback);
    ts.set_i32(trainer::UNK_ID, 0);
    ts.set_i32(trainer::BOS_ID, 1);
    ts.set_i32(trainer::EOS_ID, 2);
    ts.set_i32(trainer::PAD_ID, -1);
    let mut ns = Message::default();
    ns.set_str(normalizer::NAME, "identity");
    ns.set(
        normalizer::PRECOMPILED_CHARSMAP,
        super::proto::Value::Len(Vec::new()),
    );
    ns.set_bool(normalizer::ADD_DUMMY_PREFIX, true);
    ns.set_bool(normalizer::REMOVE_EXTRA_WHITESPACES, false);
    ns.set_bool(normalizer::ESCAPE_WHITESPACES, true);
    ModelProto::new(pieces, &ts, &ns)
}

#[inline]
fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Unigram training (the sentencepiece recipe, simplified): seed with every substring of up to
/// `max_chars` characters seen at least twice (found level by level: a substring is counted only
/// if its prefix was frequent), then alternate EM (forward–backward expected counts over each
/// word's lattice; log-probability scores) with pruning to max(target, 75%) of the pieces, by
/// the likelihood lost when a piece is replaced by its best segmentation into other pieces.
/// Characters are always kept. Returns (piece, score) for `target` pieces, best score first.
fn train_unigram(
    words: &[Vec<u32>],
    freq: &[i64],
    kept: &[char],
    target: usize,
    max_chars: usize,
) -> Result<Vec<(String, f32)>> {
    let nc = kept.len();
    // Seeds, level by level.
    let mut frequent: HashMap<&[u32], u64> = HashMap::new();
    let mut prev_level: HashSet<&[u32]> = HashSet::new();
    for len in 2..=max_chars.max(2) {
        let mut counts: HashMap<&[u32], u64> = HashMap::new();
        for (w, &f) in words.iter().zip(freq) {
            for i in 0..w.len().saturating_sub(len - 1) {
                let sub = &w[i..i + len];
                if len == 2 || prev_level.contains(&sub[..len - 1]) {
                    *counts.entry(sub).or_default() += f as u64;
                }
            }
        }
        prev_level = counts
            .iter()
            .filter(|&(_, &c)| c >= 2)
            .map(|(&k, _)| k)
            .collect();
        if prev_level.is_empty() {
            break;
        }
        frequent.extend(counts.into_iter().filter(|&(_, c)| c >= 2));
    }
    let need = target.saturating_sub(nc);
    let mut seeds: Vec<(&[u32], u64)> = frequent.into_iter().collect();
    seeds.sort_unstable_by(|a, b| {
        (b.1 * b.0.len() as u64)
            .cmp(&(a.1 * a.0.len() as u64))
            .then(a.0.cmp(b.0))
    });
    seeds.truncate((need * 8).max(20_000));
    // Never a piece that spells a special one (`<s>`, `<0x41>`, ...).
    let spell = |k: &[u32]| -> String { k.iter().map(|&c| kept[c as usize]).collect() };
    seeds.retain(|(k, _)| {
        let s = spell(k);
        !(matches!(s.as_str(), "<unk>" | "<s>" | "</s>")
            || s.len() == 6 && s.starts_with("<0x") && s.ends_with('>'))
    });
    if seeds.len() < need {
        bail!(
            "the corpus supports at most {} pieces beside the special ones (only {} substrings \
             occur twice); lower --vocab-size",
            nc + seeds.len(),
            seeds.len()
        );
    }
    let mut id_of: HashMap<&[u32], u32> = HashMap::new();
    let mut seqs: Vec<Vec<u32>> = (0..nc as u32).map(|c| vec![c]).collect();
    let mut init: Vec<f64> = vec![1.0; nc];
    for (k, c) in &seeds {
        id_of.insert(k, seqs.len() as u32);
        seqs.push(k.to_vec());
        init.push(*c as f64);
    }
    let np = seqs.len();
    // Lattice edges per word: (start, end, piece), sorted by start.
    let mut edges: Vec<(u32, u32, u32)> = Vec::new();
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(words.len());
    for w in words {
        let s = edges.len();
        for i in 0..w.len() {
            edges.push((i as u32, i as u32 + 1, w[i]));
            for len in 2..=max_chars.min(w.len() - i) {
                if let Some(&p) = id_of.get(&w[i..i + len]) {
                    edges.push((i as u32, (i + len) as u32, p));
                }
            }
        }
        spans.push((s, edges.len()));
    }
    let total: f64 = init.iter().sum();
    let mut score: Vec<f64> = init.iter().map(|c| (c / total).ln()).collect();
    let mut alive = vec![true; np];
    let mut n_alive = np - nc;
    let mut expected = vec![0f64; np];
    let (mut alpha, mut beta) = (Vec::new(), Vec::new());
    let mut e_step = |score: &[f64], alive: &[bool], expected: &mut Vec<f64>| {
        expected.iter_mut().for_each(|e| *e = 0.0);
        for ((w, &f), &(s, e)) in words.iter().zip(freq).zip(&spans) {
            let n = w.len();
            alpha.clear();
            alpha.resize(n + 1, f64::NEG_INFINITY);
            beta.clear();
            beta.resize(n + 1, f64::NEG_INFINITY);
            alpha[0] = 0.0;
            beta[n] = 0.0;
            for &(a, b, p) in &edges[s..e] {
                if alive[p as usize] {
                    alpha[b as usize] =
                        log_add(alpha[b as usize], alpha[a as usize] + score[p as usize]);
                }
            }
            for &(a, b, p) in edges[s..e].iter().rev() {
                if alive[p as usize] {
                    beta[a as usize] =
                        log_add(beta[a as usize], beta[b as usize] + score[p as usize]);
                }
            }
            let z = alpha[n];
            for &(a, b, p) in &edges[s..e] {
                if alive[p as usize] {
                    let lp = alpha[a as usize] + score[p as usize] + beta[b as usize] - z;
                    expected[p as usize] += f as f64 * lp.exp();
                }
            }
        }
    };
    let m_step = |expected: &[f64], alive: &mut [bool], score: &mut [f64], n_alive: &mut usize| {
        for p in nc..np {
            // Expected count below 0.5: dropped, as sentencepiece does.
            if alive[p] && expected[p] < 0.5 && *n_alive > need {
                alive[p] = false;
                *n_alive -= 1;
            }
        }
        let total: f64 = (0..np).filter(|&p| alive[p]).map(|p| expected[p]).sum();
        for p in 0..np {
            // Characters never seen inside a word still need a (low) score.
            score[p] = (expected[p].max(1e-3) / total).ln();
        }
    };
    loop {
        for _ in 0..2 {
            e_step(&score, &alive, &mut expected);
            m_step(&expected, &mut alive, &mut score, &mut n_alive);
        }
        if n_alive <= need {
            break;
        }
        // Loss of removing each piece: its expected count times the drop from its own score
        // to the best segmentation of its string by the other live pieces (Viterbi).
        let mut loss: Vec<(f64, u32)> = Vec::with_capacity(n_alive);
        let mut best = Vec::new();
        for p in nc..np {
            if !alive[p] {
                continue;
            }
            let q = &seqs[p];
            best.clear();
            best.resize(q.len() + 1, f64::NEG_INFINITY);
            best[0] = 0.0;
            for i in 0..q.len() {
                for len in 1..=(q.len() - i).min(max_chars) {
                    let id = if len == 1 {
                        q[i] as usize
                    } else {
                        match id_of.get(&q[i..i + len]) {
                            Some(&id) => id as usize,
                            None => continue,
                        }
                    };
                    if id == p || !alive[id] {
                        continue;
                    }
                    let c = best[i] + score[id];
                    if c > best[i + len] {
                        best[i + len] = c;
                    }
                }
            }
            loss.push((expected[p] * (score[p] - best[q.len()]), p as u32));
        }
        loss.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let keep = need.max(n_alive * 3 / 4);
        for &(_, p) in &loss[keep..] {
            alive[p as usize] = false;
        }
        n_alive = keep;
    }
    if n_alive < need {
        bail!(
            "the corpus supports at most {} pieces; lower --vocab-size",
            target - need + n_alive
        );
    }
    let mut out: Vec<(String, f32)> = (0..np)
        .filter(|&p| alive[p])
        .map(|p| {
            let s: String = seqs[p].iter().map(|&c| kept[c as usize]).collect();
            (s, score[p] as f32)
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(out)
}
