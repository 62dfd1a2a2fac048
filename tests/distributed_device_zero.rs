//! ZeRO-2 on backend buffers (`DeviceZero2`, the step `Trainer` runs) against the host
//! reference (`Zero2` over `f32` vectors with `GradAccumulator`): on the CPU backend both give the
//! same bits — weights, norms, skips — at worlds 1–4, with and without the reduce-scatter
//! overlapped with a simulated backward, for any number of micro-batches per step (the device
//! accumulator's range-by-range finish included), and through a checkpoint round trip.
//!
//! The overlapped backward is simulated as in `distributed_overlap`: "layers" (ranges of the last
//! micro-batch's gradient) become final from the last to the first, and an element holds NaN
//! until its layer is final, so any sum or reduce-scatter that read it early would carry the NaN
//! into the step (skipped, and a different result).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ops::Range;
use std::time::Duration;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::zero::DeviceAccumulator;
use zhllama::distributed::{Comm, DeviceZero2, GradAccumulator, ThreadComm, Zero2};

mod zero_common;
use zero_common::{bits, hp};

const TIMEOUT: Duration = Duration::from_secs(30);

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
    host: Vec<f32>,
    device: Vec<f32>,
    norms: Vec<(u64, u64)>,
    skipped: Vec<(bool, bool)>,
    fired: usize,
}

