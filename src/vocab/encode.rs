//! [`Tokenizer`]: text ↔ ids with exactly python `sentencepiece`'s results, for BPE models (LLaMA
//! and the merged Chinese-LLaMA/Alpaca vocabularies) and unigram models (the released
//! `chinese_sp.model`, with its `nmt_nfkc` character map).
//!
//! Why our own encoder: HF `tokenizers` BPE applies merges by rank, which cannot express
//! sentencepiece's rule once thousands of appended pieces share score 0 (docs/RECIPE.md §1). Here the
//! rule is sentencepiece's own: repeatedly merge the adjacent pair whose concatenation is a piece
//! with the highest score, ties to the leftmost pair; a priority queue over a linked list of
//! symbols, with stale queue entries skipped on pop.
//!
//! The pipeline for one text:
//! 1. normalize: the character map if any (longest rule first), optional removal of extra
//!    spaces, a `▁` dummy prefix, every ' ' → `▁` (U+2581);
//! 2. BPE: split into characters, except that user-defined pieces are matched whole (longest
//!    first) and never merged further; merge as above; pieces of type UNUSED that got formed are
//!    split back (resegmented). Unigram: Viterbi over all matching pieces (see `encode_unigram`);
//! 3. symbols that are not pieces become `<0xXX>` byte pieces of their UTF-8 bytes when the model
//!    has byte fallback, else `<unk>` (a run of unknown symbols gives one `<unk>`).

use super::charsmap::CharsMap;
use super::proto::{ModelProto, ModelType, PieceType, normalizer, trainer};
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

/// The sentencepiece whitespace mark `▁` (U+2581).
pub const SPACE: &str = "\u{2581}";

/// A small multiplicative hasher for piece strings (FxHash-style): the map is probed once per
/// candidate merge, so SipHash's cost shows up in profiles. Not DoS-resistant; keys are the
/// model's own pieces.
#[derive(Default, Clone, Copy)]
pub struct PieceHasher(u64);

