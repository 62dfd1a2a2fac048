//! Shared helpers of the ZeRO-2 tests (`distributed_zero`, `distributed_overlap`, `cuda_nccl`).
#![allow(dead_code)]

use zhllama::backend::AdamW;

/// The bit patterns of `v`, for bit-for-bit comparisons with readable diffs.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The AdamW hyper-parameters every ZeRO-2 test uses, at 1-based `step`.
pub fn hp(step: u64) -> AdamW {
    AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step,
    }
}
