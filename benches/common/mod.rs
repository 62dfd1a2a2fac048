//! What the two CPU op benches (`ops`: criterion; `ops_cpu`: process CPU time) share: the `small`
//! preset's shapes, the model's GEMMs and the deterministic inputs, so both time the same work.

use zhllama::backend::{AttnShape, RopeShape, RowShape};

pub const B: usize = 4;
pub const T: usize = 256;
pub const N: usize = B * T;
pub const C: usize = 512;
pub const H: usize = 8;
pub const D: usize = 64;
pub const FFN: usize = 1376;
pub const V: usize = 49954;

/// (name, m, n, k, trans_a, trans_b): the 1024³ ceiling, then the model's GEMMs
/// (y = x·Wᵀ forward, dX = dY·W, dW = dYᵀ·X backward).
pub const GEMMS: [(&str, usize, usize, usize, bool, bool); 7] = [
    ("sgemm_1024", 1024, 1024, 1024, false, false),
    ("attn_proj_fwd", N, C, C, false, true),
    ("mlp_up_fwd", N, FFN, C, false, true),
    ("mlp_down_fwd", N, C, FFN, false, true),
    ("mlp_down_dx", N, FFN, C, false, false),
    ("mlp_up_dw", FFN, C, N, true, false),
    ("lm_head_fwd", N, V, C, false, true),
];

/// Deterministic pseudo-random values in [-scale, scale) (no generator crate needed).
pub fn filled(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// One shape per op family: rows of the norms and activations, RoPE, attention.
pub struct Shapes {
    pub rows: RowShape,
    pub rope: RopeShape,
    pub attn: AttnShape,
}

pub fn shapes() -> Shapes {
    Shapes {
        rows: RowShape { n: N, c: C },
        rope: RopeShape {
            b: B,
            t: T,
            h: H,
            d: D,
            theta: 10000.0,
            pos_offset: 0,
        },
        attn: AttnShape {
            b: B,
            t: T,
            h: H,
            hkv: H,
            d: D,
        },
    }
}
