//! ZeRO-2 with the gradient reduce-scatter overlapped with the backward pass
//! (`Zero2::grads_ready`): the step equals the plain `Zero2::step` bit for bit, at several world
//! sizes, on in-process ranks (ThreadComm).
//!
//! The backward is simulated as the real one runs: "layers" (ranges of the flat gradient) become
//! final from the last to the first, and a gradient element holds NaN until its layer is final. A
//! chunk reduce-scattered before all of its elements were final would carry a NaN into the step
//! (which would then be skipped and differ), so bit-equality also shows that chunks fire only when
//! ready.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ops::Range;
use std::time::Duration;
use zhllama::distributed::{Comm, ThreadComm, Zero2};

mod zero_common;
use zero_common::{bits, hp};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Random "layer" boundaries over `[0, p)` (same on every rank: seeded by `p` only).
fn layers(p: usize) -> Vec<Range<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(p as u64);
    let mut out = Vec::new();
    let mut a = 0;
    while a < p {
        let b = (a + rng.random_range(1..=p / 7 + 1)).min(p);
        out.push(a..b);
        a = b;
    }
    out
}

struct RankResult {
    plain: Vec<f32>,
    overlapped: Vec<f32>,
    norms: Vec<(f64, f64)>,
    fired_during_backward: usize,
    chunks: usize,
}

