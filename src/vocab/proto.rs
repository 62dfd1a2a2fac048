//! SentencePiece `ModelProto` read/write on the protobuf wire format, hand-written.
//!
//! Why not a generated codec: the merged Chinese-LLaMA model must hash to the official sha256, so
//! a read→write round trip has to be byte-identical, unknown fields included. Here every message
//! keeps its fields in file order as raw `(number, value)` pairs; typed getters/setters read and
//! write them in place, so untouched fields are written back as they were read. New fields are
//! inserted in field-number order and new pieces are written the way python protobuf writes them
//! (fields by number; `score` written whenever set, even `0.0`; `type` only when set). The only
//! normalisation: over-long varints (which no protobuf encoder emits) are rewritten minimal.
//!
//! Field numbers follow `sentencepiece_model.proto`:
//! ModelProto { pieces = 1, trainer_spec = 2, normalizer_spec = 3, self_test_data = 4,
//! denormalizer_spec = 5 }; SentencePiece { piece = 1, score = 2, type = 3 }.

use anyhow::{Result, bail};

/// One wire value. `Len` holds the payload of a length-delimited field (string, bytes, message).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Varint(u64),
    I64(u64),
    Len(Vec<u8>),
    I32(u32),
}

/// One field as it appears on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    pub num: u32,
    pub val: Value,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = buf.get(*pos) else {
            bail!("truncated varint at byte {}", *pos)
        };
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    bail!("varint longer than 10 bytes at byte {}", *pos)
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A field value borrowed from the input (no copy until kept).
#[derive(Clone, Copy)]
enum Raw<'a> {
    Varint(u64),
    I64(u64),
    Len(&'a [u8]),
    I32(u32),
}

impl Raw<'_> {
    fn to_value(self) -> Value {
        match self {
            Raw::Varint(v) => Value::Varint(v),
            Raw::I64(v) => Value::I64(v),
            Raw::Len(b) => Value::Len(b.to_vec()),
            Raw::I32(v) => Value::I32(v),
        }
    }
}

/// Read the field at `*pos` (tag and value), advancing `*pos`.
fn read_field<'a>(buf: &'a [u8], pos: &mut usize) -> Result<(u32, Raw<'a>)> {
    let start = *pos;
    let tag = read_varint(buf, pos)?;
    let num = (tag >> 3) as u32;
    if num == 0 {
        bail!("field number 0 at byte {start}");
    }
    let raw = match tag & 7 {
        0 => Raw::Varint(read_varint(buf, pos)?),
        1 => {
            let Some(b) = buf.get(*pos..*pos + 8) else {
                bail!("truncated 64-bit field {num} at byte {start}")
            };
            *pos += 8;
            Raw::I64(u64::from_le_bytes(b.try_into().unwrap()))
        }
        2 => {
            let n = read_varint(buf, pos)? as usize;
            let Some(b) = pos.checked_add(n).and_then(|end| buf.get(*pos..end)) else {
                bail!("truncated length-delimited field {num} at byte {start} (length {n})")
            };
            *pos += n;
            Raw::Len(b)
        }
        5 => {
            let Some(b) = buf.get(*pos..*pos + 4) else {
                bail!("truncated 32-bit field {num} at byte {start}")
            };
            *pos += 4;
            Raw::I32(u32::from_le_bytes(b.try_into().unwrap()))
        }
        w => bail!("unsupported wire type {w} (field {num}) at byte {start}"),
    };
    Ok((num, raw))
}

/// A protobuf message as an ordered list of raw fields (lossless for canonical encodings).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Message {
    pub fields: Vec<Field>,
}

