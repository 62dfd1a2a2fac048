//! ZeRO-2 on backend buffers: the optimizer step of [`super::Zero2`] with every vector in the
//! backend's memory, so that in a plain step only scalars cross host↔device (the tree-node sums
//! of squares of the global norm, one `f64` each).
//!
//! The state (fp32 master weights, AdamW `m`, `v`, the reduced gradient) is this rank's shard of
//! the flat trainable buffer, `⌈P/N⌉` elements each, in [`Role::Fp32`] buffers. One step:
//! bucketed reduce-scatter of the summed gradient ([`BufComm`]: the transport's own collectives
//! on host-memory buffers, NCCL's on CUDA), `× grad_scale` ([`Backend::scale`]), the global norm
//! (the same tree of slots as [`super::zero::global_sum_squares`], each node from
//! [`Backend::sum_squares_tree`]), the non-finite skip, torch's clipping, AdamW on the shard
//! writing the weights' storage type in the same pass ([`Backend::adamw_step_copy`]), and the
//! bucketed all-gather into the replicated weights. Every operation is the one the host
//! [`super::Zero2`] does on the same values, element for element, so on the CPU backend the two
//! give the same bits (and so worlds 1, 2, 3 stay bit-identical).
//!
//! Overlap ([`DeviceZero2::grads_ready`]): a chunk is reduce-scattered as soon as every element
//! it gathers is final, exactly as [`super::Zero2::grads_ready`]; see docs/DESIGN-NOTES.md for the
//! layout's limit.
//!
//! Checkpoints are [`super::Zero2`]'s files: [`DeviceZero2::to_host`] downloads the shard to save
//! it, [`DeviceZero2::from_host`] uploads a loaded one (any saved world size).

use super::Comm;
use super::device::BufComm;
use super::shard::ShardLayout;
use super::zero::{StepReport, Zero2, global_sum_squares_with};
use crate::backend::{AdamW, Backend, Role};
use anyhow::{Result, ensure};
use std::ops::Range;

/// ZeRO-2 state of one rank in backend buffers (see the module docs).
pub struct DeviceZero2<B: Backend> {
    rank: usize,
    layout: ShardLayout,
    bucket_elems: usize,
    /// Elements per rank per collective call: `⌈bucket_elems / N⌉`, at most `⌈P/N⌉`, at least 1.
    chunk: usize,
    master: B::Buf,
    m: B::Buf,
    v: B::Buf,
    /// The reduced gradient shard (world > 1; at world 1 the summed gradient is the shard).
    grad: Option<B::Buf>,
    /// A bucket of the summed gradient in reduce-scatter order (world > 1).
    pack: Option<B::Buf>,
    /// The updated shard in the weights' storage type, the all-gather's input (world > 1).
    copy: Option<B::Buf>,
    /// A bucket of gathered weights (world > 1).
    gather: Option<B::Buf>,
    has_master: bool,
    updates: u64,
    chunk_done: Vec<bool>,
    ready: Vec<Range<usize>>,
}

impl<B: Backend> DeviceZero2<B> {
    /// Empty state for rank `rank` of `world` over `n_params` trainable parameters; the master
    /// weights are taken from the weights at the first step. `bucket_elems`: elements per
    /// reduce-scatter / all-gather call, all ranks together (DeepSpeed's `reduce_bucket_size`).
    pub fn new(
        be: &B,
        rank: usize,
        world: usize,
        n_params: usize,
        bucket_elems: usize,
    ) -> Result<Self> {
        ensure!(
            rank < world,
            "rank {rank} is not a rank of a world of {world}"
        );
        ensure!(bucket_elems > 0, "the reduce bucket size must be positive");
        let layout = ShardLayout::new(n_params, world);
        let s = layout.shard_elems;
        let chunk = bucket_elems.div_ceil(world).clamp(1, s.max(1));
        let multi = |len: usize, role: Role| -> Result<Option<B::Buf>> {
            if world > 1 {
                Ok(Some(be.alloc(len, role)?))
            } else {
                Ok(None)
            }
        };
        Ok(DeviceZero2 {
            rank,
            layout,
            bucket_elems,
            chunk,
            master: be.alloc(s, Role::Fp32)?,
            m: be.alloc(s, Role::Fp32)?,
            v: be.alloc(s, Role::Fp32)?,
            grad: multi(s, Role::Fp32)?,
            pack: multi(chunk * world, Role::Fp32)?,
            copy: multi(s, Role::Weight)?,
            gather: multi(chunk * world, Role::Weight)?,
            has_master: false,
            updates: 0,
            chunk_done: vec![false; s.div_ceil(chunk)],
            ready: Vec::new(),
        })
    }

