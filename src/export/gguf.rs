//! The GGUF v3 container (llama.cpp's model file), written as a stream.
//!
//! Layout, all little-endian: `"GGUF"`, version `u32` = 3, tensor count `u64`, metadata count
//! `u64`; the metadata key/value pairs (key: `u64` length + UTF-8; value: `u32` type tag + value;
//! arrays: element tag `u32`, count `u64`, elements); one info per tensor (name, `u32` rank, the
//! dimensions as `u64` *innermost first* — the reverse of a row-major shape —, `u32` GGML type,
//! `u64` offset into the data section); zero padding to [`ALIGNMENT`]; then the tensor data, each
//! tensor starting at an [`ALIGNMENT`]-aligned offset.
//!
//! [`GgufWriter::new`] takes every key and tensor *description* up front, so the header (which
//! holds all offsets) is written first and each tensor's bytes can follow one at a time through
//! [`GgufWriter::write_tensor`]: the writer never holds more than the tensor it is given.

use anyhow::{Result, bail, ensure};
use std::io::Write;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
/// GGUF's default `general.alignment` (we do not write the key, so readers use this value).
pub const ALIGNMENT: u64 = 32;

/// Elements per Q8_0 block.
pub const QK8_0: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 2 + QK8_0;

/// The GGML tensor types zhllama writes (`ggml_type` numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
    BF16,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// Bytes of `n` elements (a whole number of blocks for Q8_0).
    pub fn bytes(self, n: usize) -> Result<usize> {
        Ok(match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 | GgmlType::BF16 => 2 * n,
            GgmlType::Q8_0 => {
                ensure!(
                    n.is_multiple_of(QK8_0),
                    "{n} elements is not a whole number of Q8_0 blocks of {QK8_0}"
                );
                n / QK8_0 * Q8_0_BLOCK_BYTES
            }
        })
    }

    /// `x` in this type's byte layout, appended to `out`.
    pub fn encode(self, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
        out.reserve(self.bytes(x.len())?);
        match self {
            GgmlType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
            GgmlType::F16 => {
                out.extend(x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()))
            }
            GgmlType::BF16 => out.extend(
                x.iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()),
            ),
            GgmlType::Q8_0 => {
                for block in x.chunks_exact(QK8_0) {
                    quantize_q8_0_block(block, out);
                }
            }
        }
        Ok(())
    }
}

/// One Q8_0 block (GGML's reference `quantize_row_q8_0`): scale `d = max|x| / 127` stored as f16,
/// `q[j] = round(x[j] / d)` (half away from zero) as `i8`; an all-zero block has `d = 0`, `q = 0`.
/// Dequantized: `x ≈ f16(d) · q`.
pub fn quantize_q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    debug_assert_eq!(x.len(), QK8_0);
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(half::f16::from_f32(d).to_le_bytes());
    // |x·id| ≤ 127 up to rounding of `id`, so the cast never saturates past ±127 by more than the
    // rounding; `as i8` saturates, which is also what a reader would clamp to.
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// Inverse of [`quantize_q8_0_block`] over whole blocks (for tests and error reports).
pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / Q8_0_BLOCK_BYTES * QK8_0);
    for b in bytes.chunks_exact(Q8_0_BLOCK_BYTES) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
    }
    out
}

/// A metadata value (GGUF's value types that zhllama writes).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrF32(Vec<f32>),
    ArrI32(Vec<i32>),
}