impl Hasher for PieceHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            h = (h.rotate_left(5) ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(K);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(b) ^ (rest.len() as u64) << 59)
                .wrapping_mul(K);
        }
        self.0 = h;
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(i)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.0 = (self.0.rotate_left(5) ^ i as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// All piece strings in one buffer, plus two open-addressing indexes (string → id): `normal`
/// (NORMAL, USER_DEFINED, UNUSED: what merges may form, sentencepiece's `pieces_`) and
/// `reserved` (CONTROL, UNKNOWN, BYTE: sentencepiece's `reserved_id_map_`). One allocation per
/// table instead of one per piece keeps loading a 50K-piece model cheap.
struct PieceTable {
    arena: Vec<u8>,
    offs: Vec<u32>,
    normal: Vec<u32>,
    reserved: Vec<u32>,
    shift: u32,
}

impl PieceTable {
    fn new(pieces: &[super::proto::Piece]) -> Self {
        let mut arena = Vec::with_capacity(pieces.iter().map(|p| p.piece.len()).sum());
        let mut offs = Vec::with_capacity(pieces.len() + 1);
        offs.push(0);
        for p in pieces {
            arena.extend_from_slice(p.piece.as_bytes());
            offs.push(arena.len() as u32);
        }
        let slots = (pieces.len() * 2).next_power_of_two().max(16);
        PieceTable {
            arena,
            offs,
            normal: vec![NONE; slots],
            reserved: vec![NONE; slots],
            shift: 64 - slots.trailing_zeros(),
        }
    }

    #[inline]
    fn bytes(&self, id: u32) -> &[u8] {
        &self.arena[self.offs[id as usize] as usize..self.offs[id as usize + 1] as usize]
    }

    #[inline]
    fn str(&self, id: u32) -> &str {
        // Built from `String`s, cut at their boundaries.
        std::str::from_utf8(self.bytes(id)).unwrap()
    }

    #[inline]
    fn slot(&self, k: &[u8]) -> usize {
        let mut h = PieceHasher::default();
        h.write(k);
        // A final mix so the top bits (the slot) depend on every input bit.
        let h = h.finish();
        ((h ^ (h >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline]
    fn find(&self, slots: &[u32], k: &[u8]) -> Option<u32> {
        let mask = slots.len() - 1;
        let mut i = self.slot(k);
        loop {
            let id = slots[i];
            if id == NONE {
                return None;
            }
            if self.bytes(id) == k {
                return Some(id);
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    fn normal(&self, k: &[u8]) -> Option<u32> {
        self.find(&self.normal, k)
    }

    #[inline]
    fn reserved(&self, k: &[u8]) -> Option<u32> {
        self.find(&self.reserved, k)
    }

    /// Index piece `id` in the normal or reserved table; false if its string is already there.
    fn insert(&mut self, id: u32, normal: bool) -> bool {
        let k_range = self.offs[id as usize] as usize..self.offs[id as usize + 1] as usize;
        let mut i = self.slot(&self.arena[k_range.clone()]);
        let slots = if normal { &self.normal } else { &self.reserved };
        let mask = slots.len() - 1;
        loop {
            let other = slots[i];
            if other == NONE {
                break;
            }
            if self.bytes(other) == &self.arena[k_range.clone()] {
                return false;
            }
            i = (i + 1) & mask;
        }
        if normal {
            self.normal[i] = id;
        } else {
            self.reserved[i] = id;
        }
        true
    }
}

/// A loaded SentencePiece model that encodes and decodes like python `sentencepiece`.
///
/// Public API (used by `data/` and `train/`; keep stable):
/// `load`, `from_model`, `encode`, `encode_batch`, `decode`, `vocab_size`, `bos_id`, `eos_id`,
/// `unk_id`, `pad_id`, `piece_to_id`, `id_to_piece`, `model`.
pub struct Tokenizer {
    model: ModelProto,
    kind: ModelType,
    table: PieceTable,
    scores: Vec<f32>,
    types: Vec<PieceType>,
    /// (left piece id, right piece id) → id of the piece spelled left+right, for every way of
    /// cutting a piece of `normal` into two pieces of `normal`. Symbols are almost always pieces,
    /// so this integer lookup replaces hashing the concatenated string (which stays the fallback
    /// for symbols that are not pieces).
    pair_table: HashMap<u64, u32, BuildHasherDefault<PieceHasher>>,
    /// Piece id of each single character that is a `normal` piece: BMP chars by table, others
    /// by map. `NONE` when not a piece.
    char_ids: Vec<u32>,
    /// Some normal piece's string is also a reserved piece (which then wins, as in
    /// sentencepiece's `PieceToId`), so symbol ids must be looked up again on output.
    shadowed: bool,
    char_ids_astral: HashMap<u32, u32, BuildHasherDefault<PieceHasher>>,
    /// The normalizer's precompiled character map (e.g. `nmt_nfkc`); `None` for identity.
    charsmap: Option<CharsMap>,
    /// Unigram: score of an unknown character (lowest normal score − 10, as sentencepiece).
    unk_score: f32,
    /// Unigram: highest normal score (user-defined pieces get a bonus from it).
    max_score: f32,
    /// Longest piece of the `normal` table in bytes (bounds the unigram lattice).
    max_piece_bytes: usize,
    /// User-defined pieces grouped by first byte, longest first.
    user_defined: Vec<Vec<Box<[u8]>>>,
    byte_ids: [u32; 256],
    has_unused: bool,
    unk_id: u32,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    treat_whitespace_as_suffix: bool,
    unk_surface: String,
}

/// Resolve `--tokenizer PATH`: a `.model` file, or a directory holding `tokenizer.model`.
pub fn resolve_model_path(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let p = path.join("tokenizer.model");
        if !p.is_file() {
            bail!("{}: directory has no tokenizer.model", path.display());
        }
        Ok(p)
    } else if path.exists() {
        Ok(path.to_path_buf())
    } else {
        bail!("{}: no such file or directory", path.display())
    }
}

impl Tokenizer {
    /// Load a SentencePiece `.model` file, or the `tokenizer.model` in directory `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let file = resolve_model_path(path)?;
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let model = ModelProto::parse(&bytes)
            .with_context(|| format!("{}: not a valid SentencePiece model", file.display()))?;
        Self::from_model(model).with_context(|| format!("{}", file.display()))
    }

    /// Build from a parsed model (BPE or unigram).
    pub fn from_model(model: ModelProto) -> Result<Self> {
        let kind = model.model_type()?;
        if !matches!(kind, ModelType::Bpe | ModelType::Unigram) {
            bail!("model type {kind:?} is not supported for encoding (BPE and unigram are)");
        }
        let ts = model.trainer_spec();
        let ns = model.normalizer_spec();
        let charsmap = match ns.get_bytes(normalizer::PRECOMPILED_CHARSMAP) {
            Some(map) if !map.is_empty() => Some(CharsMap::parse(map)?),
            _ => None,
        };
        let n = model.pieces.len();
        if n > u32::MAX as usize / 2 {
            bail!("too many pieces ({n})");
        }
        let mut table = PieceTable::new(&model.pieces);
        let mut user_defined: Vec<Vec<Box<[u8]>>> = vec![Vec::new(); 256];
        let mut byte_ids = [u32::MAX; 256];
        let mut unk_id = None;
        let mut has_unused = false;
        let (mut scores, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut min_score, mut max_score) = (f32::MAX, f32::MIN_POSITIVE);
        let mut max_piece_bytes = 1;
        for (i, p) in model.pieces.iter().enumerate() {
            let t = p.piece_type();
            let id = i as u32;
            if p.piece.is_empty() {
                bail!("piece {i} is empty");
            }
            let is_normal = matches!(
                t,
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused
            );
            if !table.insert(id, is_normal) {
                bail!("piece {i} {:?} is defined twice", p.piece);
            }
            match t {
                PieceType::UserDefined => {
                    let key: Box<[u8]> = p.piece.as_bytes().into();
                    user_defined[key[0] as usize].push(key)
                }
                PieceType::Unknown if unk_id.is_some() => bail!("more than one UNKNOWN piece"),
                PieceType::Unknown => unk_id = Some(id),
                PieceType::Unused => has_unused = true,
                PieceType::Byte => {
                    let Some(b) = piece_to_byte(&p.piece) else {
                        bail!("BYTE piece {i} {:?} is not of the form <0xXX>", p.piece);
                    };
                    byte_ids[b as usize] = id;
                }
                _ => {}
            }
            if t == PieceType::Normal {
                min_score = min_score.min(p.score());
                max_score = max_score.max(p.score());
            }
            if is_normal {
                max_piece_bytes = max_piece_bytes.max(p.piece.len());
            }
            scores.push(p.score());
            types.push(t);
        }
        for v in &mut user_defined {
            v.sort_by_key(|k| std::cmp::Reverse(k.len()));
        }
        let Some(unk_id) = unk_id else {
            bail!("model has no UNKNOWN piece")
        };
        let byte_fallback = ts.get_bool(trainer::BYTE_FALLBACK).unwrap_or(false);
        if byte_fallback && byte_ids.contains(&u32::MAX) {
            bail!("byte_fallback is on but not all 256 <0xXX> pieces are present");
        }
        let piece_id = |field: u32, default: &str| -> Option<u32> {
            let s = ts.get_str(field).unwrap_or(default);
            table.reserved(s.as_bytes())
        };
        let control = |id: Option<u32>| id.filter(|&i| types[i as usize] == PieceType::Control);
        let bos_id = control(piece_id(trainer::BOS_PIECE, "<s>"));
        let eos_id = control(piece_id(trainer::EOS_PIECE, "</s>"));
        let pad_id =
            control(piece_id(trainer::PAD_PIECE, "<pad>")).or_else(|| table.normal(b"[PAD]"));
        let unk_surface = ts.get_str(UNK_SURFACE).unwrap_or(" \u{2047} ").to_string();
        let mut pair_table = HashMap::with_capacity_and_hasher(2 * n, Default::default());
        let mut char_ids = vec![NONE; 0x10000];
        let mut char_ids_astral = HashMap::default();
        let mut shadowed = false;
        for (id, &t) in types.iter().enumerate() {
            if !matches!(
                t,
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused
            ) {
                continue;
            }
            let id = id as u32;
            let s = table.str(id);
            let k = s.as_bytes();
            shadowed |= table.reserved(k).is_some();
            let mut cuts = s.char_indices().skip(1).peekable();
            if cuts.peek().is_none() {
                let c = s.chars().next().unwrap() as u32;
                if c < 0x10000 {
                    char_ids[c as usize] = id;
                } else {
                    char_ids_astral.insert(c, id);
                }
            }
            for (at, _) in cuts {
                if let Some(a) = table.normal(&k[..at])
                    && let Some(b) = table.normal(&k[at..])
                {
                    pair_table.insert(pair_key(a, b), id);
                }
            }
        }
        Ok(Tokenizer {
            kind,
            table,
            scores,
            types,
            user_defined,
            byte_ids,
            has_unused,
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            byte_fallback,
            add_dummy_prefix: ns.get_bool(normalizer::ADD_DUMMY_PREFIX).unwrap_or(true),
            remove_extra_whitespaces: ns
                .get_bool(normalizer::REMOVE_EXTRA_WHITESPACES)
                .unwrap_or(true),
            escape_whitespaces: ns.get_bool(normalizer::ESCAPE_WHITESPACES).unwrap_or(true),
            treat_whitespace_as_suffix: ts
                .get_bool(trainer::TREAT_WHITESPACE_AS_SUFFIX)
                .unwrap_or(false),
            unk_surface,
            pair_table,
            shadowed,
            charsmap,
            unk_score: min_score - 10.0,
            max_score,
            max_piece_bytes,
            char_ids,
            char_ids_astral,
            model,
        })
    }

    /// The parsed model this tokenizer was built from.
    pub fn model(&self) -> &ModelProto {
        &self.model
    }

    /// The model type (BPE or unigram).
    pub fn model_type(&self) -> ModelType {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.types.len()
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// `<s>` when it is a control piece (as `sp.bos_id()`).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// `</s>` when it is a control piece (as `sp.eos_id()`).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The trainer spec's pad piece when it is a control piece, else the `[PAD]` piece
    /// (Chinese-Alpaca's, id 49953) if present.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The id of piece `s`, if it is a piece of this model.
    pub fn piece_to_id(&self, s: &str) -> Option<u32> {
        let k = s.as_bytes();
        self.table.reserved(k).or_else(|| self.table.normal(k))
    }

    /// The piece string of `id`. Panics if `id >= vocab_size()`.
    pub fn id_to_piece(&self, id: u32) -> &str {
        self.table.str(id)
    }

    pub fn score(&self, id: u32) -> f32 {
        self.scores[id as usize]
    }

    pub fn piece_type(&self, id: u32) -> PieceType {
        self.types[id as usize]
    }

    /// Ids of `text` without BOS/EOS, as python `sp.encode(text)`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        SCRATCH.with(|s| self.encode_into(text, &mut s.borrow_mut(), &mut out));
        out
    }

    /// Ids of an already-normalized string (no dummy prefix added, no ' ' → `▁`): e.g. how this
    /// model splits another model's piece (`"▁你好"`). Used to initialise new embedding rows.
    pub fn encode_normalized(&self, normalized: &str) -> Vec<u32> {
        let mut out = Vec::new();
        SCRATCH.with(|s| {
            let mut sc = s.borrow_mut();
            sc.norm.clear();
            sc.norm.push_str(normalized);
            self.encode_prepared(&mut sc, &mut out)
        });
        out
    }

    /// [`Tokenizer::encode`] of every text, in parallel over texts (rayon).
    pub fn encode_batch(&self, texts: &[&str]) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    /// The piece strings of `text`'s encoding (as `sp.encode(text, out_type=str)`).
    pub fn encode_pieces(&self, text: &str) -> Vec<&str> {
        self.encode(text)
            .into_iter()
            .map(|i| self.id_to_piece(i))
            .collect()
    }

    /// The normalized form of `text` (as `sp.normalize(text)` plus the dummy prefix and `▁`s).
    pub fn normalize(&self, text: &str) -> String {
        let mut out = String::new();
        self.normalize_into(text, &mut out);
        out
    }

    /// One normalization step at the start of `s` (sentencepiece's `NormalizePrefix`): a
    /// user-defined piece as is, else the longest character-map rule, else one character.
    fn normalize_prefix<'a>(&'a self, s: &'a str) -> (&'a str, usize) {
        let b = s.as_bytes();
        let (n, frozen) = self.prefix_match(b);
        if frozen {
            return (&s[..n], n);
        }
        if let Some(m) = &self.charsmap
            && let Some((len, rep)) = m.longest_prefix(b)
        {
            return (rep, len);
        }
        (&s[..n], n)
    }

    /// Normalization with a character map, step by step as sentencepiece's `Normalize`.
    fn normalize_mapped(&self, text: &str, out: &mut String) {
        let ws = if self.escape_whitespaces { SPACE } else { " " };
        let mut input = text;
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let (rep, n) = self.normalize_prefix(input);
                if rep != " " {
                    break;
                }
                input = &input[n..];
            }
        }
        if input.is_empty() {
            return;
        }
        if self.add_dummy_prefix && !self.treat_whitespace_as_suffix {
            out.push_str(ws);
        }
        let mut is_prev_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (rep, n) = self.normalize_prefix(input);
            let mut sp = rep;
            while is_prev_space && let Some(rest) = sp.strip_prefix(' ') {
                sp = rest;
            }
            if !sp.is_empty() {
                for (i, part) in sp.split(' ').enumerate() {
                    if i > 0 {
                        out.push_str(ws);
                    }
                    out.push_str(part);
                }
                is_prev_space = sp.ends_with(' ');
            }
            input = &input[n..];
            if !self.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(ws) {
                out.truncate(out.len() - ws.len());
            }
        }
        if self.add_dummy_prefix && self.treat_whitespace_as_suffix {
            out.push_str(ws);
        }
    }

    fn normalize_into(&self, text: &str, out: &mut String) {
        out.clear();
        if text.is_empty() {
            return;
        }
        if self.charsmap.is_some() {
            return self.normalize_mapped(text, out);
        }
        let ws = if self.escape_whitespaces { SPACE } else { " " };
        let mut t = text;
        if self.remove_extra_whitespaces {
            t = t.trim_start_matches(' ');
            if t.is_empty() {
                return;
            }
        }
        if self.add_dummy_prefix && !self.treat_whitespace_as_suffix {
            out.push_str(ws);
        }
        let mut prev_space = false;
        for c in t.chars() {
            if c == ' ' {
                if self.remove_extra_whitespaces && prev_space {
                    continue;
                }
                prev_space = true;
                out.push_str(ws);
            } else {
                prev_space = false;
                out.push(c);
            }
        }
        if self.remove_extra_whitespaces && prev_space {
            out.truncate(out.len() - ws.len());
        }
        if self.add_dummy_prefix && self.treat_whitespace_as_suffix {
            out.push_str(ws);
        }
    }

    /// Length of the initial symbol at the start of `s` and whether it is a frozen user-defined
    /// piece (longest user-defined match, else one UTF-8 character).
    #[inline]
    fn prefix_match(&self, s: &[u8]) -> (usize, bool) {
        for u in &self.user_defined[s[0] as usize] {
            if s.starts_with(u) {
                return (u.len(), true);
            }
        }
        (utf8_len(s[0]).min(s.len()), false)
    }

    /// Piece id of the symbol `w` (one character or a user-defined piece), `NONE` if none.
    /// `w` is a slice of a `str` cut at character boundaries, so it is valid UTF-8.
    #[inline]
    fn symbol_id(&self, w: &[u8], freeze: bool) -> u32 {
        if !freeze && w.len() == utf8_len(w[0]) {
            let c = match w.len() {
                1 => u32::from(w[0]),
                2 => (u32::from(w[0] & 0x1f) << 6) | u32::from(w[1] & 0x3f),
                3 => {
                    (u32::from(w[0] & 0x0f) << 12)
                        | (u32::from(w[1] & 0x3f) << 6)
                        | u32::from(w[2] & 0x3f)
                }
                _ => {
                    (u32::from(w[0] & 0x07) << 18)
                        | (u32::from(w[1] & 0x3f) << 12)
                        | (u32::from(w[2] & 0x3f) << 6)
                        | u32::from(w[3] & 0x3f)
                }
            };
            return if c < 0x10000 {
                self.char_ids[c as usize]
            } else {
                self.char_ids_astral.get(&c).copied().unwrap_or(NONE)
            };
        }
        self.table.normal(w).unwrap_or(NONE)
    }

    fn encode_into(&self, text: &str, sc: &mut Scratch, out: &mut Vec<u32>) {
        let mut norm = std::mem::take(&mut sc.norm);
        self.normalize_into(text, &mut norm);
        sc.norm = norm;
        self.encode_prepared(sc, out);
    }

    /// BPE over `sc.norm` (already normalized), appending ids to `out`.
    fn encode_prepared(&self, sc: &mut Scratch, out: &mut Vec<u32>) {
        let norm = std::mem::take(&mut sc.norm);
        let bytes = norm.as_bytes();
        if bytes.is_empty() {
            sc.norm = norm;
            return;
        }
        if self.kind == ModelType::Unigram {
            self.encode_unigram(bytes, &mut sc.best, out);
            sc.norm = norm;
            return;
        }
        let syms = &mut sc.syms;
        syms.clear();
        let mut pos = 0;
        while pos < bytes.len() {
            let (len, freeze) = self.prefix_match(&bytes[pos..]);
            let i = syms.len() as i32;
            syms.push(Sym {
                start: pos as u32,
                len: len as u32,
                id: self.symbol_id(&bytes[pos..pos + len], freeze),
                prev: i - 1,
                next: i + 1,
                freeze,
            });
            pos += len;
        }
        syms.last_mut().unwrap().next = -1;
        let heap = &mut sc.heap;
        heap.clear();
        sc.rev_merge.clear();
        for i in 1..syms.len() {
            self.push_pair(bytes, syms, heap, &mut sc.rev_merge, i - 1, i);
        }
        while let Some(top) = heap.pop() {
            let (l, r) = (top.left as usize, top.right as usize);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != top.size {
                continue; // stale: one side was merged into something else since the push
            }
            syms[l].len += syms[r].len;
            syms[l].id = top.id;
            syms[l].next = syms[r].next;
            let rn = syms[r].next;
            if rn >= 0 {
                syms[rn as usize].prev = l as i32;
            }
            syms[r].len = 0;
            if syms[l].prev >= 0 {
                self.push_pair(
                    bytes,
                    syms,
                    heap,
                    &mut sc.rev_merge,
                    syms[l].prev as usize,
                    l,
                );
            }
            if syms[l].next >= 0 {
                self.push_pair(
                    bytes,
                    syms,
                    heap,
                    &mut sc.rev_merge,
                    l,
                    syms[l].next as usize,
                );
            }
        }
        let mut prev_unk = false;
        let mut i = 0i32;
        while i >= 0 {
            let s = &syms[i as usize];
            let w = &bytes[s.start as usize..(s.start + s.len) as usize];
            if self.has_unused {
                self.resegment(bytes, w, &sc.rev_merge, out, &mut prev_unk);
            } else if s.id != NONE && !self.shadowed {
                out.push(s.id); // a normal piece: never unknown
                prev_unk = false;
            } else {
                self.emit(w, out, &mut prev_unk);
            }
            i = s.next;
        }
        sc.norm = norm;
    }

    #[inline]
    fn push_pair(
        &self,
        bytes: &[u8],
        syms: &[Sym],
        heap: &mut BinaryHeap<Cand>,
        rev_merge: &mut Vec<(u32, u32, u32)>,
        l: usize,
        r: usize,
    ) {
        let (a, b) = (&syms[l], &syms[r]);
        if a.freeze || b.freeze {
            return;
        }
        let size = a.len + b.len;
        let found = if a.id != NONE && b.id != NONE {
            self.pair_table.get(&pair_key(a.id, b.id)).copied()
        } else {
            let s = &bytes[a.start as usize..(a.start + size) as usize];
            self.table.normal(s)
        };
        if let Some(id) = found {
            heap.push(Cand {
                score: self.scores[id as usize],
                left: l as u32,
                right: r as u32,
                size,
                id,
            });
            if self.types[id as usize] == PieceType::Unused {
                rev_merge.push((a.start, a.len, b.len));
            }
        }
    }

    /// Unigram: the highest-scoring segmentation (Viterbi over all pieces that match at each
    /// character; ties to the path whose last piece starts leftmost, as sentencepiece), with an
    /// `<unk>` node of score `unk_score` for a character no single-character piece covers.
    fn encode_unigram(&self, bytes: &[u8], best: &mut Vec<(f32, u32, u32)>, out: &mut Vec<u32>) {
        let n = bytes.len();
        best.clear();
        best.resize(n + 1, (0.0, NONE, NONE));
        best[0].1 = 0;
        let mut pos = 0;
        while pos < n {
            let clen = utf8_len(bytes[pos]).min(n - pos);
            let base = best[pos].0;
            let mut has_single = false;
            let mut end = pos;
            let mut nchars = 0;
            while end < n {
                end += utf8_len(bytes[end]).min(n - end);
                nchars += 1;
                if end - pos > self.max_piece_bytes {
                    break;
                }
                let Some(id) = self.table.normal(&bytes[pos..end]) else {
                    continue;
                };
                let t = self.types[id as usize];
                if t == PieceType::Unused {
                    continue;
                }
                let score = if t == PieceType::UserDefined {
                    (end - pos) as f32 * self.max_score - 0.1
                } else {
                    self.scores[id as usize]
                };
                let cand = base + score;
                if best[end].1 == NONE || cand > best[end].0 {
                    best[end] = (cand, pos as u32, id);
                }
                has_single |= nchars == 1;
            }
            if !has_single {
                let end = pos + clen;
                let cand = base + self.unk_score;
                if best[end].1 == NONE || cand > best[end].0 {
                    best[end] = (cand, pos as u32, self.unk_id);
                }
            }
            pos += clen;
        }
        let first = out.len();
        let mut end = n;
        while end > 0 {
            let (_, start, id) = best[end];
            out.push(id);
            out.push(start); // start offset, paired with the id; fixed up below
            end = start as usize;
        }
        // Reverse the (id, start) pairs into text order, then emit with unknown handling.
        let pairs: Vec<(u32, u32)> = out[first..]
            .chunks_exact(2)
            .rev()
            .map(|c| (c[0], c[1]))
            .collect();
        out.truncate(first);
        let mut prev_unk = false;
        for (i, &(id, start)) in pairs.iter().enumerate() {
            let stop = pairs.get(i + 1).map_or(n, |p| p.1 as usize);
            let w = &bytes[start as usize..stop];
            if id == self.unk_id {
                self.emit(w, out, &mut prev_unk);
            } else {
                out.push(id);
                prev_unk = false;
            }
        }
    }

    /// Split a formed UNUSED piece back into the two symbols it was made of, recursively, using
    /// the latest recorded merge that formed the same string (as sentencepiece's `rev_merge`).
    fn resegment(
        &self,
        bytes: &[u8],
        w: &[u8],
        rev: &[(u32, u32, u32)],
        out: &mut Vec<u32>,
        prev_unk: &mut bool,
    ) {
        if let Some(id) = self.table.normal(w)
            && self.types[id as usize] == PieceType::Unused
            && let Some(&(_, ll, _)) = rev
                .iter()
                .rev()
                .find(|&&(st, ll, rl)| &bytes[st as usize..(st + ll + rl) as usize] == w)
        {
            let (a, b) = w.split_at(ll as usize);
            self.resegment(bytes, a, rev, out, prev_unk);
            self.resegment(bytes, b, rev, out, prev_unk);
            return;
        }
        self.emit(w, out, prev_unk);
    }

    #[inline]
    fn emit(&self, w: &[u8], out: &mut Vec<u32>, prev_unk: &mut bool) {
        // sentencepiece's PieceToId: reserved pieces first, then normal ones, else <unk>.
        let id = self
            .table
            .reserved(w)
            .or_else(|| self.table.normal(w))
            .unwrap_or(self.unk_id);
        let is_unk = id == self.unk_id;
        if is_unk && self.byte_fallback {
            out.extend(w.iter().map(|&b| self.byte_ids[b as usize]));
        } else if !(is_unk && *prev_unk) {
            out.push(id);
        }
        *prev_unk = is_unk;
    }

    /// Text of `ids`, as python `sp.decode(ids)`: control pieces vanish, `<unk>` becomes the
    /// unknown surface (" ⁇ "), runs of byte pieces are reassembled as UTF-8 (each invalid byte →
    /// U+FFFD), `▁` → ' ', and the dummy-prefix space of the first piece is dropped.
    /// Ids out of range are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let strip_first = self.add_dummy_prefix || self.remove_extra_whitespaces;
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        for &id in ids {
            let Some(t) = self.types.get(id as usize).copied() else {
                continue;
            };
            if t == PieceType::Byte {
                bytes.push(piece_to_byte(self.table.str(id)).unwrap_or(0));
                continue;
            }
            flush_bytes(&mut bytes, &mut text);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            let piece = self.table.str(id);
            bos_ws_seen = false;
            match t {
                PieceType::Control => {}
                PieceType::Unknown => text.push_str(&self.unk_surface),
                _ => {
                    let mut p = piece;
                    if is_bos_ws
                        && strip_first
                        && let Some(rest) = p.strip_prefix(SPACE)
                    {
                        p = rest;
                        bos_ws_seen = !self.remove_extra_whitespaces;
                    }
                    text.push_str(&p.replace(SPACE, " "));
                }
            }
        }
        flush_bytes(&mut bytes, &mut text);
        text
    }
}