    /// The device twin of a host state (from [`Zero2::load`]): uploads master, `m`, `v`.
    pub fn from_host(be: &B, z: &Zero2, bucket_elems: usize) -> Result<Self> {
        let layout = z.layout();
        let rank = z.shard_rank();
        let mut d = DeviceZero2::new(be, rank, layout.world, layout.n_params, bucket_elems)?;
        let (master, m, v, updates, has_master) = z.parts();
        be.upload(&mut d.master, master)?;
        be.upload(&mut d.m, m)?;
        be.upload(&mut d.v, v)?;
        d.updates = updates;
        d.has_master = has_master;
        Ok(d)
    }

    /// A host copy of the state, for [`Zero2::save_checkpoint`] and friends (downloads the shard).
    pub fn to_host(&self, be: &B) -> Result<Zero2> {
        let s = self.layout.shard_elems;
        let mut bufs = [vec![0f32; s], vec![0f32; s], vec![0f32; s]];
        for (h, d) in bufs.iter_mut().zip([&self.master, &self.m, &self.v]) {
            be.download(d, h)?;
        }
        ensure!(
            self.has_master,
            "ZeRO-2 has no master weights yet (neither stepped nor loaded): nothing to save"
        );
        Zero2::from_parts(
            self.rank,
            self.layout.world,
            self.layout.n_params,
            self.bucket_elems,
            bufs,
            self.updates,
        )
    }

    /// This rank's slice of the flat trainable buffer.
    pub fn shard_range(&self) -> Range<usize> {
        self.layout.range(self.rank)
    }

    pub fn layout(&self) -> ShardLayout {
        self.layout
    }

    /// Collective calls per reduce-scatter (or all-gather) of the whole gradient.
    pub fn chunks(&self) -> usize {
        self.chunk_done.len()
    }