impl Message {
    /// Parse `buf` as one message. Errors name the byte offset where the wire format breaks.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let mut fields = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let (num, raw) = read_field(buf, &mut pos)?;
            fields.push(Field {
                num,
                val: raw.to_value(),
            });
        }
        Ok(Message { fields })
    }

    /// Append the wire encoding of every field, in order, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for f in &self.fields {
            write_field(out, f);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// The last occurrence of field `num` (protobuf's "last one wins" for singular fields).
    pub fn get(&self, num: u32) -> Option<&Value> {
        self.fields
            .iter()
            .rev()
            .find(|f| f.num == num)
            .map(|f| &f.val)
    }

    pub fn get_varint(&self, num: u32) -> Option<u64> {
        match self.get(num) {
            Some(Value::Varint(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn get_i32(&self, num: u32) -> Option<i32> {
        self.get_varint(num).map(|v| v as i32)
    }

    pub fn get_bool(&self, num: u32) -> Option<bool> {
        self.get_varint(num).map(|v| v != 0)
    }

    pub fn get_f32(&self, num: u32) -> Option<f32> {
        match self.get(num) {
            Some(Value::I32(v)) => Some(f32::from_bits(*v)),
            _ => None,
        }
    }

    pub fn get_bytes(&self, num: u32) -> Option<&[u8]> {
        match self.get(num) {
            Some(Value::Len(v)) => Some(v),
            _ => None,
        }
    }

    pub fn get_str(&self, num: u32) -> Option<&str> {
        self.get_bytes(num)
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Set singular field `num`: replaced in place if present, else inserted before the first
    /// field with a larger number (python protobuf's order).
    pub fn set(&mut self, num: u32, val: Value) {
        if let Some(f) = self.fields.iter_mut().rev().find(|f| f.num == num) {
            f.val = val;
            return;
        }
        let at = self
            .fields
            .iter()
            .position(|f| f.num > num)
            .unwrap_or(self.fields.len());
        self.fields.insert(at, Field { num, val });
    }

    pub fn set_varint(&mut self, num: u32, v: u64) {
        self.set(num, Value::Varint(v));
    }

    /// Signed int32 fields are written sign-extended to 64 bits, as protobuf does.
    pub fn set_i32(&mut self, num: u32, v: i32) {
        self.set(num, Value::Varint(v as i64 as u64));
    }

    pub fn set_bool(&mut self, num: u32, v: bool) {
        self.set(num, Value::Varint(v as u64));
    }

    pub fn set_f32(&mut self, num: u32, v: f32) {
        self.set(num, Value::I32(v.to_bits()));
    }

    pub fn set_str(&mut self, num: u32, v: &str) {
        self.set(num, Value::Len(v.as_bytes().to_vec()));
    }
}

fn write_field(out: &mut Vec<u8>, f: &Field) {
    let wire = match f.val {
        Value::Varint(_) => 0,
        Value::I64(_) => 1,
        Value::Len(_) => 2,
        Value::I32(_) => 5,
    };
    write_varint(out, (u64::from(f.num) << 3) | wire);
    match &f.val {
        Value::Varint(v) => write_varint(out, *v),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Len(b) => {
            write_varint(out, b.len() as u64);
            out.extend_from_slice(b);
        }
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// `SentencePiece.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

impl PieceType {
    fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry. `score`/`kind` are `None` when the field is absent on the wire (proto2
/// presence), which matters for byte identity: the merge writes `score = 0` explicitly.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: Option<f32>,
    pub kind: Option<i32>,
    /// Fields other than 1..=3, kept for the round trip.
    pub unknown: Vec<Field>,
}

impl Piece {
    /// A piece as python protobuf writes `SentencePiece(piece=s, score=score)`: type left unset.
    pub fn new(piece: &str, score: f32) -> Self {
        Piece {
            piece: piece.to_string(),
            score: Some(score),
            kind: None,
            unknown: Vec::new(),
        }
    }

    pub fn with_type(mut self, t: PieceType) -> Self {
        self.kind = Some(t as i32);
        self
    }

    /// The type, NORMAL when absent (the proto default).
    pub fn piece_type(&self) -> PieceType {
        self.kind
            .and_then(PieceType::from_i32)
            .unwrap_or(PieceType::Normal)
    }

    pub fn score(&self) -> f32 {
        self.score.unwrap_or(0.0)
    }

    fn parse(buf: &[u8], index: usize) -> Result<Self> {
        let mut p = Piece {
            piece: String::new(),
            score: None,
            kind: None,
            unknown: Vec::new(),
        };
        let mut has_piece = false;
        let mut pos = 0;
        while pos < buf.len() {
            let (num, raw) =
                read_field(buf, &mut pos).map_err(|e| anyhow::anyhow!("piece {index}: {e}"))?;
            match (num, raw) {
                (1, Raw::Len(b)) => {
                    p.piece = std::str::from_utf8(b)
                        .map_err(|_| anyhow::anyhow!("piece {index}: string is not UTF-8"))?
                        .to_string();
                    has_piece = true;
                }
                (2, Raw::I32(v)) => p.score = Some(f32::from_bits(v)),
                (3, Raw::Varint(v)) => p.kind = Some(v as i32),
                (1..=3, _) => bail!("piece {index}: field has the wrong wire type"),
                (num, raw) => p.unknown.push(Field {
                    num,
                    val: raw.to_value(),
                }),
            }
        }
        if !has_piece {
            bail!("piece {index} has no string");
        }
        Ok(p)
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        write_field(
            out,
            &Field {
                num: 1,
                val: Value::Len(self.piece.as_bytes().to_vec()),
            },
        );
        if let Some(s) = self.score {
            write_field(
                out,
                &Field {
                    num: 2,
                    val: Value::I32(s.to_bits()),
                },
            );
        }
        if let Some(k) = self.kind {
            write_field(
                out,
                &Field {
                    num: 3,
                    val: Value::Varint(k as i64 as u64),
                },
            );
        }
        for f in &self.unknown {
            write_field(out, f);
        }
    }
}

/// `TrainerSpec.ModelType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Unigram = 1,
    Bpe = 2,
    Word = 3,
    Char = 4,
}

/// `TrainerSpec` field numbers used here.
pub mod trainer {
    pub const INPUT: u32 = 1;
    pub const MODEL_PREFIX: u32 = 2;
    pub const MODEL_TYPE: u32 = 3;
    pub const VOCAB_SIZE: u32 = 4;
    pub const INPUT_FORMAT: u32 = 7;
    pub const CHARACTER_COVERAGE: u32 = 10;
    pub const MAX_SENTENCEPIECE_LENGTH: u32 = 20;
    pub const SPLIT_BY_UNICODE_SCRIPT: u32 = 21;
    pub const SPLIT_BY_WHITESPACE: u32 = 22;
    pub const SPLIT_BY_NUMBER: u32 = 23;
    pub const TREAT_WHITESPACE_AS_SUFFIX: u32 = 24;
    pub const SPLIT_DIGITS: u32 = 25;
    pub const ALLOW_WHITESPACE_ONLY_PIECES: u32 = 26;
    pub const BYTE_FALLBACK: u32 = 35;
    pub const UNK_ID: u32 = 40;
    pub const BOS_ID: u32 = 41;
    pub const EOS_ID: u32 = 42;
    pub const PAD_ID: u32 = 43;
    pub const UNK_PIECE: u32 = 45;
    pub const BOS_PIECE: u32 = 46;
    pub const EOS_PIECE: u32 = 47;
    pub const PAD_PIECE: u32 = 48;
}

/// `NormalizerSpec` field numbers.
pub mod normalizer {
    pub const NAME: u32 = 1;
    pub const PRECOMPILED_CHARSMAP: u32 = 2;
    pub const ADD_DUMMY_PREFIX: u32 = 3;
    pub const REMOVE_EXTRA_WHITESPACES: u32 = 4;
    pub const ESCAPE_WHITESPACES: u32 = 5;
    pub const NORMALIZATION_RULE_TSV: u32 = 6;
}

/// A SentencePiece model file. Top-level fields other than the pieces stay raw, in order; the
/// pieces are written as one contiguous block where the first piece was (every protobuf encoder
/// writes a repeated field contiguously).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelProto {
    pub pieces: Vec<Piece>,
    /// Non-piece top-level fields in file order.
    pub others: Vec<Field>,
    /// Index into `others` before which the pieces block is written.
    pieces_at: usize,
}

pub const PIECES: u32 = 1;
pub const TRAINER_SPEC: u32 = 2;
pub const NORMALIZER_SPEC: u32 = 3;
pub const DENORMALIZER_SPEC: u32 = 5;

impl ModelProto {
    /// An empty model with the given specs.
    pub fn new(pieces: Vec<Piece>, trainer_spec: &Message, normalizer_spec: &Message) -> Self {
        ModelProto {
            pieces,
            others: vec![
                Field {
                    num: TRAINER_SPEC,
                    val: Value::Len(trainer_spec.to_bytes()),
                },
                Field {
                    num: NORMALIZER_SPEC,
                    val: Value::Len(normalizer_spec.to_bytes()),
                },
            ],
            pieces_at: 0,
        }
    }

    /// Parse a `.model` file's bytes. Checks the shape is a SentencePiece model: at least one
    /// piece, every piece with a UTF-8 string, the specs parse as messages.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let mut pieces = Vec::new();
        let mut others = Vec::new();
        let mut pieces_at = None;
        let mut pos = 0;
        while pos < buf.len() {
            let (num, raw) = read_field(buf, &mut pos)?;
            match (num, raw) {
                (PIECES, Raw::Len(b)) => {
                    pieces_at.get_or_insert(others.len());
                    pieces.push(Piece::parse(b, pieces.len())?);
                }
                (PIECES, _) => bail!("field 1 (pieces) has the wrong wire type"),
                (num, raw) => {
                    if matches!(num, TRAINER_SPEC | NORMALIZER_SPEC | DENORMALIZER_SPEC) {
                        let Raw::Len(b) = raw else {
                            bail!("field {num} is not a message")
                        };
                        Message::parse(b).map_err(|e| anyhow::anyhow!("field {num}: {e}"))?;
                    }
                    others.push(Field {
                        num,
                        val: raw.to_value(),
                    });
                }
            }
        }
        if pieces.is_empty() {
            bail!("no pieces: not a SentencePiece model");
        }
        // Every SentencePiece writer emits both specs after the pieces; a file cut at a field
        // boundary would otherwise parse as a smaller model.
        for (num, name) in [
            (TRAINER_SPEC, "trainer_spec"),
            (NORMALIZER_SPEC, "normalizer_spec"),
        ] {
            if !others.iter().any(|f| f.num == num) {
                bail!("no {name}: truncated or not a SentencePiece model");
            }
        }
        Ok(ModelProto {
            pieces,
            others,
            pieces_at: pieces_at.unwrap_or(0),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pieces.len() * 16 + 4096);
        let mut piece_buf = Vec::with_capacity(64);
        for (i, f) in self.others.iter().enumerate() {
            if i == self.pieces_at {
                self.write_pieces(&mut out, &mut piece_buf);
            }
            write_field(&mut out, f);
        }
        if self.pieces_at >= self.others.len() {
            self.write_pieces(&mut out, &mut piece_buf);
        }
        out
    }

    fn write_pieces(&self, out: &mut Vec<u8>, buf: &mut Vec<u8>) {
        for p in &self.pieces {
            buf.clear();
            p.write_to(buf);
            write_varint(out, (u64::from(PIECES) << 3) | 2);
            write_varint(out, buf.len() as u64);
            out.extend_from_slice(buf);
        }
    }

    fn sub(&self, num: u32) -> Message {
        self.others
            .iter()
            .rev()
            .find(|f| f.num == num)
            .and_then(|f| match &f.val {
                Value::Len(b) => Message::parse(b).ok(),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn set_sub(&mut self, num: u32, m: &Message) {
        let val = Value::Len(m.to_bytes());
        if let Some(f) = self.others.iter_mut().rev().find(|f| f.num == num) {
            f.val = val;
            return;
        }
        let at = self
            .others
            .iter()
            .position(|f| f.num > num)
            .unwrap_or(self.others.len());
        if at < self.pieces_at || (at == self.pieces_at && num < PIECES) {
            self.pieces_at += 1;
        }
        self.others.insert(at, Field { num, val });
    }

    /// The trainer spec (empty message when absent).
    pub fn trainer_spec(&self) -> Message {
        self.sub(TRAINER_SPEC)
    }

    pub fn set_trainer_spec(&mut self, m: &Message) {
        self.set_sub(TRAINER_SPEC, m)
    }

    /// The normalizer spec (empty message when absent).
    pub fn normalizer_spec(&self) -> Message {
        self.sub(NORMALIZER_SPEC)
    }

    pub fn set_normalizer_spec(&mut self, m: &Message) {
        self.set_sub(NORMALIZER_SPEC, m)
    }

    /// The model type from the trainer spec (UNIGRAM when absent, the proto default).
    pub fn model_type(&self) -> Result<ModelType> {
        Ok(
            match self
                .trainer_spec()
                .get_i32(trainer::MODEL_TYPE)
                .unwrap_or(1)
            {
                1 => ModelType::Unigram,
                2 => ModelType::Bpe,
                3 => ModelType::Word,
                4 => ModelType::Char,
                t => bail!("unknown model_type {t}"),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            write_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(read_varint(&b, &mut pos).unwrap(), v);
            assert_eq!(pos, b.len());
        }
    }

    #[test]
    fn piece_encoding_matches_protobuf() {
        // SentencePiece(piece="ab", score=0.0) as python protobuf writes it:
        // 0a 02 'a' 'b' | 15 00 00 00 00   (tag 1 len 2; tag 2 fixed32 0.0)
        let mut out = Vec::new();
        Piece::new("ab", 0.0).write_to(&mut out);
        assert_eq!(out, [0x0a, 2, b'a', b'b', 0x15, 0, 0, 0, 0]);
    }

    #[test]
    fn truncated_is_an_error() {
        let mut out = Vec::new();
        Piece::new("abc", -1.0).write_to(&mut out);
        let mut model = vec![0x0a, out.len() as u8];
        model.extend_from_slice(&out);
        for (num, len) in [(2u8, 0u8), (3, 0)] {
            model.extend_from_slice(&[num << 3 | 2, len]);
        }
        assert!(ModelProto::parse(&model).is_ok());
        for cut in 1..model.len() {
            assert!(ModelProto::parse(&model[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn set_inserts_in_number_order() {
        let mut m = Message::default();
        m.set_varint(5, 1);
        m.set_varint(2, 1);
        m.set_varint(9, 1);
        m.set_varint(5, 7);
        let nums: Vec<u32> = m.fields.iter().map(|f| f.num).collect();
        assert_eq!(nums, [2, 5, 9]);
        assert_eq!(m.get_varint(5), Some(7));
    }
}
