//! Gradient accumulation over the micro-batches of a step, in the canonical pairwise order that
//! makes the sum independent of the world size: [`GradAccumulator`] on the host (the reference),
//! [`DeviceAccumulator`] in backend buffers (what the trainer runs), bit-identical to it.

use crate::backend::{Backend, Role};
use anyhow::{Result, ensure};
use std::ops::Range;

/// Sums micro-batch gradients in the canonical pairwise order (a binary counter of partial sums:
/// after `k` pushes it holds one perfect subtree per set bit of `k`).
///
/// With a power-of-two number of micro-batches per rank, this rank's sum is a perfect subtree of
/// the canonical tree over the global micro-batch indices, and the reduce-scatter completes that
/// tree — the gradient is then bit-identical for every world size (see the module docs of
/// [`crate::distributed`]). A plain running `+=` sum works too, but only within rounding of that.
/// Memory: up to `⌊log2 A⌋ + 1` buffers of `n` floats for `A` pushes.
#[derive(Debug)]
pub struct GradAccumulator {
    n: usize,
    /// `levels[k]` holds the sum of a complete block of `2^k` micro-batches, if any.
    levels: Vec<Option<Vec<f32>>>,
    spare: Vec<Vec<f32>>,
    count: usize,
}

impl GradAccumulator {
    pub fn new(n: usize) -> Self {
        GradAccumulator {
            n,
            levels: Vec::new(),
            spare: Vec::new(),
            count: 0,
        }
    }

    /// Micro-batches pushed since the last `finish`.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Add one micro-batch's gradient (the next in global order).
    pub fn push(&mut self, grad: &[f32]) -> Result<()> {
        ensure!(
            grad.len() == self.n,
            "gradient accumulator holds {} elements, got a gradient of {}",
            self.n,
            grad.len()
        );
        let mut carry = self.spare.pop().unwrap_or_default();
        carry.clear();
        carry.extend_from_slice(grad);
        let mut k = 0;
        loop {
            if k == self.levels.len() {
                self.levels.push(None);
            }
            match self.levels[k].take() {
                None => {
                    self.levels[k] = Some(carry);
                    break;
                }
                Some(mut left) => {
                    // older (left) + newer (right)
                    for (l, r) in left.iter_mut().zip(&carry) {
                        *l += *r;
                    }
                    self.spare.push(carry);
                    carry = left;
                    k += 1;
                }
            }
        }
        self.count += 1;
        Ok(())
    }

    /// `out =` the sum of every pushed gradient (zeros if none); resets the accumulator.
    /// Partial subtrees combine as the canonical tree splits: `T_4 + (T_2 + T_1)` for 7 pushes.
    pub fn finish(&mut self, out: &mut [f32]) -> Result<()> {
        ensure!(
            out.len() == self.n,
            "gradient accumulator holds {} elements, output has {}",
            self.n,
            out.len()
        );
        let mut acc: Option<Vec<f32>> = None;
        for level in self.levels.iter_mut() {
            if let Some(mut left) = level.take() {
                if let Some(right) = acc.take() {
                    for (l, r) in left.iter_mut().zip(&right) {
                        *l += *r;
                    }
                    self.spare.push(right);
                }
                acc = Some(left);
            }
        }
        match acc {
            Some(v) => {
                out.copy_from_slice(&v);
                self.spare.push(v);
            }
            None => out.fill(0.0),
        }
        self.count = 0;
        Ok(())
    }
}

/// [`GradAccumulator`] in backend buffers ([`Role::Fp32`]): the same pairwise tree, each `+=`
/// done by [`Backend::axpy`] with `alpha = 1` (`1·x = x` exactly, so every addition is the same
/// IEEE sum as the host's), and one download per step at [`DeviceAccumulator::finish`]. The
/// sum is therefore bit-identical to the host accumulator's on any backend whose fp32 `axpy` is
/// `out + alpha·x` rounded once (fused or not: with `alpha = 1` both round `out + x`).
///
/// The backward writes straight into a buffer lent by [`DeviceAccumulator::take`] that then
/// moves into the tree, so no copy per micro-batch. Device memory: up to `⌊log2 A⌋ + 1`
/// buffers of `n` floats for `A` pushes (the host accumulator's count, now on the device).
pub struct DeviceAccumulator<B: Backend> {
    n: usize,
    /// `levels[k]` holds the sum of a complete block of `2^k` micro-batches, if any.
    levels: Vec<Option<B::Buf>>,
    spare: Vec<B::Buf>,
    count: usize,
}

/// A buffer in [`DeviceAccumulator`]'s plan: tree level `k`, or the last micro-batch's gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    Level(usize),
    Last,
}