    /// Optimizer updates applied so far (skipped steps excluded).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    fn check(&self, comm: &dyn Comm, be: &B, params: &B::Buf, grads: &B::Buf) -> Result<()> {
        let p = self.layout.n_params;
        ensure!(
            be.buf_len(params) == p && be.buf_len(grads) == p,
            "ZeRO-2 over {p} parameters got weights of {} and gradients of {}",
            be.buf_len(params),
            be.buf_len(grads)
        );
        ensure!(
            comm.rank() == self.rank && comm.world_size() == self.layout.world,
            "ZeRO-2 state is for rank {} of {}, the communicator is rank {} of {}",
            self.rank,
            self.layout.world,
            comm.rank(),
            comm.world_size()
        );
        Ok(())
    }

    /// One optimizer step, as [`Zero2::step`] on backend buffers. `grads`: this rank's summed
    /// gradient (len `P`; at world 1 it is scaled in place, so its content is spent); `params`:
    /// the replicated weights (len `P`, any storage type), which receive every rank's updated
    /// shard unless the step is skipped. `poison`: a NaN or Inf from this rank (a non-finite
    /// loss, an injected overflow) that makes the global norm non-finite on every rank, so the
    /// step is skipped everywhere; `None` adds an exact zero (see
    /// [`global_sum_squares_with`]).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        comm: &dyn Comm,
        be: &B,
        params: &mut B::Buf,
        grads: &mut B::Buf,
        grad_scale: f32,
        max_norm: Option<f32>,
        hp: AdamW,
        poison: Option<f32>,
    ) -> Result<StepReport> {
        self.check(comm, be, params, grads)?;
        ensure!(hp.step >= 1, "AdamW step is 1-based, got {}", hp.step);
        let sent0 = comm.bytes_sent();
        let bc = BufComm::new(comm);
        let range = self.shard_range();
        let valid = range.len();
        let world = self.layout.world;
        if !self.has_master {
            be.copy(
                be.view_mut(&mut self.master, 0..valid),
                be.view(params, range.clone()),
            );
            self.has_master = true;
        }
        if world > 1 {
            for k in 0..self.chunk_done.len() {
                if !self.chunk_done[k] {
                    self.reduce_chunk(bc, be, grads, k)?;
                }
            }
            bc.join(be)?;
        }
        self.chunk_done.fill(false);
        self.ready.clear();
        let g: &mut B::Buf = match self.grad.as_mut() {
            Some(g) => g,
            None => grads,
        };
        be.scale(be.view_mut(g, 0..valid), grad_scale);
        let sum_sq = global_sum_squares_with(
            comm,
            &self.layout,
            self.rank,
            |lo, hi| be.sum_squares_tree(be.view(g, lo..hi)),
            Some(poison.map_or(0.0, |x| x as f64)),
        )?;
        let norm = sum_sq.sqrt();
        if !norm.is_finite() {
            return Ok(StepReport {
                grad_norm: norm,
                skipped: true,
                bytes_communicated: comm.bytes_sent() - sent0,
            });
        }
        if let Some(max_norm) = max_norm {
            // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1, always applied.
            let coef = (max_norm / (norm as f32 + 1e-6)).min(1.0);
            be.scale(be.view_mut(g, 0..valid), coef);
        }
        let target = match self.copy.as_mut() {
            Some(c) => be.view_mut(c, 0..valid),
            None => be.view_mut(params, 0..valid),
        };
        be.adamw_step_copy(
            be.view_mut(&mut self.master, 0..valid),
            be.view_mut(&mut self.m, 0..valid),
            be.view_mut(&mut self.v, 0..valid),
            be.view(g, 0..valid),
            target,
            hp,
        );
        self.updates += 1;
        if world > 1 {
            self.all_gather_copy(bc, be, params)?;
        }
        Ok(StepReport {
            grad_norm: norm,
            skipped: false,
            bytes_communicated: comm.bytes_sent() - sent0,
        })
    }

    /// `params =` every rank's master shard in the weights' storage type (after a load, before
    /// the first forward).
    pub fn gather_params(&mut self, comm: &dyn Comm, be: &B, params: &mut B::Buf) -> Result<()> {
        ensure!(
            self.has_master,
            "ZeRO-2 has no master weights yet (neither stepped nor loaded)"
        );
        let p = self.layout.n_params;
        ensure!(
            be.buf_len(params) == p,
            "ZeRO-2 over {p} parameters got weights of {}",
            be.buf_len(params)
        );
        let valid = self.shard_range().len();
        match self.copy.as_mut() {
            None => be.copy(
                be.view_mut(params, 0..valid),
                be.view(&self.master, 0..valid),
            ),
            Some(c) => {
                be.copy(be.view_mut(c, 0..valid), be.view(&self.master, 0..valid));
                self.all_gather_copy(BufComm::new(comm), be, params)?;
            }
        }
        Ok(())
    }

    /// Reduce-scatter chunk `k` (offset `k·chunk` of every rank's shard) of `grads` into this
    /// rank's gradient shard: pack the `N` pieces into one bucket, one collective call.
    fn reduce_chunk(&mut self, bc: BufComm<'_>, be: &B, grads: &B::Buf, k: usize) -> Result<()> {
        let (s, w, p) = (
            self.layout.shard_elems,
            self.layout.world,
            self.layout.n_params,
        );
        let off = k * self.chunk;
        let len = self.chunk.min(s - off);
        let pack = self.pack.as_mut().expect("world > 1 has a pack buffer");
        let grad = self.grad.as_mut().expect("world > 1 has a gradient shard");
        // The pack buffer may still be read by the previous chunk's queued collective.
        bc.join(be)?;
        for r in 0..w {
            let lo = (r * s + off).min(p);
            let hi = (r * s + off + len).min(p);
            let at = r * len;
            if hi > lo {
                be.copy(
                    be.view_mut(pack, at..at + (hi - lo)),
                    be.view(grads, lo..hi),
                );
            }
            if hi - lo < len {
                be.zero(be.view_mut(pack, at + (hi - lo)..at + len));
            }
        }
        bc.reduce_scatter_sum(be, pack, 0..len * w, grad, off..off + len)?;
        self.chunk_done[k] = true;
        Ok(())
    }

    /// `params =` the concatenation of every rank's `copy` shard, one bucket at a time.
    fn all_gather_copy(&mut self, bc: BufComm<'_>, be: &B, params: &mut B::Buf) -> Result<()> {
        let (s, w, p) = (
            self.layout.shard_elems,
            self.layout.world,
            self.layout.n_params,
        );
        let copy = self.copy.as_ref().expect("world > 1 has a copy buffer");
        let gather = self.gather.as_mut().expect("world > 1 has a gather buffer");
        let mut off = 0;
        while off < s {
            let len = self.chunk.min(s - off);
            bc.all_gather(be, copy, off..off + len, gather, 0..len * w)?;
            bc.join(be)?;
            for r in 0..w {
                let lo = (r * s + off).min(p);
                let hi = (r * s + off + len).min(p);
                if hi > lo {
                    be.copy(
                        be.view_mut(params, lo..hi),
                        be.view(gather, r * len..r * len + (hi - lo)),
                    );
                }
            }
            off += len;
        }
        Ok(())
    }

    /// Overlap of the reduce-scatter with the backward, as [`Zero2::grads_ready`]: mark `range` of
    /// this step's summed gradient `grads` final and reduce-scatter every chunk whose elements are
    /// now all final; the step reduces only the rest. Every rank marks the same ranges in the same
    /// order. Returns the chunks reduced. A no-op at world 1 (nothing to communicate).
    pub fn grads_ready(
        &mut self,
        comm: &dyn Comm,
        be: &B,
        grads: &B::Buf,
        range: Range<usize>,
    ) -> Result<usize> {
        let p = self.layout.n_params;
        ensure!(
            be.buf_len(grads) == p && range.start <= range.end && range.end <= p,
            "ZeRO-2 over {p} parameters: ready range {range:?}, gradients of {}",
            be.buf_len(grads)
        );
        if self.layout.world == 1 {
            return Ok(0);
        }
        if !range.is_empty() {
            self.ready.push(range);
            self.ready.sort_by_key(|r| r.start);
            let mut merged: Vec<Range<usize>> = Vec::with_capacity(self.ready.len());
            for r in self.ready.drain(..) {
                match merged.last_mut() {
                    Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
                    _ => merged.push(r),
                }
            }
            self.ready = merged;
        }
        let (s, w) = (self.layout.shard_elems, self.layout.world);
        let bc = BufComm::new(comm);
        let mut fired = 0;
        for k in 0..self.chunk_done.len() {
            if self.chunk_done[k] {
                continue;
            }
            let off = k * self.chunk;
            let len = self.chunk.min(s - off);
            let all_final = (0..w).all(|r| {
                let lo = (r * s + off).min(p);
                let hi = (r * s + off + len).min(p);
                lo == hi || is_ready(&self.ready, lo..hi)
            });
            if all_final {
                self.reduce_chunk(bc, be, grads, k)?;
                fired += 1;
            }
        }
        Ok(fired)
    }
}

/// Whether `r` (non-empty) lies inside one of the sorted, merged ranges `ready`.
fn is_ready(ready: &[Range<usize>], r: Range<usize>) -> bool {
    let i = ready.partition_point(|x| x.start <= r.start);
    i > 0 && ready[i - 1].end >= r.end
}
