//! The learning-rate schedule: HF `get_cosine_schedule_with_warmup` (num_cycles 0.5), step for step.
//!
//! HF's `LambdaLR` multiplies the base LR by `lambda(k)` where `k` counts the scheduler steps taken
//! so far, and the Trainer steps the scheduler after each optimizer step: optimizer step `i`
//! (0-based) uses `lambda(i)`. With warmup > 0 the very first step therefore has LR 0.

/// Cosine decay to 0 after a linear warmup.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    /// The multiplier `lambda(step)` exactly as HF computes it (f64, same operation order).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / (self.warmup_steps.max(1)) as f64;
        }
        let progress = (step - self.warmup_steps) as f64
            / (self.total_steps.saturating_sub(self.warmup_steps).max(1)) as f64;
        let num_cycles = 0.5f64;
        (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
    }

    /// The LR of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}