/// "No piece" in symbol ids.
const NONE: u32 = u32::MAX;

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

/// `TrainerSpec.unk_surface`.
const UNK_SURFACE: u32 = 44;

fn flush_bytes(bytes: &mut Vec<u8>, text: &mut String) {
    if bytes.is_empty() {
        return;
    }
    // Valid UTF-8 runs are copied; each structurally invalid byte becomes one U+FFFD.
    let mut rest: &[u8] = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                break;
            }
            Err(e) => {
                let good = e.valid_up_to();
                text.push_str(std::str::from_utf8(&rest[..good]).unwrap());
                text.push('\u{FFFD}');
                rest = &rest[good + 1..];
            }
        }
    }
    bytes.clear();
}

/// `<0xAB>` → 0xAB.
pub fn piece_to_byte(p: &str) -> Option<u8> {
    let h = p.strip_prefix("<0x")?.strip_suffix('>')?;
    if h.len() != 2 {
        return None;
    }
    u8::from_str_radix(h, 16).ok()
}

/// Byte length of the UTF-8 sequence starting with `b` (1 for a stray continuation byte).
#[inline]
fn utf8_len(b: u8) -> usize {
    match b {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    /// Piece id of the symbol's string in `normal`, or `NONE`.
    id: u32,
    prev: i32,
    next: i32,
    freeze: bool,
}

/// A candidate merge. Ordered so the max-heap pops the highest score, then the smallest `left`.
#[derive(Clone, Copy)]
struct Cand {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
    /// The merged piece.
    id: u32,
}

impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

#[derive(Default)]
struct Scratch {
    norm: String,
    syms: Vec<Sym>,
    heap: BinaryHeap<Cand>,
    rev_merge: Vec<(u32, u32, u32)>,
    /// Unigram lattice: per byte position, (best score, start of the last piece, its id).
    best: Vec<(f32, u32, u32)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}