/// Three steps of `a` micro-batches per rank: the host reference and the device step (overlapped
/// on the last micro-batch when `overlap`); step 2 has an Inf on rank 0 (skipped everywhere).
fn run(world: usize, p: usize, a: usize, bucket: usize, overlap: bool) -> Vec<RankResult> {
    ThreadComm::run(world, TIMEOUT, |c| {
        let rank = c.rank();
        let be = CpuBackend::new();
        let mut rng = ChaCha8Rng::seed_from_u64(1000 + rank as u64);
        let mut prng = ChaCha8Rng::seed_from_u64(7);
        let params0: Vec<f32> = (0..p).map(|_| prng.random_range(-1.0f32..1.0)).collect();
        let mut host_params = params0.clone();
        let mut dev_params = be.alloc(p, zhllama::backend::Role::Weight)?;
        be.upload(&mut dev_params, &params0)?;
        let mut zh = Zero2::new(rank, world, p, bucket);
        let mut zd = DeviceZero2::new(&be, rank, world, p, bucket)?;
        let mut hacc = GradAccumulator::new(p);
        let mut dacc = DeviceAccumulator::<CpuBackend>::new(p);
        let (mut norms, mut skipped, mut fired) = (Vec::new(), Vec::new(), 0);
        let grad_scale = 1.0 / (a * world) as f32;
        for step in 1..=3u64 {
            let micro: Vec<Vec<f32>> = (0..a)
                .map(|_| (0..p).map(|_| rng.random_range(-3.0f32..3.0)).collect())
                .collect();
            let inf = step == 2 && rank == 0;
            // Host reference: exactly what the trainer did before (poison element 0).
            for g in &micro {
                hacc.push(g)?;
            }
            let mut hg = vec![0f32; p];
            hacc.finish(&mut hg)?;
            if inf {
                hg[0] = f32::INFINITY;
            }
            let rh = zh.step(
                &c,
                &mut host_params,
                &mut hg,
                grad_scale,
                Some(2.0),
                hp(step),
            )?;
            // Device: the first a-1 micro-batches pushed, the last one finished range by range.
            for g in &micro[..a - 1] {
                let mut buf = dacc.take(&be)?;
                be.upload(&mut buf, g)?;
                dacc.push(&be, buf)?;
            }
            let last = &micro[a - 1];
            let mut buf = dacc.take(&be)?;
            let mut sum = if overlap {
                let mut live = vec![f32::NAN; p];
                be.upload(&mut buf, &live)?;
                let mut done: Vec<Range<usize>> = Vec::new();
                for l in layers(p).into_iter().rev() {
                    live[l.clone()].copy_from_slice(&last[l.clone()]);
                    be.upload(&mut buf, &live)?;
                    dacc.finish_range(&be, &buf, l.clone())?;
                    done.push(l.clone());
                    fired += zd.grads_ready(&c, &be, dacc.final_buf(&buf), l)?;
                }
                done.sort_by_key(|r| r.start);
                dacc.push_last(&be, buf, &done)?
            } else {
                be.upload(&mut buf, last)?;
                dacc.push(&be, buf)?;
                dacc.finish_buf(&be)?
            };
            let poison = inf.then_some(f32::INFINITY);
            let rd = zd.step(
                &c,
                &be,
                &mut dev_params,
                &mut sum,
                grad_scale,
                Some(2.0),
                hp(step),
                poison,
            )?;
            dacc.recycle(sum);
            norms.push((rh.grad_norm.to_bits(), rd.grad_norm.to_bits()));
            skipped.push((rh.skipped, rd.skipped));
        }
        let mut device = vec![0f32; p];
        be.download(&dev_params, &mut device)?;
        Ok(RankResult {
            host: host_params,
            device,
            norms,
            skipped,
            fired,
        })
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

#[test]
fn device_step_equals_the_host_step_bit_for_bit() {
    for world in 1..=4usize {
        for (p, a, bucket) in [
            (1000usize, 1usize, 64usize),
            (777, 3, 200),
            (4099, 4, 1 << 20),
        ] {
            for overlap in [false, true] {
                let res = run(world, p, a, bucket, overlap);
                for (rank, r) in res.iter().enumerate() {
                    let what = format!(
                        "world {world} rank {rank} p {p} a {a} bucket {bucket} overlap {overlap}"
                    );
                    assert_eq!(bits(&r.host), bits(&r.device), "{what}: weights differ");
                    for (i, ((nh, nd), (sh, sd))) in r.norms.iter().zip(&r.skipped).enumerate() {
                        // Skipped steps: the host poisons the gradient (norm Inf), the device adds
                        // the poison to the norm (Inf too); finite norms must agree exactly.
                        assert_eq!(sh, sd, "{what}: step {} skip differs", i + 1);
                        assert_eq!(nh, nd, "{what}: step {} norm differs", i + 1);
                    }
                    assert_eq!(
                        r.skipped[1],
                        (true, true),
                        "{what}: the Inf step is skipped"
                    );
                    assert!(
                        !r.skipped[0].0 && !r.skipped[2].0,
                        "{what}: clean steps apply"
                    );
                }
                // With a small bucket, some chunks must have gone out during the backward.
                if overlap && world > 1 && bucket < p {
                    assert!(
                        res.iter().all(|r| r.fired > 0),
                        "world {world} p {p}: no chunk was reduce-scattered during the backward"
                    );
                }
            }
        }
    }
}

/// A device state saved through the host format (`to_host` + `Zero2::save`) at world 2 and loaded
/// at world 4 (`Zero2::load` + `from_host` + `gather_params`) ends where a world-1 host run of the
/// same steps ends, bit for bit. Every rank feeds the same gradient `g` with `grad_scale =
/// 1/world`: a sum of 2 or 4 equal terms is exact, and so is the power-of-two scale, so the
/// averaged gradient is `g` at every world size.
#[test]
fn device_state_round_trips_through_the_checkpoint_across_world_sizes() {
    let p = 1234;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let mut prng = ChaCha8Rng::seed_from_u64(3);
    let params0: Vec<f32> = (0..p).map(|_| prng.random_range(-1.0f32..1.0)).collect();
    let grads: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..p).map(|_| prng.random_range(-1.0f32..1.0)).collect())
        .collect();
    let mut want = params0.clone();
    let mut zh = Zero2::new(0, 1, p, 100);
    let local = zhllama::distributed::LocalComm;
    for (i, g) in grads.iter().enumerate() {
        let mut g = g.clone();
        zh.step(&local, &mut want, &mut g, 1.0, Some(1.0), hp(i as u64 + 1))
            .unwrap();
    }
    let steps = |c: &dyn Comm,
                 be: &CpuBackend,
                 z: &mut DeviceZero2<CpuBackend>,
                 w: &mut Vec<f32>,
                 from: usize|
     -> anyhow::Result<()> {
        let scale = 1.0 / c.world_size() as f32;
        for (i, g) in grads[from..from + 2].iter().enumerate() {
            let mut gb = be.alloc(p, zhllama::backend::Role::Fp32)?;
            be.upload(&mut gb, g)?;
            let h = hp((from + i) as u64 + 1);
            let r = z.step(c, be, w, &mut gb, scale, Some(1.0), h, None)?;
            anyhow::ensure!(!r.skipped, "step {} skipped", from + i + 1);
        }
        Ok(())
    };
    let saved = ThreadComm::run(2, TIMEOUT, |c| {
        let be = CpuBackend::new();
        let mut w = be.alloc(p, zhllama::backend::Role::Weight)?;
        be.upload(&mut w, &params0)?;
        let mut z = DeviceZero2::new(&be, c.rank(), 2, p, 100)?;
        steps(&c, &be, &mut z, &mut w, 0)?;
        z.to_host(&be)?.save(&c, &dir)
    });
    saved.into_iter().for_each(|r| r.unwrap());
    let res = ThreadComm::run(4, TIMEOUT, |c| {
        let be = CpuBackend::new();
        let host = Zero2::load(&dir, c.rank(), 4, p, 100)?;
        let mut z = DeviceZero2::from_host(&be, &host, 100)?;
        let mut w = be.alloc(p, zhllama::backend::Role::Weight)?;
        z.gather_params(&c, &be, &mut w)?;
        steps(&c, &be, &mut z, &mut w, 2)?;
        Ok((w, z.updates()))
    });
    for (rank, r) in res.into_iter().enumerate() {
        let (got, updates) = r.unwrap();
        assert_eq!(updates, 4, "rank {rank}");
        assert_eq!(
            bits(&got),
            bits(&want),
            "rank {rank}: weights differ from world 1"
        );
    }
}
