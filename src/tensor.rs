//! Shapes and dtypes shared by the model, the backends and the file formats. No autograd.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Element types zhllama reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Convert little-endian raw bytes of `dtype` to f32, appending to `out`.
pub fn bytes_to_f32(bytes: &[u8], dtype: DType, out: &mut Vec<f32>) -> Result<()> {
    if !bytes.len().is_multiple_of(dtype.size()) {
        bail!(
            "{} bytes is not a whole number of {:?} elements",
            bytes.len(),
            dtype
        );
    }
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
    Ok(())
}

/// Convert f32 values to little-endian raw bytes of `dtype` (round to nearest even).
pub fn f32_to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}