/// Buffers a [`DeviceAccumulator`] holds at its peak for `a` micro-batches per step: the
/// completed tree levels before the last push (at most `⌊log2 (a−1)⌋ + 1` of them) plus the buffer
/// the last backward writes into, i.e. `⌊log2 a⌋ + 1` (`0` for `a = 0`).
pub fn accumulator_buffers(a: usize) -> usize {
    if a == 0 { 0 } else { a.ilog2() as usize + 1 }
}

impl<B: Backend> DeviceAccumulator<B> {
    pub fn new(n: usize) -> Self {
        DeviceAccumulator {
            n,
            levels: Vec::new(),
            spare: Vec::new(),
            count: 0,
        }
    }

    /// Micro-batches pushed since the last `finish`.
    pub fn count(&self) -> usize {
        self.count
    }

    /// A zeroed buffer of `n` floats to run the next micro-batch's backward (`+=`) into.
    pub fn take(&mut self, be: &B) -> Result<B::Buf> {
        match self.spare.pop() {
            Some(mut buf) => {
                be.zero(be.view_mut(&mut buf, 0..self.n));
                Ok(buf)
            }
            None => be.alloc(self.n, Role::Fp32),
        }
    }

    /// Add one micro-batch's gradient (the next in global order); the buffer moves in.
    pub fn push(&mut self, be: &B, grad: B::Buf) -> Result<()> {
        let all = 0..self.n;
        self.push_ranges(be, grad, std::slice::from_ref(&all))
    }

    /// [`DeviceAccumulator::push`] with the additions done on `ranges` of the buffers only.
    fn push_ranges(&mut self, be: &B, grad: B::Buf, ranges: &[Range<usize>]) -> Result<()> {
        let n = self.n;
        ensure!(
            be.buf_len(&grad) == n,
            "gradient accumulator holds {n} elements, got a gradient of {}",
            be.buf_len(&grad)
        );
        let mut carry = grad;
        let mut k = 0;
        loop {
            if k == self.levels.len() {
                self.levels.push(None);
            }
            match self.levels[k].take() {
                None => {
                    self.levels[k] = Some(carry);
                    break;
                }
                Some(mut left) => {
                    // older (left) + newer (right)
                    for r in ranges {
                        be.axpy(
                            be.view_mut(&mut left, r.clone()),
                            1.0,
                            be.view(&carry, r.clone()),
                        );
                    }
                    self.spare.push(carry);
                    carry = left;
                    k += 1;
                }
            }
        }
        self.count += 1;
        Ok(())
    }

    /// The sum of every pushed gradient (zeros if none) in a buffer of its own, which stays on
    /// the device; resets the accumulator. Partial subtrees combine as in
    /// [`GradAccumulator::finish`]. Hand the buffer back with [`DeviceAccumulator::recycle`].
    pub fn finish_buf(&mut self, be: &B) -> Result<B::Buf> {
        let all = 0..self.n;
        self.finish_buf_ranges(be, std::slice::from_ref(&all))
    }

    fn finish_buf_ranges(&mut self, be: &B, ranges: &[Range<usize>]) -> Result<B::Buf> {
        let mut acc: Option<B::Buf> = None;
        for level in self.levels.iter_mut() {
            if let Some(mut left) = level.take() {
                if let Some(right) = acc.take() {
                    for r in ranges {
                        be.axpy(
                            be.view_mut(&mut left, r.clone()),
                            1.0,
                            be.view(&right, r.clone()),
                        );
                    }
                    self.spare.push(right);
                }
                acc = Some(left);
            }
        }
        self.count = 0;
        match acc {
            Some(v) => Ok(v),
            None => self.take(be),
        }
    }

    /// Return a buffer from [`DeviceAccumulator::finish_buf`] for reuse.
    pub fn recycle(&mut self, buf: B::Buf) {
        self.spare.push(buf);
    }

    /// The additions `dst += src` that pushing one more gradient (`Slot::Last`) and finishing
    /// perform, in order, and the slot holding the sum afterwards: the same binary-counter walk
    /// as [`DeviceAccumulator::push`] then [`DeviceAccumulator::finish_buf`], without moving
    /// buffers. `dst` is never `Slot::Last`.
    fn last_plan(&self) -> (Vec<(Slot, Slot)>, Slot) {
        let c = self.count;
        let mut ops = Vec::new();
        let mut carry = Slot::Last;
        let mut k = 0;
        while (c >> k) & 1 == 1 {
            ops.push((Slot::Level(k), carry));
            carry = Slot::Level(k);
            k += 1;
        }
        // After the push: the bits of c + 1, level k holding `carry`.
        let mut acc: Option<Slot> = None;
        let after = c + 1;
        for j in 0..usize::BITS as usize {
            if (after >> j) & 1 == 0 {
                continue;
            }
            let slot = if j == k { carry } else { Slot::Level(j) };
            if let Some(a) = acc {
                ops.push((slot, a));
            }
            acc = Some(slot);
        }
        (ops, acc.expect("c + 1 > 0 has a set bit"))
    }

