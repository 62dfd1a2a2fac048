//! [`Tokenizer`]: text ↔ ids with exactly python `sentencepiece`'s results for BPE models
//! (LLaMA and the merged Chinese-LLaMA/Alpaca vocabularies).
//!
//! Why our own encoder: HF `tokenizers` BPE applies merges by rank, which cannot express
//! sentencepiece's rule once thousands of appended pieces share score 0 (RECIPE.md §1). Here the
//! rule is sentencepiece's own: repeatedly merge the adjacent pair whose concatenation is a piece
//! with the highest score, ties to the leftmost pair; a priority queue over a linked list of
//! symbols, with stale queue entries skipped on pop.
//!
//! The pipeline for one text:
//! 1. normalize: (identity character map) optional removal of extra spaces, a `▁` dummy prefix,
//!    every ' ' → `▁` (U+2581);
//! 2. split into characters, except that user-defined pieces are matched whole (longest first) and
//!    never merged further;
//! 3. BPE merges as above; pieces of type UNUSED that got formed are split back (resegmented);
//! 4. symbols that are not pieces become `<0xXX>` byte pieces of their UTF-8 bytes when the model
//!    has byte fallback, else `<unk>` (a run of unknown symbols gives one `<unk>`).

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
    fn write_usize(&mut self, i: usize) {
        self.0 = (self.0.rotate_left(5) ^ i as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type PieceMap = HashMap<Box<[u8]>, u32, BuildHasherDefault<PieceHasher>>;

/// A loaded SentencePiece model that encodes and decodes like python `sentencepiece`.
///
/// Public API (used by `data/` and `train/`; keep stable):
/// `load`, `from_model`, `encode`, `encode_batch`, `decode`, `vocab_size`, `bos_id`, `eos_id`,
/// `unk_id`, `pad_id`, `piece_to_id`, `id_to_piece`, `model`.
pub struct Tokenizer {
    model: ModelProto,
    kind: ModelType,
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<PieceType>,
    /// NORMAL, USER_DEFINED and UNUSED pieces: the ones merges may form (sentencepiece `pieces_`).
    normal: PieceMap,
    /// CONTROL, UNKNOWN and BYTE pieces (sentencepiece `reserved_id_map_`).
    reserved: PieceMap,
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

    /// Build from a parsed model. Supports BPE models (identity normalizer).
    pub fn from_model(model: ModelProto) -> Result<Self> {
        let kind = model.model_type()?;
        if kind != ModelType::Bpe {
            bail!("model type {kind:?} is not supported for encoding (BPE only)");
        }
        let ts = model.trainer_spec();
        let ns = model.normalizer_spec();
        if let Some(map) = ns.get_bytes(normalizer::PRECOMPILED_CHARSMAP)
            && !map.is_empty()
        {
            let name = ns.get_str(normalizer::NAME).unwrap_or("?");
            bail!("normalizer {name:?} (a precompiled character map) is not supported");
        }
        let n = model.pieces.len();
        if n > u32::MAX as usize / 2 {
            bail!("too many pieces ({n})");
        }
        let mut normal = PieceMap::default();
        let mut reserved = PieceMap::default();
        let mut user_defined: Vec<Vec<Box<[u8]>>> = vec![Vec::new(); 256];
        let mut byte_ids = [u32::MAX; 256];
        let mut unk_id = None;
        let mut has_unused = false;
        let (mut pieces, mut scores, mut types) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (i, p) in model.pieces.iter().enumerate() {
            let t = p.piece_type();
            let id = i as u32;
            if p.piece.is_empty() {
                bail!("piece {i} is empty");
            }
            let key: Box<[u8]> = p.piece.as_bytes().into();
            let map = match t {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => &mut normal,
                _ => &mut reserved,
            };
            if map.insert(key.clone(), id).is_some() {
                bail!("piece {i} {:?} is defined twice", p.piece);
            }
            match t {
                PieceType::UserDefined => user_defined[key[0] as usize].push(key),
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
            pieces.push(p.piece.clone());
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
            reserved.get(s.as_bytes()).copied()
        };
        let control = |id: Option<u32>| id.filter(|&i| types[i as usize] == PieceType::Control);
        let bos_id = control(piece_id(trainer::BOS_PIECE, "<s>"));
        let eos_id = control(piece_id(trainer::EOS_PIECE, "</s>"));
        let pad_id = control(piece_id(trainer::PAD_PIECE, "<pad>"))
            .or_else(|| normal.get(b"[PAD]".as_slice()).copied());
        let unk_surface = ts.get_str(UNK_SURFACE).unwrap_or(" \u{2047} ").to_string();
        Ok(Tokenizer {
            kind,
            pieces,
            scores,
            types,
            normal,
            reserved,
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
            model,
        })
    }

    /// The parsed model this tokenizer was built from.
    pub fn model(&self) -> &ModelProto {
        &self.model
    }

    /// The model type (BPE for every model this encoder accepts).
    pub fn model_type(&self) -> ModelType {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
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
        self.reserved.get(k).or_else(|| self.normal.get(k)).copied()
    }

    /// The piece string of `id`. Panics if `id >= vocab_size()`.
    pub fn id_to_piece(&self, id: u32) -> &str {
        &self.pieces[id as usize]
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

    fn normalize_into(&self, text: &str, out: &mut String) {
        out.clear();
        if text.is_empty() {
            return;
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

    fn encode_into(&self, text: &str, sc: &mut Scratch, out: &mut Vec<u32>) {
        let mut norm = std::mem::take(&mut sc.norm);
        self.normalize_into(text, &mut norm);
        let bytes = norm.as_bytes();
        if bytes.is_empty() {
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
        let s = &bytes[a.start as usize..(a.start + size) as usize];
        if let Some(&id) = self.normal.get(s) {
            heap.push(Cand {
                score: self.scores[id as usize],
                left: l as u32,
                right: r as u32,
                size,
            });
            if self.types[id as usize] == PieceType::Unused {
                rev_merge.push((a.start, a.len, b.len));
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
        if let Some(&id) = self.normal.get(w)
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
        let id = self
            .normal
            .get(w)
            .or_else(|| self.reserved.get(w))
            .copied()
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
                bytes.push(piece_to_byte(&self.pieces[id as usize]).unwrap_or(0));
                continue;
            }
            flush_bytes(&mut bytes, &mut text);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            let piece = self.pieces[id as usize].as_str();
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
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}
