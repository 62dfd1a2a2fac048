//! LoRA as PEFT defines it: `y = x·Wᵀ + (alpha/r) · dropout(x)·Aᵀ·Bᵀ` on a chosen subset of the
//! seven LLaMA projections; `A [r, in]` starts kaiming-uniform, `B [out, r]` starts at zero, so the
//! adapted model equals the base model at step 0.
//!
//! The dropout mask comes from a counter-based hash of (key, layer, projection, element), not from a
//! stateful RNG: the same key gives the same mask, so a resumed run replays exactly.

use crate::util::hash::mix64;
use anyhow::{Result, bail};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One of the seven linear projections of a LLaMA decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// Position in [`Proj::ALL`] (the declaration order), e.g. of a layer's projection locations.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The HF module name (`q_proj`, ..., `down_proj`).
    pub fn module_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The HF parent module (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// The HF name prefix of this projection in layer `layer`, e.g.
    /// `model.layers.3.self_attn.q_proj`.
    pub fn prefix(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}",
            self.parent(),
            self.module_name()
        )
    }

    /// Parse a PEFT `target_modules` entry (`"q_proj"` ... `"down_proj"`).
    pub fn parse(name: &str) -> Result<Proj> {
        Proj::ALL
            .into_iter()
            .find(|p| p.module_name() == name)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown LoRA target module {name:?} (expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                )
            })
    }
}

/// LoRA hyper-parameters (PEFT `LoraConfig`: `r`, `lora_alpha`, `lora_dropout`, `target_modules`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    /// Dropout probability on the LoRA input path (applied only when training).
    pub dropout: f32,
    /// Adapted projections, in [`Proj::ALL`] order, no duplicates.
    pub targets: Vec<Proj>,
    /// Seed of the A-matrix initialisation.
    pub init_seed: u64,
}

impl LoraConfig {
    /// A config adapting `targets`; checks `r > 0`, `0 <= dropout < 1`, non-empty targets.
    pub fn new(
        r: usize,
        alpha: f32,
        dropout: f32,
        targets: &[Proj],
        init_seed: u64,
    ) -> Result<Self> {
        if r == 0 {
            bail!("LoRA rank r must be positive");
        }
        if !(0.0..1.0).contains(&dropout) {
            bail!("LoRA dropout must be in [0, 1), got {dropout}");
        }
        if targets.is_empty() {
            bail!("LoRA needs at least one target module");
        }
        let mut t = targets.to_vec();
        t.sort();
        t.dedup();
        Ok(LoraConfig {
            r,
            alpha,
            dropout,
            targets: t,
            init_seed,
        })
    }

    /// The factor on the LoRA path, `alpha / r` (PEFT's `scaling`, no rsLoRA).
    pub fn scaling(&self) -> f32 {
        self.alpha / self.r as f32
    }

    pub fn targets_proj(&self, p: Proj) -> bool {
        self.targets.contains(&p)
    }
}

/// `a = U(-1/sqrt(in), 1/sqrt(in))`, PEFT's `kaiming_uniform_(A, a=sqrt(5))` (gain sqrt(1/3),
/// bound = sqrt(3)·gain/sqrt(fan_in) = 1/sqrt(fan_in)). Seeded per (seed, layer, projection), so the
/// values do not depend on which other modules are adapted.
pub fn init_lora_a(a: &mut [f32], fan_in: usize, seed: u64, layer: usize, proj: Proj) {
    let stream = ((layer as u64) << 8) | proj as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ mix64(stream.wrapping_add(0x4c6f5241)));
    let bound = 1.0 / (fan_in as f32).sqrt();
    for x in a.iter_mut() {
        *x = rng.random_range(-bound..bound);
    }
}

/// The per-tensor dropout key of projection `proj` in layer `layer` under the step's `key`: what
/// [`crate::backend::Backend::dropout`] takes, so the device and the host draw the same mask.
pub fn dropout_key(key: u64, layer: usize, proj: Proj) -> u64 {
    mix64(key ^ mix64(((layer as u64) << 8) | proj as u64 | 0xd000_0000))
}

/// `x[i] *= keep_i / (1 - p)` where `keep_i = u(key, layer, proj, i) >= p` and `u` is a uniform in
/// `[0, 1)` from a stateless hash: the same (key, layer, proj) gives the same mask. Applying the same
/// call to a gradient is the dropout backward. The host form of `Backend::dropout` with
/// [`dropout_key`].
pub fn apply_dropout_mask(x: &mut [f32], p: f32, key: u64, layer: usize, proj: Proj) {
    crate::ops::dropout::dropout(x, p, dropout_key(key, layer, proj));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proj_index_is_the_position_in_all() {
        for (i, p) in Proj::ALL.into_iter().enumerate() {
            assert_eq!(p.index(), i, "{p:?}");
        }
    }

    #[test]
    fn kaiming_bound_and_determinism() {
        let mut a = vec![0.0; 8 * 64];
        init_lora_a(&mut a, 64, 7, 1, Proj::V);
        let bound = 1.0 / 8.0;
        assert!(a.iter().all(|x| x.abs() <= bound));
        // A uniform on [-b, b] has variance b²/3; 512 samples: std error of the variance ~ 6%.
        let var = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.25, "{var}");
        let mut b = vec![0.0; 8 * 64];
        init_lora_a(&mut b, 64, 7, 1, Proj::V);
        assert_eq!(a, b);
        init_lora_a(&mut b, 64, 7, 1, Proj::Q);
        assert_ne!(a, b);
    }

    #[test]
    fn dropout_mask_rate_and_replay() {
        let mut x = vec![1.0f32; 20000];
        apply_dropout_mask(&mut x, 0.25, 42, 0, Proj::Q);
        let kept = x.iter().filter(|v| **v != 0.0).count() as f32 / x.len() as f32;
        // Binomial(20000, 0.75): std 0.003; 0.02 is > 6 sigma.
        assert!((kept - 0.75).abs() < 0.02, "{kept}");
        assert!(
            x.iter()
                .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6)
        );
        let mut y = vec![1.0f32; 20000];
        apply_dropout_mask(&mut y, 0.25, 42, 0, Proj::Q);
        assert_eq!(x, y, "same key, same mask");
        apply_dropout_mask(&mut y[..0], 0.25, 43, 0, Proj::Q);
        let mut z = vec![1.0f32; 20000];
        apply_dropout_mask(&mut z, 0.25, 43, 0, Proj::Q);
        assert_ne!(x, z, "another key, another mask");
    }
}