    /// Overlap: the final sum on `range` for a step whose last micro-batch's gradient is being
    /// written into `last` (not pushed yet), computed now and on `range` only, by the very
    /// additions [`DeviceAccumulator::push_last`] then skips there. Call once the backward will
    /// not change `range` of `last` again; [`DeviceAccumulator::final_buf`] then holds the
    /// step's sum on `range`.
    pub fn finish_range(&mut self, be: &B, last: &B::Buf, range: Range<usize>) -> Result<()> {
        ensure!(
            range.start <= range.end && range.end <= self.n && be.buf_len(last) == self.n,
            "gradient accumulator holds {} elements, got range {range:?} of a gradient of {}",
            self.n,
            be.buf_len(last)
        );
        let (ops, _) = self.last_plan();
        for (dst, src) in ops {
            let Slot::Level(d) = dst else {
                unreachable!("the plan never adds into the last gradient")
            };
            let mut dbuf = self.levels[d]
                .take()
                .expect("the plan follows the occupied levels");
            {
                let sbuf = match src {
                    Slot::Last => last,
                    Slot::Level(j) => self.levels[j].as_ref().expect("an occupied level"),
                };
                be.axpy(
                    be.view_mut(&mut dbuf, range.clone()),
                    1.0,
                    be.view(sbuf, range.clone()),
                );
            }
            self.levels[d] = Some(dbuf);
        }
        Ok(())
    }

    /// The buffer that holds the step's sum once `last` is pushed (see
    /// [`DeviceAccumulator::finish_range`]).
    pub fn final_buf<'s>(&'s self, last: &'s B::Buf) -> &'s B::Buf {
        match self.last_plan().1 {
            Slot::Last => last,
            Slot::Level(j) => self.levels[j].as_ref().expect("an occupied level"),
        }
    }

    /// Push the step's last gradient and finish ([`DeviceAccumulator::push`] then
    /// [`DeviceAccumulator::finish_buf`]), adding only outside `done` (sorted, disjoint ranges
    /// already summed by [`DeviceAccumulator::finish_range`]). The sum is bit-identical to
    /// push + finish: every element gets the same additions in the same order, once.
    pub fn push_last(&mut self, be: &B, last: B::Buf, done: &[Range<usize>]) -> Result<B::Buf> {
        let mut rest = Vec::new();
        let mut at = 0;
        for r in done {
            if r.start > at {
                rest.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < self.n {
            rest.push(at..self.n);
        }
        self.push_ranges(be, last, &rest)?;
        self.finish_buf_ranges(be, &rest)
    }

    /// `out =` the sum of every pushed gradient (zeros if none), downloaded once; resets the
    /// accumulator. Partial subtrees combine as in [`GradAccumulator::finish`].
    pub fn finish(&mut self, be: &B, out: &mut [f32]) -> Result<()> {
        let n = self.n;
        ensure!(
            out.len() == n,
            "gradient accumulator holds {n} elements, output has {}",
            out.len()
        );
        let mut acc: Option<B::Buf> = None;
        for level in self.levels.iter_mut() {
            if let Some(mut left) = level.take() {
                if let Some(right) = acc.take() {
                    be.axpy(be.view_mut(&mut left, 0..n), 1.0, be.view(&right, 0..n));
                    self.spare.push(right);
                }
                acc = Some(left);
            }
        }
        match acc {
            Some(v) => {
                be.download(&v, out)?;
                self.spare.push(v);
            }
            None => out.fill(0.0),
        }
        self.count = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// The dry-run's device-memory count of the accumulator equals the buffers a real step
    /// allocates (all of them are back in `spare` after `finish`, and reused by the next step).
    #[test]
    fn accumulator_buffers_matches_what_a_step_allocates() {
        let be = CpuBackend::new();
        for a in 0..40usize {
            let mut acc = DeviceAccumulator::<CpuBackend>::new(3);
            let mut out = [0.0f32; 3];
            for _step in 0..2 {
                for _ in 0..a {
                    let g = acc.take(&be).unwrap();
                    acc.push(&be, g).unwrap();
                }
                acc.finish(&be, &mut out).unwrap();
                assert_eq!(acc.spare.len(), accumulator_buffers(a), "a = {a}");
            }
        }
    }
}
