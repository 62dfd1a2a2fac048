//! Dynamic loss scaling for the fp16 mode, with the semantics of DeepSpeed's `DynamicLossScaler`
//! (`deepspeed/runtime/fp16/loss_scaler.py`), which the recipe's ZeRO-2 config drives
//! (`"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 100, "hysteresis": 2`).
//!
//! The backward pass is seeded with the current scale `S`; the optimizer divides it back out.
//! After every optimizer step (skipped or not) [`DynamicLossScaler::update`] is told whether the
//! gradient overflowed (had a NaN or Inf anywhere):
//! - overflow: while hysteresis is left (`cur_hysteresis > 1` and `hysteresis > 1`) it is used up
//!   one overflow at a time and the scale stays; otherwise the scale halves, but not below
//!   `min_scale` (DeepSpeed raises an error when the scale is already at `min_scale`; here the
//!   update reports [`ScaleUpdate::AtMinimum`] and the caller decides). The iteration is
//!   remembered as the last overflow.
//! - no overflow: every `scale_window` clean iterations since the last overflow the scale
//!   doubles and the hysteresis is refilled (with `consecutive_hysteresis` the hysteresis is
//!   refilled after every clean iteration instead).
//!
//! The scale is an `f64` (DeepSpeed's Python float): `min_scale` may be a non-power of two such as
//! the recipe's `1e-10`, which the halved scale is clamped to.

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

/// What one [`DynamicLossScaler::update`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleUpdate {
    /// No change.
    Unchanged,
    /// Overflow absorbed by the hysteresis: the scale stays, one fewer overflow is tolerated.
    HysteresisUsed,
    /// Overflow: the scale was divided by the factor (clamped to `min_scale`).
    Decreased,
    /// Overflow with the scale already at `min_scale` and no hysteresis left: the scale cannot
    /// go lower. DeepSpeed raises "Current loss scale already at minimum" here.
    AtMinimum,
    /// `scale_window` clean iterations: the scale was multiplied by the factor.
    Increased,
}

/// DeepSpeed's dynamic loss scaler: configuration and state (serialised into checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DynamicLossScaler {
    /// The current loss scale `S`.
    pub cur_scale: f64,
    /// Optimizer steps seen so far (skipped ones included).
    pub cur_iter: u64,
    /// The iteration of the last overflow; -1 before any.
    pub last_overflow_iter: i64,
    /// Overflows still tolerated before the scale is lowered (DeepSpeed's `cur_hysteresis`).
    pub cur_hysteresis: u32,
    /// Multiplier on a raise, divisor on a drop (DeepSpeed fixes it at 2).
    pub scale_factor: f64,
    /// Clean iterations between two raises (`loss_scale_window`).
    pub scale_window: u64,
    /// The scale never drops below this (`min_loss_scale`).
    pub min_scale: f64,
    /// The hysteresis a refill restores (`hysteresis`, DeepSpeed's `delayed_shift`).
    pub delayed_shift: u32,
    /// Refill the hysteresis after every clean iteration instead of at each raise.
    pub consecutive_hysteresis: bool,
}

impl DynamicLossScaler {
    /// A scaler as DeepSpeed builds it from an fp16 config: initial scale
    /// `2^initial_scale_power`, factor 2, no overflow yet, hysteresis full.
    pub fn new(
        initial_scale_power: i32,
        scale_window: u64,
        hysteresis: u32,
        min_scale: f64,
        consecutive_hysteresis: bool,
    ) -> Result<Self> {
        ensure!(
            scale_window >= 1,
            "loss_scale_window must be ≥ 1, got {scale_window}"
        );
        ensure!(hysteresis >= 1, "hysteresis must be ≥ 1, got {hysteresis}");
        ensure!(
            min_scale.is_finite() && min_scale > 0.0,
            "min_loss_scale must be a positive number, got {min_scale}"
        );
        let cur_scale = 2f64.powi(initial_scale_power);
        ensure!(
            cur_scale.is_finite() && cur_scale > 0.0,
            "initial_scale_power {initial_scale_power} gives no finite positive scale"
        );
        Ok(DynamicLossScaler {
            cur_scale,
            cur_iter: 0,
            last_overflow_iter: -1,
            cur_hysteresis: hysteresis,
            scale_factor: 2.0,
            scale_window,
            min_scale,
            delayed_shift: hysteresis,
            consecutive_hysteresis,
        })
    }

    /// The scale to seed the next backward pass with.
    pub fn scale(&self) -> f64 {
        self.cur_scale
    }

    /// Record the outcome of one optimizer step (`overflow`: its gradient had a NaN or Inf, so
    /// the step was skipped) and adapt the scale for the next one.
    pub fn update(&mut self, overflow: bool) -> ScaleUpdate {
        let what = if overflow {
            let what = if self.delayed_shift == 1 || self.cur_hysteresis == 1 {
                if self.cur_scale == self.min_scale {
                    ScaleUpdate::AtMinimum
                } else {
                    self.cur_scale = (self.cur_scale / self.scale_factor).max(self.min_scale);
                    ScaleUpdate::Decreased
                }
            } else {
                self.cur_hysteresis -= 1;
                ScaleUpdate::HysteresisUsed
            };
            self.last_overflow_iter = self.cur_iter as i64;
            what
        } else {
            if self.consecutive_hysteresis {
                self.cur_hysteresis = self.delayed_shift;
            }
            // Clean iterations since the last overflow, this one excluded (DeepSpeed's
            // `stable_interval`): the raise comes on the iteration after every full window.
            let stable = self.cur_iter as i64 - self.last_overflow_iter - 1;
            if stable > 0 && stable % self.scale_window as i64 == 0 {
                if !self.consecutive_hysteresis {
                    self.cur_hysteresis = self.delayed_shift;
                }
                self.cur_scale *= self.scale_factor;
                ScaleUpdate::Increased
            } else {
                ScaleUpdate::Unchanged
            }
        };
        self.cur_iter += 1;
        what
    }
}
