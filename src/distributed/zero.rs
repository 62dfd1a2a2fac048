//! ZeRO-2 over a flat trainable buffer: bucketed reduce-scatter of the gradients, a global
//! gradient norm, clipping, AdamW on this rank's shard only (fp32 master, `m`, `v`), all-gather of
//! the updated shard. Checkpoints: one atomic file per rank, the manifest written last by rank 0.

use super::Comm;
/// The step's accumulators, also named from here.
pub use super::accumulate::{DeviceAccumulator, GradAccumulator, accumulator_buffers};
use super::collective::tree_split;
use super::shard::ShardLayout;
use crate::backend::AdamW;
use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What one [`Zero2::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the averaged gradient, before clipping (non-finite when skipped).
    pub grad_norm: f64,
    /// The gradient had a NaN or Inf somewhere: nothing was updated on any rank.
    pub skipped: bool,
    /// Bytes this rank sent during the step ([`Comm::bytes_sent`] difference).
    pub bytes_communicated: u64,
}

/// ZeRO-2 state of one rank: the fp32 master weights, AdamW `m` and `v` and the reduced gradient,
/// each `⌈P/N⌉` elements, for this rank's shard of the flat trainable buffer.
pub struct Zero2 {
    rank: usize,
    layout: ShardLayout,
    /// Elements per rank per collective call: `⌈bucket_elems / N⌉`, at most `⌈P/N⌉`, at least 1.
    chunk: usize,
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    grad: Vec<f32>,
    scratch: Vec<f32>,
    /// Whether `master` holds the weights (after the first step or a load).
    has_master: bool,
    /// Optimizer updates applied so far (skipped steps excluded).
    updates: u64,
    /// Overlap: chunks already reduce-scattered this step ([`Zero2::grads_ready`]).
    chunk_done: Vec<bool>,
    /// Overlap: flat ranges marked final this step, sorted and merged.
    ready: Vec<Range<usize>>,
}

/// Shard file layout (little endian): magic, version u32, rank u32, world u32, reserved u32,
/// n_params u64, start u64, len u64, updates u64, then master, m, v (`len` f32 each), then the
/// SHA-256 of everything before it.
const SHARD_MAGIC: &[u8; 8] = b"ZHZ2SHRD";
const SHARD_VERSION: u32 = 1;
const SHARD_HEADER: usize = 8 + 4 * 4 + 8 * 4;
/// Written by rank 0 after every shard is on disk and verified; a checkpoint without it is
/// incomplete.
pub const MANIFEST_NAME: &str = "zero2.json";
const MANIFEST_FORMAT: &str = "zhllama-zero2";

/// The name of rank `rank`'s shard file in a world of `world`.
pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("zero2-rank{rank:05}-of{world:05}.bin")
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Manifest {
    format: String,
    version: u32,
    world_size: usize,
    n_params: usize,
    updates: u64,
    shards: Vec<ManifestShard>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct ManifestShard {
    rank: usize,
    file: String,
    start: usize,
    len: usize,
    sha256: String,
}

impl Zero2 {
    /// Empty state for rank `comm_rank` of `world` over `n_params` trainable parameters. The
    /// master weights are taken from `params` at the first [`Zero2::step`] (they are identical on
    /// every rank then). `bucket_elems`: elements per reduce-scatter / all-gather call, all ranks
    /// together (the recipe's DeepSpeed bucket is 1e8).
    pub fn new(comm_rank: usize, world: usize, n_params: usize, bucket_elems: usize) -> Self {
        assert!(
            comm_rank < world,
            "rank {comm_rank} is not a rank of a world of {world}"
        );
        let layout = ShardLayout::new(n_params, world);
        let s = layout.shard_elems;
        let chunk = bucket_elems.div_ceil(world).clamp(1, s.max(1));
        Zero2 {
            rank: comm_rank,
            layout,
            chunk,
            master: vec![0.0; s],
            m: vec![0.0; s],
            v: vec![0.0; s],
            grad: vec![0.0; s],
            scratch: vec![0.0; chunk * world],
            has_master: false,
            updates: 0,
            chunk_done: vec![false; s.div_ceil(chunk)],
            ready: Vec::new(),
        }
    }

    /// This rank's slice of the flat trainable buffer.
    pub fn shard_range(&self) -> Range<usize> {
        self.layout.range(self.rank)
    }

    /// The rank this state belongs to.
    pub fn shard_rank(&self) -> usize {
        self.rank
    }

    pub fn layout(&self) -> ShardLayout {
        self.layout
    }

    /// Collective calls per reduce-scatter (or all-gather) of the whole gradient: `⌈⌈P/N⌉ / chunk⌉`.
    pub fn chunks(&self) -> usize {
        self.chunk_done.len()
    }

    /// The lengths of the buffers actually allocated: `(master, m, v, reduced gradient)`.
    pub fn state_lens(&self) -> (usize, usize, usize, usize) {
        (
            self.master.len(),
            self.m.len(),
            self.v.len(),
            self.grad.len(),
        )
    }

    /// Optimizer updates applied so far (steps skipped for non-finite gradients excluded); the
    /// 1-based AdamW step of the next update is `updates() + 1`.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// One optimizer step. `grads`: this rank's gradient summed over its micro-batches (len `P`,
    /// read only). The averaged gradient is `grad_scale · Σ_ranks grads`; its global norm is
    /// returned; a non-finite norm skips the step on every rank (nothing updated); else the
    /// gradient is clipped to `max_norm` (as `torch.nn.utils.clip_grad_norm_`), AdamW updates the
    /// shard, and `params` (len `P`, replicated) receives every rank's updated shard.
    pub fn step(
        &mut self,
        comm: &dyn Comm,
        params: &mut [f32],
        grads: &mut [f32],
        grad_scale: f32,
        max_norm: Option<f32>,
        hp: AdamW,
    ) -> Result<StepReport> {
        let p = self.layout.n_params;
        ensure!(
            params.len() == p && grads.len() == p,
            "ZeRO-2 over {p} parameters got params of {} and grads of {}",
            params.len(),
            grads.len()
        );
        self.check_comm(comm)?;
        ensure!(hp.step >= 1, "AdamW step is 1-based, got {}", hp.step);
        let sent0 = comm.bytes_sent();
        let range = self.shard_range();
        let valid = range.len();
        if !self.has_master {
            self.master[..valid].copy_from_slice(&params[range.clone()]);
            self.has_master = true;
        }

        // Chunks not already reduced by `grads_ready` (all of them without overlap).
        for k in 0..self.chunk_done.len() {
            if !self.chunk_done[k] {
                self.reduce_chunk(comm, grads, k)?;
            }
        }
        self.chunk_done.fill(false);
        self.ready.clear();
        for g in &mut self.grad[..valid] {
            *g *= grad_scale;
        }
        let sum_sq = global_sum_squares(comm, &self.layout, self.rank, &self.grad[..valid])?;
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
            for g in &mut self.grad[..valid] {
                *g *= coef;
            }
        }
        crate::ops::adamw_step(
            &mut self.master[..valid],
            &mut self.m[..valid],
            &mut self.v[..valid],
            &self.grad[..valid],
            hp,
        );
        self.updates += 1;
        self.all_gather_master(comm, params)?;
        Ok(StepReport {
            grad_norm: norm,
            skipped: false,
            bytes_communicated: comm.bytes_sent() - sent0,
        })
    }

    /// The state's buffers `(master, m, v)` (each `⌈P/N⌉`, zero past the shard's valid length),
    /// the update count, and whether `master` holds weights yet: what a device-resident twin
    /// ([`super::DeviceZero2`]) uploads after a [`Zero2::load`].
    pub fn parts(&self) -> (&[f32], &[f32], &[f32], u64, bool) {
        (
            &self.master,
            &self.m,
            &self.v,
            self.updates,
            self.has_master,
        )
    }

    /// A state holding `[master, m, v]` (each `⌈P/N⌉` long) after `updates` updates: what a
    /// device-resident twin downloads to save a checkpoint in this module's format.
    pub fn from_parts(
        rank: usize,
        world: usize,
        n_params: usize,
        bucket_elems: usize,
        [master, m, v]: [Vec<f32>; 3],
        updates: u64,
    ) -> Result<Self> {
        let mut z = Zero2::new(rank, world, n_params, bucket_elems);
        let s = z.layout.shard_elems;
        ensure!(
            master.len() == s && m.len() == s && v.len() == s,
            "ZeRO-2 shard of {s} elements given buffers of {}, {}, {}",
            master.len(),
            m.len(),
            v.len()
        );
        (z.master, z.m, z.v, z.updates, z.has_master) = (master, m, v, updates, true);
        Ok(z)
    }

    /// `params =` every rank's master shard (after [`Zero2::load`], before the first forward).
    pub fn gather_params(&mut self, comm: &dyn Comm, params: &mut [f32]) -> Result<()> {
        ensure!(
            self.has_master,
            "ZeRO-2 has no master weights yet (neither stepped nor loaded)"
        );
        ensure!(
            params.len() == self.layout.n_params,
            "ZeRO-2 over {} parameters got params of {}",
            self.layout.n_params,
            params.len()
        );
        self.check_comm(comm)?;
        self.all_gather_master(comm, params)
    }

    fn check_comm(&self, comm: &dyn Comm) -> Result<()> {
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

    /// `self.grad[chunk k] =` this rank's part of chunk `k` of `Σ_ranks grads`. Chunk `k` is
    /// offsets `[k·chunk, (k+1)·chunk)` of every rank's shard (one collective call).
    fn reduce_chunk(&mut self, comm: &dyn Comm, grads: &[f32], k: usize) -> Result<()> {
        let (s, w, p) = (
            self.layout.shard_elems,
            self.layout.world,
            self.layout.n_params,
        );
        let off = k * self.chunk;
        let len = self.chunk.min(s - off);
        let send = &mut self.scratch[..len * w];
        for r in 0..w {
            let dst = &mut send[r * len..(r + 1) * len];
            let lo = (r * s + off).min(p);
            let hi = (r * s + off + len).min(p);
            dst[..hi - lo].copy_from_slice(&grads[lo..hi]);
            dst[hi - lo..].fill(0.0);
        }
        comm.reduce_scatter_sum(send, &mut self.grad[off..off + len])?;
        self.chunk_done[k] = true;
        Ok(())
    }

    /// Overlap of the gradient reduce-scatter with the backward pass: mark `range` of the flat
    /// gradient final for this step (the backward will not change it again), and reduce-scatter
    /// now every chunk whose elements are all final. The next [`Zero2::step`] reduces only the
    /// chunks still pending, so the step is bit-identical to one without overlap (each chunk's
    /// reduction is independent of when it runs). Call it on the last micro-batch of a step, with
    /// `grads` holding this rank's final sums on every range marked so far. Every rank must mark the
    /// same ranges in the same order (the collectives must match); returns the chunks reduced.
    ///
    /// Chunk `k` holds offset `k·chunk` of *every* rank's shard, so with the contiguous shard layout
    /// it is final only once the backward reaches that offset in rank 0's shard (the first `1/N` of
    /// the flat buffer): chunks start flowing in the last `~1/N` of a backward that runs from the
    /// last layer to the first. Overlapping the whole backward needs per-layer sharding (each
    /// layer's range split over the ranks), which changes the checkpoint format; see docs/DESIGN-NOTES.md.
    pub fn grads_ready(
        &mut self,
        comm: &dyn Comm,
        grads: &[f32],
        range: Range<usize>,
    ) -> Result<usize> {
        let p = self.layout.n_params;
        ensure!(
            grads.len() == p && range.start <= range.end && range.end <= p,
            "ZeRO-2 over {p} parameters: ready range {range:?}, grads of {}",
            grads.len()
        );
        self.check_comm(comm)?;
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
                lo == hi || self.is_ready(lo..hi)
            });
            if all_final {
                self.reduce_chunk(comm, grads, k)?;
                fired += 1;
            }
        }
        Ok(fired)
    }

    /// Whether `r` (non-empty) lies inside one merged ready range.
    fn is_ready(&self, r: Range<usize>) -> bool {
        let i = self.ready.partition_point(|x| x.start <= r.start);
        i > 0 && self.ready[i - 1].end >= r.end
    }

    /// `params =` the concatenation of every rank's master shard, one bucket at a time.
    fn all_gather_master(&mut self, comm: &dyn Comm, params: &mut [f32]) -> Result<()> {
        let (s, w, p) = (
            self.layout.shard_elems,
            self.layout.world,
            self.layout.n_params,
        );
        let mut off = 0;
        while off < s {
            let len = self.chunk.min(s - off);
            let recv = &mut self.scratch[..len * w];
            comm.all_gather(&self.master[off..off + len], recv)?;
            for r in 0..w {
                let lo = (r * s + off).min(p);
                let hi = (r * s + off + len).min(p);
                params[lo..hi].copy_from_slice(&recv[r * len..r * len + (hi - lo)]);
            }
            off += len;
        }
        Ok(())
    }

    /// This rank's shard file in `dir` (written atomically).
    pub fn save_shard(&self, dir: &Path) -> Result<()> {
        ensure!(
            self.has_master,
            "ZeRO-2 has no master weights yet (neither stepped nor loaded): nothing to save"
        );
        let range = self.shard_range();
        let valid = range.len();
        let mut b = Vec::with_capacity(SHARD_HEADER + 12 * valid + 32);
        b.extend_from_slice(SHARD_MAGIC);
        for x in [SHARD_VERSION, self.rank as u32, self.layout.world as u32, 0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        for x in [
            self.layout.n_params as u64,
            range.start as u64,
            valid as u64,
            self.updates,
        ] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        for buf in [&self.master, &self.m, &self.v] {
            for x in &buf[..valid] {
                b.extend_from_slice(&x.to_le_bytes());
            }
        }
        let digest = Sha256::digest(&b);
        b.extend_from_slice(&digest);
        let path = dir.join(shard_file_name(self.rank, self.layout.world));
        crate::util::write_atomic(&path, &b)
            .with_context(|| format!("cannot save ZeRO-2 shard {}", path.display()))
    }

    /// Every rank writes its shard into `dir`; after a barrier rank 0 re-reads and verifies every
    /// shard and writes the manifest [`MANIFEST_NAME`] last; a final barrier. A crash at any
    /// point leaves either no manifest (the checkpoint is incomplete, and [`Zero2::load`] says
    /// so) or a whole checkpoint. See [`Zero2::save_checkpoint`] for a whole directory.
    pub fn save(&self, comm: &dyn Comm, dir: &Path) -> Result<()> {
        self.check_comm(comm)?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
        self.save_shard(dir)?;
        comm.barrier()?;
        if self.rank == 0 {
            self.write_manifest(dir)?;
        }
        comm.barrier()
    }

    /// A whole checkpoint directory `dir`, atomically: every rank writes its shard into the
    /// sibling `<dir>.tmp`; after a barrier rank 0 verifies the shards, writes the manifest, calls
    /// `extra(tmp)` for the loop's own files (weights, loop state), then renames `<dir>.tmp` to
    /// `dir`; a final barrier. A crash at any point leaves `dir` absent or whole (an existing
    /// `dir` of the same name is replaced only at the rename). `extra` runs on rank 0 only.
    pub fn save_checkpoint(
        &self,
        comm: &dyn Comm,
        dir: &Path,
        extra: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        self.check_comm(comm)?;
        let tmp = tmp_dir(dir);
        if self.rank == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)
                    .with_context(|| format!("cannot remove stale checkpoint {}", tmp.display()))?;
            }
            std::fs::create_dir_all(&tmp)
                .with_context(|| format!("cannot create checkpoint directory {}", tmp.display()))?;
        }
        comm.barrier()?;
        self.save_shard(&tmp)?;
        comm.barrier()?;
        if self.rank == 0 {
            self.write_manifest(&tmp)?;
            extra(&tmp)?;
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("cannot replace {}", dir.display()))?;
            }
            std::fs::rename(&tmp, dir)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
            if let Some(parent) = dir.parent()
                && let Ok(d) = std::fs::File::open(parent)
            {
                let _ = d.sync_all(); // make the rename durable where the platform allows
            }
        }
        comm.barrier()
    }

    /// Rank 0's part of a save: re-read and verify every shard in `dir`, then write the manifest.
    fn write_manifest(&self, dir: &Path) -> Result<()> {
        let w = self.layout.world;
        let mut shards = Vec::with_capacity(w);
        for r in 0..w {
            let path = dir.join(shard_file_name(r, w));
            let s = read_shard(&path)?;
            ensure!(
                s.rank == r
                    && s.world == w
                    && s.n_params == self.layout.n_params
                    && s.updates == self.updates,
                "{}: shard of rank {} of {} over {} parameters after {} updates, expected \
                 rank {r} of {w} over {} after {}",
                path.display(),
                s.rank,
                s.world,
                s.n_params,
                s.updates,
                self.layout.n_params,
                self.updates
            );
            shards.push(ManifestShard {
                rank: r,
                file: shard_file_name(r, w),
                start: s.start,
                len: s.len,
                sha256: s.sha256,
            });
        }
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: SHARD_VERSION,
            world_size: w,
            n_params: self.layout.n_params,
            updates: self.updates,
            shards,
        };
        let json = serde_json::to_vec_pretty(&m)?;
        crate::util::write_atomic(&dir.join(MANIFEST_NAME), &json)
    }

    /// The state of rank `comm_rank` of `world` from the checkpoint in `dir`, saved at any world
    /// size (the shards are re-cut: each rank reads the saved shards that overlap its range).
    /// Every file read is checked against its checksum and the manifest.
    pub fn load(
        dir: &Path,
        comm_rank: usize,
        world: usize,
        n_params: usize,
        bucket_elems: usize,
    ) -> Result<Self> {
        let mpath = dir.join(MANIFEST_NAME);
        let text = std::fs::read(&mpath).with_context(|| {
            format!(
                "{}: no ZeRO-2 manifest, the checkpoint is missing or incomplete",
                mpath.display()
            )
        })?;
        let m: Manifest = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a ZeRO-2 manifest", mpath.display()))?;
        ensure!(
            m.format == MANIFEST_FORMAT && m.version == SHARD_VERSION,
            "{}: format {:?} version {}, expected {MANIFEST_FORMAT:?} version {SHARD_VERSION}",
            mpath.display(),
            m.format,
            m.version
        );
        ensure!(
            m.n_params == n_params,
            "{}: checkpoint has {} trainable parameters, this run has {n_params}",
            mpath.display(),
            m.n_params
        );
        let saved = ShardLayout::new(n_params, m.world_size);
        ensure!(
            m.shards.len() == m.world_size,
            "{}: {} shards listed for a world of {}",
            mpath.display(),
            m.shards.len(),
            m.world_size
        );
        let mut z = Zero2::new(comm_rank, world, n_params, bucket_elems);
        let mine = z.shard_range();
        for (r, ms) in m.shards.iter().enumerate() {
            let expect = saved.range(r);
            ensure!(
                ms.rank == r && ms.start == expect.start && ms.len == expect.len(),
                "{}: shard entry {r} covers [{}, {}), expected [{}, {})",
                mpath.display(),
                ms.start,
                ms.start + ms.len,
                expect.start,
                expect.end
            );
            let lo = expect.start.max(mine.start);
            let hi = expect.end.min(mine.end);
            if lo >= hi {
                continue;
            }
            let path = dir.join(&ms.file);
            let s = read_shard(&path)?;
            ensure!(
                s.sha256 == ms.sha256,
                "{}: checksum {} differs from the manifest's {}",
                path.display(),
                s.sha256,
                ms.sha256
            );
            ensure!(
                s.rank == r
                    && s.world == m.world_size
                    && s.n_params == n_params
                    && s.start == expect.start
                    && s.len == expect.len()
                    && s.updates == m.updates,
                "{}: header disagrees with the manifest",
                path.display()
            );
            let (src, dst) = (lo - s.start..hi - s.start, lo - mine.start..hi - mine.start);
            z.master[dst.clone()].copy_from_slice(&s.master[src.clone()]);
            z.m[dst.clone()].copy_from_slice(&s.m[src.clone()]);
            z.v[dst].copy_from_slice(&s.v[src]);
        }
        z.has_master = true;
        z.updates = m.updates;
        Ok(z)
    }
}

/// The temporary sibling `<dir>.tmp` a checkpoint is written into before its rename.
pub fn tmp_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    dir.with_file_name(name)
}

/// The checkpoint directory of optimizer step `step` under `root`: `root/step-NNNNNN`.
pub fn checkpoint_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:06}"))
}

/// The newest complete checkpoint under `root`: the highest `step-N` directory (no `.tmp`
/// suffix) that has its manifest. `None` when there is none (or `root` does not exist).
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", root.display())),
    };
    let mut best: Option<(u64, PathBuf)> = None;
    for e in rd {
        let p = e
            .with_context(|| format!("cannot list {}", root.display()))?
            .path();
        let step = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step
            && p.join(MANIFEST_NAME).exists()
            && best.as_ref().is_none_or(|b| step > b.0)
        {
            best = Some((step, p));
        }
    }
    Ok(best.map(|b| b.1))
}

struct ShardFile {
    rank: usize,
    world: usize,
    n_params: usize,
    start: usize,
    len: usize,
    updates: u64,
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    sha256: String,
}

fn read_shard(path: &PathBuf) -> Result<ShardFile> {
    let b = std::fs::read(path)
        .with_context(|| format!("cannot read ZeRO-2 shard {}", path.display()))?;
    let bad = |what: &str| format!("{}: {what}", path.display());
    ensure!(
        b.len() >= SHARD_HEADER + 32 && &b[..8] == SHARD_MAGIC,
        bad("not a ZeRO-2 shard file (bad magic or truncated)")
    );
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    ensure!(
        version == SHARD_VERSION,
        bad(&format!(
            "shard version {version}, this build reads {SHARD_VERSION}"
        ))
    );
    let len = u64_at(40) as usize;
    let expect = SHARD_HEADER + 12 * len + 32;
    ensure!(
        b.len() == expect,
        bad(&format!(
            "{} bytes, expected {expect} for {len} elements (truncated?)",
            b.len()
        ))
    );
    let body = &b[..expect - 32];
    let digest = Sha256::digest(body);
    if digest.as_slice() != &b[expect - 32..] {
        bail!(bad("checksum mismatch: the shard is corrupt"));
    }
    let floats = |i: usize| -> Vec<f32> {
        let o = SHARD_HEADER + 4 * len * i;
        b[o..o + 4 * len]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    Ok(ShardFile {
        rank: u32_at(12) as usize,
        world: u32_at(16) as usize,
        n_params: u64_at(24) as usize,
        start: u64_at(32) as usize,
        len,
        updates: u64_at(48),
        master: floats(0),
        m: floats(1),
        v: floats(2),
        sha256: digest.iter().map(|x| format!("{x:02x}")).collect(),
    })
}

/// The maximal nodes of the canonical pairwise tree over `[0, p)` that lie inside `[a, b)`,
/// left to right (at most ~2·log2 p of them).
fn cover_nodes(p: usize, a: usize, b: usize) -> Vec<(usize, usize)> {
    fn rec(lo: usize, hi: usize, a: usize, b: usize, out: &mut Vec<(usize, usize)>) {
        if hi <= a || lo >= b || lo >= hi {
            return;
        }
        if a <= lo && hi <= b {
            out.push((lo, hi));
            return;
        }
        let h = tree_split(hi - lo);
        rec(lo, lo + h, a, b, out);
        rec(lo + h, hi, a, b, out);
    }
    let mut out = Vec::new();
    rec(0, p, a, b, &mut out);
    out
}

/// `Σ x²` in f64 over the canonical pairwise tree of `x`'s indices (squares of f32 are exact in
/// f64, so the value depends only on the tree, which depends only on `x.len()`):
/// [`crate::ops::sum_squares_tree`], the reference the backends' `sum_squares_tree` follows.
pub fn tree_sum_squares(x: &[f32]) -> f64 {
    crate::ops::sum_squares_tree(x)
}

/// `Σ g²` over the whole flat buffer (every rank's shard `shard` of `layout`), in f64, in the
/// canonical pairwise order over *global* indices — so the result is bit-identical for every
/// world size. Each rank computes the maximal tree nodes inside its range; every rank knows
/// every rank's node list, so one all-reduce of a vector with one slot per node (zeros
/// elsewhere, and `x + 0 = x` exactly) shares them; each rank then adds up the top of the tree.
pub fn global_sum_squares(
    comm: &dyn Comm,
    layout: &ShardLayout,
    rank: usize,
    shard: &[f32],
) -> Result<f64> {
    global_sum_squares_with(
        comm,
        layout,
        rank,
        |lo, hi| Ok(tree_sum_squares(&shard[lo..hi])),
        None,
    )
}

/// [`global_sum_squares`] with this rank's tree-node values from `node(lo, hi)`: `Σ g²` over
/// elements `lo..hi` of this rank's shard (offsets from the shard's start), in the canonical
/// pairwise order ([`crate::backend::Backend::sum_squares_tree`] on a device shard).
/// `extra`: `Some(x)` adds one slot per rank to the all-reduce, this rank's holding `x`, and
/// adds their sum to the result: with `x = 0` on every rank the result is unchanged bit for bit
/// (`s + 0 = s`); a NaN or Inf from any rank makes it non-finite on every rank (how a rank's
/// non-finite loss skips the step everywhere).
pub fn global_sum_squares_with(
    comm: &dyn Comm,
    layout: &ShardLayout,
    rank: usize,
    mut node: impl FnMut(usize, usize) -> Result<f64>,
    extra: Option<f64>,
) -> Result<f64> {
    let p = layout.n_params;
    let lists: Vec<Vec<(usize, usize)>> = (0..layout.world)
        .map(|r| {
            let rg = layout.range(r);
            cover_nodes(p, rg.start, rg.end)
        })
        .collect();
    let total: usize = lists.iter().map(Vec::len).sum();
    let extra_slots = if extra.is_some() { layout.world } else { 0 };
    let mut slots = vec![0f64; total + extra_slots];
    if let Some(x) = extra {
        slots[total + rank] = x;
    }
    let first: usize = lists[..rank].iter().map(Vec::len).sum();
    let start = layout.range(rank).start;
    for (i, &(lo, hi)) in lists[rank].iter().enumerate() {
        slots[first + i] = node(lo - start, hi - start)?;
    }
    comm.all_reduce_sum_f64(&mut slots)?;
    let extra_sum: f64 = slots[total..].iter().sum();
    let values: HashMap<(usize, usize), f64> = lists
        .into_iter()
        .flatten()
        .zip(slots.iter().copied())
        .collect();
    fn eval(lo: usize, hi: usize, v: &HashMap<(usize, usize), f64>) -> f64 {
        if lo >= hi {
            return 0.0;
        }
        if let Some(x) = v.get(&(lo, hi)) {
            return *x;
        }
        let h = tree_split(hi - lo);
        eval(lo, lo + h, v) + eval(lo + h, hi, v)
    }
    let sum = eval(0, p, &values);
    Ok(if extra.is_some() {
        sum + extra_sum
    } else {
        sum
    })
}
