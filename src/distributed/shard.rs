//! Shard arithmetic: which slice of the flat trainable buffer each rank owns, the per-rank memory
//! plan, and which examples each rank reads at each step.

use serde::Serialize;
use std::ops::Range;

/// `P` elements split over `N` ranks in contiguous shards of `S = ⌈P/N⌉` elements; the buffer is
/// padded to `N·S` (the padding is zero and never written back). The last ranks' shards may be
/// short or empty (`P = 5, N = 4`: `[0,2) [2,4) [4,5) [5,5)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub n_params: usize,
    pub world: usize,
    /// `⌈P/N⌉`: every rank's shard buffers have this length, padding included.
    pub shard_elems: usize,
}

impl ShardLayout {
    pub fn new(n_params: usize, world: usize) -> Self {
        assert!(world >= 1, "a world has at least one rank");
        ShardLayout {
            n_params,
            world,
            shard_elems: n_params.div_ceil(world),
        }
    }

    /// The unpadded global range rank `rank` owns (clipped to `P`; may be empty).
    pub fn range(&self, rank: usize) -> Range<usize> {
        let start = (rank * self.shard_elems).min(self.n_params);
        let end = ((rank + 1) * self.shard_elems).min(self.n_params);
        start..end
    }

    /// `N·S`, the padded length.
    pub fn padded_len(&self) -> usize {
        self.shard_elems * self.world
    }
}

/// Per-rank memory of the ZeRO-2 state for `n_params` trainable parameters over `world` ranks
/// (fp32 throughout; what `--dry-run --world-size N` prints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    pub world_size: usize,
    pub trainable_params: u64,
    /// `⌈P/N⌉`.
    pub shard_elems: u64,
    /// fp32 master weights + AdamW `m` + `v` of the shard: `3·4·⌈P/N⌉`.
    pub optimizer_bytes_per_rank: u64,
    /// The reduced, averaged fp32 gradient of the shard the optimizer reads: `4·⌈P/N⌉`.
    pub gradient_bytes_per_rank: u64,
    /// The full-length fp32 buffer the backward pass accumulates this rank's micro-batch
    /// gradients into before the reduce-scatter: `4·P` (not sharded; ZeRO-2 shards what outlives
    /// the step).
    pub local_gradient_bytes_per_rank: u64,
    /// Bytes each rank sends per optimizer step: reduce-scatter + all-gather of the trainable
    /// buffer, `2·(N−1)·4·⌈P/N⌉` (≈ 2Ψ in fp32 as N grows; 0 at N = 1).
    pub comm_bytes_per_step_per_rank: u64,
}

/// The memory plan for `n_params` trainable parameters over `world` ranks.
pub fn memory_plan(n_params: usize, world: usize) -> MemoryPlan {
    let l = ShardLayout::new(n_params, world);
    let s = l.shard_elems as u64;
    MemoryPlan {
        world_size: world,
        trainable_params: n_params as u64,
        shard_elems: s,
        optimizer_bytes_per_rank: 12 * s,
        gradient_bytes_per_rank: 4 * s,
        local_gradient_bytes_per_rank: 4 * n_params as u64,
        comm_bytes_per_step_per_rank: 2 * (world as u64 - 1) * 4 * s,
    }
}

/// The example indices of each of rank `rank`'s `accum` micro-batches at optimizer step
/// `global_step` (outer `Vec`: micro-batches in the order to run them; inner: `micro` indices).
///
/// The examples are an endless stream of epochs, each a seeded permutation of `0..n_examples`;
/// step `s` takes stream positions `[s·G, (s+1)·G)` with `G = micro·accum·world`, cut into
/// `accum·world` global micro-batches, and rank `r` gets global micro-batches
/// `[r·accum, (r+1)·accum)`. So ranks never overlap, an epoch is seen once before any example
/// repeats, and world 1 with accumulation `A·N` runs exactly the micro-batches of world `N` with
/// accumulation `A`, in the same global order (the order [`super::GradAccumulator`] relies on).
pub fn rank_batch_indices(
    global_step: u64,
    micro: usize,
    accum: usize,
    rank: usize,
    world: usize,
    n_examples: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    BatchSchedule::new(n_examples, seed, micro, accum, world).rank_micro_batches(global_step, rank)
}

/// [`rank_batch_indices`] with the current epoch's permutation cached between calls.
#[derive(Clone, Debug)]
pub struct BatchSchedule {
    n_examples: usize,
    seed: u64,
    micro: usize,
    accum: usize,
    world: usize,
    cached: Option<(u64, Vec<usize>)>,
}

impl BatchSchedule {
    pub fn new(n_examples: usize, seed: u64, micro: usize, accum: usize, world: usize) -> Self {
        assert!(
            n_examples > 0 && micro > 0 && accum > 0 && world > 0,
            "batch schedule needs examples, micro-batch, accumulation and world all ≥ 1"
        );
        BatchSchedule {
            n_examples,
            seed,
            micro,
            accum,
            world,
            cached: None,
        }
    }

    /// Sequences per optimizer step: `micro·accum·world`.
    pub fn global_batch(&self) -> usize {
        self.micro * self.accum * self.world
    }

    /// See [`rank_batch_indices`].
    pub fn rank_micro_batches(&mut self, global_step: u64, rank: usize) -> Vec<Vec<usize>> {
        assert!(rank < self.world, "rank {rank} of world {}", self.world);
        let g = self.global_batch() as u64;
        (0..self.accum)
            .map(|a| {
                let k = (rank * self.accum + a) as u64;
                let first = global_step * g + k * self.micro as u64;
                (0..self.micro as u64)
                    .map(|j| self.example_at(first + j))
                    .collect()
            })
            .collect()
    }

    /// The example at position `pos` of the endless stream.
    pub fn example_at(&mut self, pos: u64) -> usize {
        let n = self.n_examples as u64;
        let epoch = pos / n;
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            self.cached = Some((epoch, epoch_permutation(self.n_examples, self.seed, epoch)));
        }
        self.cached.as_ref().expect("just filled").1[(pos % n) as usize]
    }
}

/// The permutation of `0..n` for `epoch`: Fisher–Yates driven by SplitMix64 seeded from
/// `(seed, epoch)` — written out here so resumed runs keep their order whatever crate versions do.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        // Unbiased draw from 0..=i by rejection (Lemire's multiply-shift with threshold).
        let bound = i as u64 + 1;
        let threshold = bound.wrapping_neg() % bound;
        let j = loop {
            let m = (next() as u128) * (bound as u128);
            if (m as u64) >= threshold {
                break (m >> 64) as usize;
            }
        };
        p.swap(i, j);
    }
    p
}