const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Value {
    fn encode(&self, out: &mut Vec<u8>) {
        let arr = |out: &mut Vec<u8>, tag: u32, n: usize| {
            out.extend(T_ARRAY.to_le_bytes());
            out.extend(tag.to_le_bytes());
            out.extend((n as u64).to_le_bytes());
        };
        match self {
            Value::U32(v) => {
                out.extend(T_U32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Value::I32(v) => {
                out.extend(T_I32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Value::F32(v) => {
                out.extend(T_F32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Value::Bool(v) => {
                out.extend(T_BOOL.to_le_bytes());
                out.push(u8::from(*v));
            }
            Value::Str(s) => {
                out.extend(T_STRING.to_le_bytes());
                put_str(out, s);
            }
            Value::ArrStr(v) => {
                arr(out, T_STRING, v.len());
                for s in v {
                    put_str(out, s);
                }
            }
            Value::ArrF32(v) => {
                arr(out, T_F32, v.len());
                out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
            Value::ArrI32(v) => {
                arr(out, T_I32, v.len());
                out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
        }
    }
}

/// A tensor's description in the header.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDesc {
    pub name: String,
    /// Row-major shape (outermost first, as safetensors and numpy); the file stores it reversed.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorDesc {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> Result<usize> {
        self.ty
            .bytes(self.numel())
            .map_err(|e| anyhow::anyhow!("tensor {}: {e}", self.name))
    }
}

fn pad_to(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// Writes one GGUF file: the header at construction, then each tensor's bytes in order.
pub struct GgufWriter<W: Write> {
    out: W,
    tensors: Vec<TensorDesc>,
    next: usize,
    /// Bytes written so far (for the alignment padding).
    pos: u64,
}

impl<W: Write> GgufWriter<W> {
    /// Write the header (metadata in the given order, tensor infos, padding) to `out`. Keys must
    /// be unique and tensor names unique; shapes of rank 1..=4.
    pub fn new(mut out: W, metadata: &[(String, Value)], tensors: Vec<TensorDesc>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for (k, _) in metadata {
            ensure!(seen.insert(k.as_str()), "metadata key {k} given twice");
        }
        let mut seen = std::collections::HashSet::new();
        let mut head = Vec::new();
        head.extend(MAGIC);
        head.extend(VERSION.to_le_bytes());
        head.extend((tensors.len() as u64).to_le_bytes());
        head.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut head, k);
            v.encode(&mut head);
        }
        let mut offset = 0u64;
        for t in &tensors {
            ensure!(
                seen.insert(t.name.as_str()),
                "tensor {} given twice",
                t.name
            );
            if t.shape.is_empty() || t.shape.len() > 4 {
                bail!(
                    "tensor {}: rank {} (GGUF takes 1 to 4)",
                    t.name,
                    t.shape.len()
                );
            }
            put_str(&mut head, &t.name);
            head.extend((t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                head.extend((d as u64).to_le_bytes());
            }
            head.extend(t.ty.id().to_le_bytes());
            head.extend(offset.to_le_bytes());
            offset = pad_to(offset + t.bytes()? as u64);
        }
        head.resize(pad_to(head.len() as u64) as usize, 0);
        out.write_all(&head)?;
        Ok(GgufWriter {
            out,
            pos: head.len() as u64,
            tensors,
            next: 0,
        })
    }

    /// The description of the tensor [`Self::write_tensor`] expects next, if any.
    pub fn next_tensor(&self) -> Option<&TensorDesc> {
        self.tensors.get(self.next)
    }

    /// Write the next tensor's bytes (already in its GGML type), then pad to the alignment.
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            bail!("all {} tensors are already written", self.tensors.len());
        };
        let want = t.bytes()?;
        ensure!(
            bytes.len() == want,
            "tensor {}: {} bytes given, {want} expected for {:?} {:?}",
            t.name,
            bytes.len(),
            t.ty,
            t.shape
        );
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        // Padding after every tensor, the last one included (as gguf-py writes it, so the data
        // section is the sum of the padded sizes that llama.cpp's reader computes).
        let pad = pad_to(self.pos) - self.pos;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.pos += pad;
        self.next += 1;
        Ok(())
    }

    /// Check every tensor was written and hand back the sink.
    pub fn finish(self) -> Result<W> {
        ensure!(
            self.next == self.tensors.len(),
            "only {} of {} tensors were written",
            self.next,
            self.tensors.len()
        );
        Ok(self.out)
    }
}