fn run(world: usize, p: usize, bucket: usize) -> Vec<RankResult> {
    ThreadComm::run(world, TIMEOUT, |c| {
        let rank = c.rank();
        let mut rng = ChaCha8Rng::seed_from_u64(1000 + rank as u64);
        let mut prng = ChaCha8Rng::seed_from_u64(7);
        let params0: Vec<f32> = (0..p).map(|_| prng.random_range(-1.0f32..1.0)).collect();
        let (mut pa, mut pb) = (params0.clone(), params0);
        let mut za = Zero2::new(rank, world, p, bucket);
        let mut zb = Zero2::new(rank, world, p, bucket);
        let chunks = za.chunks();
        let mut norms = Vec::new();
        let mut fired = 0;
        for step in 1..=3u64 {
            let g: Vec<f32> = (0..p).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let h = hp(step);
            let mut ga = g.clone();
            let ra = za.step(&c, &mut pa, &mut ga, 0.5, Some(2.0), h)?;
            // The overlapped step: NaN until a layer's gradient is final, last layer first.
            let mut gb = vec![f32::NAN; p];
            for l in layers(p).into_iter().rev() {
                gb[l.clone()].copy_from_slice(&g[l.clone()]);
                fired += zb.grads_ready(&c, &gb, l)?;
            }
            let rb = zb.step(&c, &mut pb, &mut gb, 0.5, Some(2.0), h)?;
            assert!(!ra.skipped && !rb.skipped);
            norms.push((ra.grad_norm, rb.grad_norm));
        }
        Ok(RankResult {
            plain: pa,
            overlapped: pb,
            norms,
            fired_during_backward: fired,
            chunks,
        })
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

#[test]
fn overlapped_reduce_scatter_gives_the_same_step() {
    for (world, p, bucket) in [(1, 1000, 64), (2, 1001, 60), (3, 997, 90), (4, 4099, 256)] {
        let results = run(world, p, bucket);
        for (rank, r) in results.iter().enumerate() {
            assert_eq!(
                bits(&r.plain),
                bits(&r.overlapped),
                "world {world} rank {rank}: params differ"
            );
            for (a, b) in &r.norms {
                assert_eq!(a.to_bits(), b.to_bits(), "world {world}: norm {a} vs {b}");
            }
            // Every chunk became final once the first layer was marked: nothing was left for the
            // step itself (3 steps × all chunks fired inside the simulated backward).
            assert_eq!(r.fired_during_backward, 3 * r.chunks, "world {world}");
        }
        // Replicated parameters are the same on every rank.
        for r in &results[1..] {
            assert_eq!(bits(&r.plain), bits(&results[0].plain));
        }
    }
}

/// Marking nothing (or only part) leaves the remaining chunks to the step: same result.
#[test]
fn partial_marking_falls_back_to_the_step() {
    let (world, p, bucket) = (3, 500, 30);
    let results = ThreadComm::run(world, TIMEOUT, |c| {
        let rank = c.rank();
        let g: Vec<f32> = (0..p)
            .map(|i| ((i * 7 + rank * 13) % 17) as f32 - 8.0)
            .collect();
        let params0: Vec<f32> = (0..p).map(|i| (i % 11) as f32 * 0.1).collect();
        let (mut pa, mut pb) = (params0.clone(), params0);
        let mut za = Zero2::new(rank, world, p, bucket);
        let mut zb = Zero2::new(rank, world, p, bucket);
        let mut ga = g.clone();
        za.step(&c, &mut pa, &mut ga, 1.0, None, hp(1))?;
        let mut gb = g.clone();
        // Only the upper half: chunk pieces in rank 0's shard (the lower third) are never final.
        let fired = zb.grads_ready(&c, &gb, p / 2..p)?;
        zb.step(&c, &mut pb, &mut gb, 1.0, None, hp(1))?;
        Ok((fired, bits(&pa) == bits(&pb)))
    });
    for r in results {
        let (fired, same) = r.unwrap();
        assert_eq!(fired, 0);
        assert!(same);
    }
}

/// Chunks fire exactly when the last of their pieces becomes final, whatever order the layers
/// are marked in (here a random one, so the ready ranges have gaps and merge out of order): after
/// every `grads_ready` call the number of chunks it reduced equals the number a brute-force
/// count over the marked elements finds newly complete. The step still equals the plain one.
#[test]
fn chunks_fire_exactly_when_complete_in_any_marking_order() {
    for (world, p, bucket) in [(2, 1001, 60), (3, 997, 90), (4, 4099, 256)] {
        let results = ThreadComm::run(world, TIMEOUT, |c| {
            let rank = c.rank();
            let mut rng = ChaCha8Rng::seed_from_u64(50 + rank as u64);
            let g: Vec<f32> = (0..p).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let params0: Vec<f32> = (0..p).map(|i| (i % 13) as f32 * 0.05).collect();
            let (mut pa, mut pb) = (params0.clone(), params0);
            let mut za = Zero2::new(rank, world, p, bucket);
            let mut zb = Zero2::new(rank, world, p, bucket);
            // The layout as documented: shards of ⌈P/N⌉, chunks of ⌈bucket/N⌉ (at most a shard).
            let s = p.div_ceil(world);
            let chunk = bucket.div_ceil(world).clamp(1, s);
            let n_chunks = zb.chunks();
            assert_eq!(n_chunks, s.div_ceil(chunk));
            let piece = |r: usize, k: usize| {
                let off = k * chunk;
                let len = chunk.min(s - off);
                (r * s + off).min(p)..(r * s + off + len).min(p)
            };
            // Same order on every rank (the collectives must match): seeded by `p` only.
            let mut order = layers(p);
            let mut orng = ChaCha8Rng::seed_from_u64(p as u64 ^ 0x5eed);
            for i in (1..order.len()).rev() {
                order.swap(i, orng.random_range(0..=i));
            }
            let mut marked = vec![false; p];
            let mut done = vec![false; n_chunks];
            let mut mismatches = Vec::new();
            let mut gb = vec![f32::NAN; p];
            for l in order {
                gb[l.clone()].copy_from_slice(&g[l.clone()]);
                marked[l.clone()].iter_mut().for_each(|m| *m = true);
                let fired = zb.grads_ready(&c, &gb, l.clone())?;
                let mut expected = 0;
                for (k, d) in done.iter_mut().enumerate() {
                    if !*d && (0..world).all(|r| marked[piece(r, k)].iter().all(|&m| m)) {
                        *d = true;
                        expected += 1;
                    }
                }
                if fired != expected {
                    mismatches.push((l, fired, expected));
                }
            }
            let mut ga = g.clone();
            za.step(&c, &mut pa, &mut ga, 0.5, Some(2.0), hp(1))?;
            let rb = zb.step(&c, &mut pb, &mut gb, 0.5, Some(2.0), hp(1))?;
            Ok((mismatches, rb.skipped, bits(&pa) == bits(&pb)))
        });
        for (rank, r) in results.into_iter().enumerate() {
            let (mismatches, skipped, same) = r.unwrap();
            assert!(
                mismatches.is_empty(),
                "world {world} rank {rank}: (range, fired, complete) {mismatches:?}"
            );
            assert!(!skipped && same, "world {world} rank {rank}");
        }
    }
}
