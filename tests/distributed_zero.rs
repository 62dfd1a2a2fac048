//! ZeRO-2 at world 1, 2 and 3 in one process (ranks as threads): equivalence across world
//! sizes, sharded optimizer state, skipped steps, communication volume, checkpoints and reshard,
//! failure. The MPI versions of the same runs are in `distributed_mpi.rs`.

use anyhow::Result;
use std::path::Path;
use std::time::Duration;
use zhllama::backend::AdamW;
use zhllama::distributed::toy::{self, ToyProblem, ToyResult, ToyRun, checkpoint_dir};
use zhllama::distributed::zero::{
    MANIFEST_NAME, global_sum_squares_with, latest_checkpoint, shard_file_name, tree_sum_squares,
};
use zhllama::distributed::{Comm, LocalComm, ThreadComm, Zero2, memory_plan};

mod zero_common;
use zero_common::{bits, hp};

const TIMEOUT: Duration = Duration::from_secs(30);

/// 1003 trainable parameters (prime: every world size pads), 5 frozen ones.
const PROBLEM: ToyProblem = ToyProblem {
    n_params: 1003,
    n_frozen: 5,
    n_examples: 97,
    seed: 42,
};

fn run_cfg(steps: u64, accum: usize) -> ToyRun {
    ToyRun {
        steps,
        micro: 2,
        accum,
        hp: hp(0),
        max_norm: Some(1.0),
        bucket_elems: 256,
        pairwise: true,
        save_every: None,
        ckpt_root: None,
        resume: None,
    }
}

/// Run the toy at `world` ranks; return every rank's result.
fn run_world(world: usize, cfg: &ToyRun) -> Vec<ToyResult> {
    ThreadComm::run(world, TIMEOUT, |c| {
        toy::train(&c, &PROBLEM, cfg, &mut |_, _, _| Ok(()))
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

/// Mean loss over every example.
fn full_loss(params: &[f32]) -> f64 {
    let all: Vec<usize> = (0..PROBLEM.n_examples).collect();
    let mut g = vec![0f32; PROBLEM.n_params];
    PROBLEM.accumulate_grad(&mut g, params, &PROBLEM.frozen(), &all) / all.len() as f64
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn world_2_and_3_are_bit_identical_to_world_1_with_the_same_global_batch() {
    // (world, accum per rank) pairs with the same global batch; accum per rank a power of two
    // at world > 1, which is what makes the pairwise order world-invariant.
    for (world, accum, single_accum) in [(2, 2, 4), (3, 2, 6), (3, 4, 12), (2, 1, 2)] {
        let one = run_world(1, &run_cfg(5, single_accum)).remove(0);
        let many = run_world(world, &run_cfg(5, accum));
        for (r, res) in many.iter().enumerate() {
            assert_eq!(
                bits(&res.params),
                bits(&one.params),
                "world {world} accum {accum} rank {r} vs world 1 accum {single_accum}: max |Δ| {}",
                max_abs_diff(&res.params, &one.params)
            );
            let norms: Vec<u64> = res.reports.iter().map(|x| x.grad_norm.to_bits()).collect();
            let norms1: Vec<u64> = one.reports.iter().map(|x| x.grad_norm.to_bits()).collect();
            assert_eq!(norms, norms1, "grad norms, world {world}");
        }
        // The run did something: the weights moved and, with 8+ examples per step, the loss over
        // all examples went down (a 4-example batch is too noisy to promise that in 5 steps).
        if single_accum >= 4 {
            assert!(full_loss(&one.params) < 0.9 * full_loss(&PROBLEM.init_params()));
        }
        assert!(max_abs_diff(&one.params, &PROBLEM.init_params()) > 1e-2);
    }
}

#[test]
fn bucket_size_does_not_change_the_bits() {
    let mut a = run_cfg(3, 2);
    a.bucket_elems = 7;
    let mut b = run_cfg(3, 2);
    b.bucket_elems = 1 << 20;
    let ra = run_world(3, &a);
    let rb = run_world(3, &b);
    assert_eq!(bits(&ra[0].params), bits(&rb[0].params));
}

/// Tolerance of the comparisons of weights whose gradient sums associate differently: 16 ulps
/// of the largest weight. Each differing f32 addition moves a gradient coordinate by ≤ 2⁻²⁴
/// relative; Adam's update m̂/(√v̂+ε) has relative sensitivity ~1 to its gradient, so a step's
/// update (≤ ~lr = 1e-2) moves by ≤ ~1e-9, below a weight's ulp: what differs is the rounding
/// of `w - update`, an ulp now and then, which later steps carry along (Adam's moments see the
/// changed weight's gradient). Measured worst here: 1.5e-8 to 3.4e-8, i.e. 1 to 2.3 ulps of the
/// largest weight (|w| ≈ 0.14, ulp 1.5e-8); 16 ulps (≈ 2.7e-7) is about eight times that, while
/// one optimizer step moves weights by ~lr.
fn rounding_tol(params: &[f32]) -> f32 {
    16.0 * f32::EPSILON * params.iter().fold(0f32, |m, w| m.max(w.abs()))
}

/// Non-power-of-two accumulation per rank, or a running `+=` sum, changes the association of
/// the gradient sum: equal only within rounding (`rounding_tol`).
#[test]
fn other_accumulation_orders_agree_within_rounding() {
    let steps = 5;
    let one = run_world(1, &run_cfg(steps, 6)).remove(0);
    let tol = rounding_tol(&one.params);
    let two = run_world(2, &run_cfg(steps, 3));
    let d = max_abs_diff(&two[0].params, &one.params);
    eprintln!("world 2 accum 3 vs world 1 accum 6: max |Δ| = {d:e} (tolerance {tol:e})");
    assert!(d <= tol);
    let mut plain = run_cfg(steps, 2);
    plain.pairwise = false;
    let three = run_world(3, &plain);
    let d = max_abs_diff(&three[0].params, &one.params);
    eprintln!("world 3 running-sum vs world 1 pairwise: max |Δ| = {d:e} (tolerance {tol:e})");
    assert!(d <= tol);
    // The ranks of one world always agree exactly (they apply the same all-gathered shards).
    for r in &three[1..] {
        assert_eq!(bits(&r.params), bits(&three[0].params));
    }
}

/// One ZeRO-2 step at world 1 against a plain full-buffer implementation written from the
/// formulas (f64 throughout): averaged gradient, clipping by the global norm, AdamW. Two gradient
/// scales: an ordinary one, and one whose norm (3e-6) is near the clip's 1e-6 guard so that
/// `max_norm / (norm + 1e-6)` and AdamW's ε both matter (the clipped gradients, ~1e-10 to 1e-7,
/// straddle ε = 1e-8).
/// Tolerance: our step is f32 (as torch's); each weight's update is ≈ lr·m̂/(√v̂+ε) computed in
/// ~6 f32 operations (≤ 6·2⁻²⁴ relative), and weight decay/addition round once more: we allow
/// 1e-6·lr + 2⁻²³·|p| per weight.
#[test]
fn one_step_matches_the_formulas() {
    let p = 1003;
    let raw: Vec<f32> = (0..p).map(|j| PROBLEM.feature(3, j)).collect();
    let raw_norm = raw.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    // (gain on the raw gradient, max_norm): averaged norms 0.25·40·‖raw‖ and 3e-6.
    for (gain, max_norm) in [(40.0f32, 1.0f32), ((3e-6 / (0.25 * raw_norm)) as f32, 1e-6)] {
        one_step_case(&raw, gain, max_norm);
    }
}

fn one_step_case(raw: &[f32], gain: f32, max_norm: f32) {
    let p = raw.len();
    let mut params: Vec<f32> = PROBLEM.init_params();
    let mut grads: Vec<f32> = raw.iter().map(|&x| x * gain).collect();
    let scale = 0.25f32;
    let h = AdamW { step: 1, ..hp(0) };
    let p0 = params.clone();
    let g0 = grads.clone();
    let mut z = Zero2::new(0, 1, p, 100);
    let rep = z
        .step(
            &LocalComm,
            &mut params,
            &mut grads,
            scale,
            Some(max_norm),
            h,
        )
        .unwrap();
    let g: Vec<f64> = g0.iter().map(|&x| x as f64 * scale as f64).collect();
    let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        (rep.grad_norm - norm).abs() <= 1e-12 * norm,
        "{} vs {norm}",
        rep.grad_norm
    );
    assert!(norm > max_norm as f64, "the test must exercise clipping");
    let coef = max_norm as f64 / (norm + 1e-6);
    let (b1, b2, lr) = (h.beta1 as f64, h.beta2 as f64, h.lr as f64);
    for j in 0..p {
        let gj = g[j] * coef;
        let m = (1.0 - b1) * gj;
        let v = (1.0 - b2) * gj * gj;
        let (mh, vh) = (m / (1.0 - b1), v / (1.0 - b2));
        let e = p0[j] as f64 * (1.0 - lr * h.weight_decay as f64)
            - lr * mh / (vh.sqrt() + h.eps as f64);
        let tol = 1e-6 * lr + 2f64.powi(-23) * e.abs();
        assert!(
            (params[j] as f64 - e).abs() <= tol,
            "norm {norm:e}, weight {j}: {} vs {e}",
            params[j]
        );
    }
}

/// A state made for one rank of one world refuses a communicator of another (a mixed-up
/// launch would otherwise reduce the wrong slices), for a step and for a gather.
#[test]
fn a_communicator_of_another_world_is_refused() {
    let p = PROBLEM.n_params;
    let mut params = PROBLEM.init_params();
    let mut grads: Vec<f32> = (0..p).map(|j| PROBLEM.feature(0, j)).collect();
    let before = params.clone();
    // Rank 0 of 2, given a world of 1 (`LocalComm`).
    let mut z = Zero2::new(0, 2, p, 100);
    let h = AdamW { step: 1, ..hp(0) };
    let err = z
        .step(&LocalComm, &mut params, &mut grads, 1.0, None, h)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rank 0 of 2") && err.contains("rank 0 of 1"),
        "{err}"
    );
    assert_eq!(bits(&params), bits(&before));
    let mut loaded = Zero2::from_parts(
        0,
        2,
        p,
        100,
        [
            vec![0.0; p.div_ceil(2)],
            vec![0.0; p.div_ceil(2)],
            vec![0.0; p.div_ceil(2)],
        ],
        1,
    )
    .unwrap();
    let err = loaded
        .gather_params(&LocalComm, &mut params)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 0 of 2"), "{err}");
    assert_eq!(bits(&params), bits(&before));
}

#[test]
fn tree_sum_of_squares_is_pairwise() {
    let x: Vec<f32> = (0..6).map(|j| PROBLEM.feature(1, j * 13)).collect();
    let s = |i: usize| x[i] as f64 * x[i] as f64;
    let e = ((s(0) + s(1)) + (s(2) + s(3))) + (s(4) + s(5));
    assert_eq!(tree_sum_squares(&x).to_bits(), e.to_bits());
    // A long one against a plain f64 sum (values of one decade: order matters only at ~1e-15).
    let y: Vec<f32> = (0..5000).map(|j| PROBLEM.feature(2, j)).collect();
    let plain: f64 = y.iter().map(|&v| v as f64 * v as f64).sum();
    assert!((tree_sum_squares(&y) - plain).abs() <= 1e-13 * plain);
}

#[test]
fn optimizer_state_is_a_shard_per_rank() {
    for world in 1..=4 {
        let results = ThreadComm::run(world, TIMEOUT, |c| {
            let r = toy::train(&c, &PROBLEM, &run_cfg(1, 1), &mut |_, _, _| Ok(()))?;
            Ok((r.zero.state_lens(), r.zero.shard_range()))
        });
        let s = PROBLEM.n_params.div_ceil(world);
        let plan = memory_plan(PROBLEM.n_params, world);
        for (rank, res) in results.into_iter().enumerate() {
            let ((master, m, v, g), range) = res.unwrap();
            assert_eq!((master, m, v, g), (s, s, s, s), "world {world} rank {rank}");
            assert_eq!(4 * (master + m + v) as u64, plan.optimizer_bytes_per_rank);
            assert_eq!(4 * g as u64, plan.gradient_bytes_per_rank);
            assert!(range.len() <= s);
        }
    }
}

/// A `Comm` wrapper that counts the f32 elements each collective moves (independently of the
/// transport's own byte counter).
struct Counting {
    inner: ThreadComm,
    rs_elems: std::cell::Cell<u64>,
    ag_elems: std::cell::Cell<u64>,
}

impl Comm for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.inner.all_reduce_sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.inner.all_reduce_sum_f64(buf)
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.rs_elems.set(self.rs_elems.get() + send.len() as u64);
        self.inner.reduce_scatter_sum(send, recv)
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.ag_elems.set(self.ag_elems.get() + recv.len() as u64);
        self.inner.all_gather(send, recv)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.inner.broadcast_bytes(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
}

#[test]
fn communication_per_step_is_reduce_scatter_plus_all_gather_of_the_trainable_buffer() {
    for world in [2usize, 3] {
        let results = ThreadComm::run(world, TIMEOUT, |c| {
            let rank = c.rank();
            let cc = Counting {
                inner: c,
                rs_elems: 0.into(),
                ag_elems: 0.into(),
            };
            let p = PROBLEM.n_params;
            let mut params = PROBLEM.init_params();
            let mut grads: Vec<f32> = (0..p).map(|j| PROBLEM.feature(rank, j)).collect();
            let mut z = Zero2::new(rank, world, p, 300);
            let h = AdamW { step: 1, ..hp(0) };
            z.step(&cc, &mut params, &mut grads.clone(), 1.0, None, h)?;
            // The second step is measured: the transport's counter no longer starts at 0, so the
            // report must be the step's own difference of it.
            let (rs0, ag0, sent0) = (cc.rs_elems.get(), cc.ag_elems.get(), cc.bytes_sent());
            let rep = z.step(
                &cc,
                &mut params,
                &mut grads,
                1.0,
                None,
                AdamW { step: 2, ..h },
            )?;
            assert_eq!(rep.bytes_communicated, cc.bytes_sent() - sent0);
            Ok((rep, cc.rs_elems.get() - rs0, cc.ag_elems.get() - ag0))
        });
        let padded = (PROBLEM.n_params.div_ceil(world) * world) as u64;
        for res in results {
            let (rep, rs, ag) = res.unwrap();
            // Ψ (padded) through the reduce-scatter and Ψ through the all-gather: 2Ψ.
            assert_eq!((rs, ag), (padded, padded));
            // Bytes on the wire from this rank: (N−1)/N of each, in f32; plus the f64 norm
            // all-reduce of one slot per tree node, at most 2·⌈log2 P⌉ nodes per rank
            // (reduce-scatter + all-gather of ⌈slots/N⌉ f64 each), independent of Ψ's size.
            let w = world as u64;
            let params_bytes = 2 * (w - 1) * 4 * padded / w;
            let slots = w * 2 * (PROBLEM.n_params as f64).log2().ceil() as u64;
            let norm_bytes = 2 * (w - 1) * slots.div_ceil(w) * 8;
            assert!(rep.bytes_communicated > params_bytes);
            assert!(
                rep.bytes_communicated <= params_bytes + norm_bytes,
                "{} vs {params_bytes} + {norm_bytes}",
                rep.bytes_communicated
            );
        }
    }
}

#[test]
fn non_finite_gradient_skips_the_step_on_every_rank() {
    let results = ThreadComm::run(3, TIMEOUT, |c| {
        let p = PROBLEM.n_params;
        let mut params = PROBLEM.init_params();
        let mut z = Zero2::new(c.rank(), 3, p, 128);
        let mut grads: Vec<f32> = (0..p).map(|j| PROBLEM.feature(c.rank(), j)).collect();
        let h = AdamW { step: 1, ..hp(0) };
        z.step(&c, &mut params, &mut grads.clone(), 1.0, Some(1.0), h)?;
        let before = params.clone();
        if c.rank() == 2 {
            grads[17] = f32::NAN; // only one rank sees it
        }
        let sent0 = c.bytes_sent();
        let rep = z.step(
            &c,
            &mut params,
            &mut grads,
            1.0,
            Some(1.0),
            AdamW { step: 2, ..h },
        )?;
        // A skipped step still reduce-scattered the gradient and its norm: it reports what it
        // sent, the transport's own difference (which starts past 0 after the first step).
        assert_eq!(rep.bytes_communicated, c.bytes_sent() - sent0);
        assert!(rep.bytes_communicated > 0);
        Ok((rep, before, params, z.updates()))
    });
    for res in results {
        let (rep, before, after, updates) = res.unwrap();
        assert!(rep.skipped && !rep.grad_norm.is_finite());
        assert_eq!(bits(&before), bits(&after));
        assert_eq!(updates, 1);
    }
}

fn ckpt_cfg(steps: u64, accum: usize, root: &Path) -> ToyRun {
    ToyRun {
        save_every: Some(3),
        ckpt_root: Some(root.to_path_buf()),
        ..run_cfg(steps, accum)
    }
}

#[test]
fn resume_same_world_is_bit_exact_and_reshards_to_other_worlds() {
    let tmp = tempfile::tempdir().unwrap();
    // Uninterrupted world 2, accum 2 (global 4 micro-batches), 6 steps, checkpoint at step 3.
    let full = run_world(2, &ckpt_cfg(6, 2, tmp.path()));
    let ck = checkpoint_dir(tmp.path(), 3);
    assert!(ck.join(MANIFEST_NAME).exists());
    let resumed = |world: usize, accum: usize| {
        let cfg = ToyRun {
            resume: Some(ck.clone()),
            save_every: None,
            ..run_cfg(6, accum)
        };
        run_world(world, &cfg)
    };
    // Same world: bit-exact.
    let same = resumed(2, 2);
    assert_eq!(bits(&same[0].params), bits(&full[0].params));
    assert_eq!(same[0].reports.len(), 3, "resumed at step 3, ran 3 more");
    // World 1 with accum 4 (same global batch): bit-exact too (accumulation is a power of two).
    let one = resumed(1, 4);
    assert_eq!(bits(&one[0].params), bits(&full[0].params));
    // World 4 with accum 1: resharded from 2 shards to 4, still bit-exact.
    let four = resumed(4, 1);
    assert_eq!(bits(&four[3].params), bits(&full[0].params));
    // The continued steps really moved the weights (the comparison is not vacuous).
    let at3 = run_world(2, &run_cfg(3, 2));
    assert!(max_abs_diff(&at3[0].params, &full[0].params) > 1e-2);

    // World 2 → 3 needs a global batch divisible by both: 6 micro-batches, accum 3 at world 2
    // (not a power of two), so world 3 agrees within the rounding tolerance of
    // `other_accumulation_orders_agree_within_rounding`.
    let tmp = tempfile::tempdir().unwrap();
    let full = run_world(2, &ckpt_cfg(6, 3, tmp.path()));
    let ck = checkpoint_dir(tmp.path(), 3);
    let cfg = |accum| ToyRun {
        resume: Some(ck.clone()),
        save_every: None,
        ..run_cfg(6, accum)
    };
    let tol = rounding_tol(&full[0].params);
    for (world, accum) in [(3, 2), (1, 6)] {
        let r = run_world(world, &cfg(accum));
        let d = max_abs_diff(&r[0].params, &full[0].params);
        eprintln!(
            "saved at world 2, resumed at world {world}: max |Δ| = {d:e} (tolerance {tol:e})"
        );
        assert!(d <= tol);
    }
    // Same world again: bit-exact.
    let r = run_world(2, &cfg(3));
    assert_eq!(bits(&r[1].params), bits(&full[1].params));
}

#[test]
fn a_failed_rank_stops_the_others_and_leaves_the_last_checkpoint_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut cfg = ckpt_cfg(9, 2, root);
    cfg.save_every = Some(2);
    let t0 = std::time::Instant::now();
    // Rank 1 dies in the middle of step 5's checkpoint: after its shard is written, before the
    // barrier that precedes the manifest.
    let results = ThreadComm::run(3, Duration::from_secs(60), |c| {
        let mut z_cfg = cfg.clone();
        z_cfg.steps = 5;
        let r = toy::train(&c, &PROBLEM, &z_cfg, &mut |_, _, _| Ok(()))?;
        if c.rank() == 1 {
            r.zero.save_shard(&{
                let d = checkpoint_dir(root, 6);
                std::fs::create_dir_all(&d)?;
                d
            })?;
            anyhow::bail!("killed while checkpointing");
        }
        r.zero.save(&c, &checkpoint_dir(root, 6))?;
        Ok(())
    });
    assert!(t0.elapsed() < Duration::from_secs(10));
    for res in &results {
        assert!(res.is_err(), "every rank must fail");
    }
    let torn = checkpoint_dir(root, 6);
    assert!(
        !torn.join(MANIFEST_NAME).exists(),
        "no manifest for the torn checkpoint"
    );
    let e = format!(
        "{:#}",
        Zero2::load(&torn, 0, 3, PROBLEM.n_params, 64)
            .err()
            .unwrap()
    );
    assert!(e.contains("incomplete"), "{e}");
    let last = toy::latest_checkpoint(root).unwrap().unwrap();
    assert_eq!(last, checkpoint_dir(root, 4));
    // Checkpoints written by the loop are whole directories: shards, manifest, loop state.
    let names: Vec<String> = std::fs::read_dir(&last)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.contains(&"loop.json".to_string()) && names.contains(&MANIFEST_NAME.into()));
    // Resume from the last whole checkpoint at world 3 and finish: matches an uninterrupted run.
    let resumed = run_world(
        3,
        &ToyRun {
            resume: Some(last),
            save_every: None,
            ..cfg.clone()
        },
    );
    let full = run_world(
        3,
        &ToyRun {
            save_every: None,
            ckpt_root: None,
            ..cfg
        },
    );
    assert_eq!(bits(&resumed[0].params), bits(&full[0].params));
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    run_world(2, &ckpt_cfg(3, 1, tmp.path()));
    let ck = checkpoint_dir(tmp.path(), 3);
    let p = PROBLEM.n_params;
    assert!(Zero2::load(&ck, 0, 2, p, 64).is_ok());
    let e = format!("{:#}", Zero2::load(&ck, 0, 2, p + 1, 64).err().unwrap());
    assert!(
        e.contains("1003 trainable parameters") && e.contains("1004"),
        "{e}"
    );
    // Flip one byte of rank 1's shard: loading rank 1's range fails naming the file.
    let f = ck.join(shard_file_name(1, 2));
    let mut b = std::fs::read(&f).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(&f, &b).unwrap();
    let e = format!("{:#}", Zero2::load(&ck, 1, 2, p, 64).err().unwrap());
    assert!(
        e.contains("checksum") && e.contains(&shard_file_name(1, 2)),
        "{e}"
    );
    // Truncate it.
    std::fs::write(&f, &b[..b.len() - 5]).unwrap();
    let e = format!("{:#}", Zero2::load(&ck, 0, 1, p, 64).err().unwrap());
    assert!(e.contains("truncated"), "{e}");
    // Not a shard at all.
    std::fs::write(&f, b"hello").unwrap();
    let e = format!("{:#}", Zero2::load(&ck, 1, 2, p, 64).err().unwrap());
    assert!(e.contains("not a ZeRO-2 shard"), "{e}");
}

#[test]
fn save_checkpoint_is_all_or_nothing_under_its_final_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint_dir(tmp.path(), 7);
    // Rank 2 fails after writing its shard into the temporary directory.
    let results = ThreadComm::run(3, TIMEOUT, |c| {
        let mut params = PROBLEM.init_params();
        let mut z = Zero2::new(c.rank(), 3, PROBLEM.n_params, 64);
        let mut g: Vec<f32> = (0..PROBLEM.n_params)
            .map(|j| PROBLEM.feature(c.rank(), j))
            .collect();
        z.step(
            &c,
            &mut params,
            &mut g,
            1.0,
            None,
            AdamW { step: 1, ..hp(0) },
        )?;
        if c.rank() == 2 {
            c.barrier()?;
            z.save_shard(&zhllama::distributed::zero::tmp_dir(&dir))?;
            anyhow::bail!("killed");
        }
        z.save_checkpoint(&c, &dir, |t| {
            std::fs::write(t.join("weights.bin"), b"loop files")?;
            Ok(())
        })
    });
    assert!(results.iter().all(|r| r.is_err()));
    assert!(!dir.exists(), "no checkpoint under the final name");
    assert_eq!(toy::latest_checkpoint(tmp.path()).unwrap(), None);
    // A successful save replaces the stale temporary directory and produces the whole set.
    let results = ThreadComm::run(3, TIMEOUT, |c| {
        let mut params = PROBLEM.init_params();
        let mut z = Zero2::new(c.rank(), 3, PROBLEM.n_params, 64);
        let mut g: Vec<f32> = (0..PROBLEM.n_params)
            .map(|j| PROBLEM.feature(c.rank(), j))
            .collect();
        z.step(
            &c,
            &mut params,
            &mut g,
            1.0,
            None,
            AdamW { step: 1, ..hp(0) },
        )?;
        z.save_checkpoint(&c, &dir, |t| {
            std::fs::write(t.join("weights.bin"), b"loop files")?;
            Ok(())
        })?;
        Ok(params)
    });
    let params: Vec<Vec<f32>> = results.into_iter().map(|r| r.unwrap()).collect();
    assert!(dir.join(MANIFEST_NAME).exists() && dir.join("weights.bin").exists());
    assert!(!zhllama::distributed::zero::tmp_dir(&dir).exists());
    assert_eq!(
        toy::latest_checkpoint(tmp.path()).unwrap(),
        Some(dir.clone())
    );
    // And it loads back into the same weights at another world size.
    let mut z = Zero2::load(&dir, 0, 1, PROBLEM.n_params, 64).unwrap();
    let mut back = vec![0f32; PROBLEM.n_params];
    z.gather_params(&LocalComm, &mut back).unwrap();
    assert_eq!(bits(&back), bits(&params[0]));
}

/// The newest complete checkpoint is the highest `step-N` with a manifest, whatever the listing
/// order: checked after each of eight checkpoints lands (out of order, beside an incomplete one, a
/// `.tmp` one and a stray directory). A root that does not exist has none.
#[test]
fn latest_checkpoint_is_the_highest_complete_step() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    assert_eq!(latest_checkpoint(&root).unwrap(), None);
    std::fs::create_dir_all(root.join("notes")).unwrap();
    assert_eq!(latest_checkpoint(&root).unwrap(), None);
    let complete = |step: u64| {
        let d = checkpoint_dir(&root, step);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(MANIFEST_NAME), "{}").unwrap();
    };
    // No manifest yet (a save in progress), and a staging directory with one.
    std::fs::create_dir_all(checkpoint_dir(&root, 900)).unwrap();
    let staged = root.join("step-000901.tmp");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(staged.join(MANIFEST_NAME), "{}").unwrap();
    // A root that is a file is an error naming it, not "no checkpoint".
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let err = format!("{:#}", latest_checkpoint(&file).unwrap_err());
    assert!(err.contains("not-a-dir"), "{err}");
    let mut newest = 0;
    for step in [3u64, 40, 7, 41, 100, 12, 250, 99] {
        complete(step);
        newest = newest.max(step);
        assert_eq!(
            latest_checkpoint(&root).unwrap(),
            Some(checkpoint_dir(&root, newest)),
            "after step {step}"
        );
    }
}

/// The global sum of squares with one extra slot per rank: with every extra 0 it is the world-1
/// tree sum bit for bit; a non-finite extra on any one rank makes it non-finite on every rank
/// (how one rank's bad loss skips the step everywhere); finite extras are added (to within the
/// rounding of one f64 addition of values ≤ 1e3: 1e-12 relative).
#[test]
fn extra_slots_of_the_global_sum_of_squares() {
    let p = PROBLEM.n_params;
    let full: Vec<f32> = (0..p).map(|j| PROBLEM.feature(5, j)).collect();
    let want = tree_sum_squares(&full);
    for world in 2..=4 {
        let layout = zhllama::distributed::ShardLayout::new(p, world);
        let cases: Vec<Vec<f64>> = std::iter::once(vec![0.0; world])
            .chain((0..world).map(|bad| {
                (0..world)
                    .map(|r| if r == bad { f64::NAN } else { 0.0 })
                    .collect()
            }))
            .chain(std::iter::once(
                (0..world).map(|r| (r + 1) as f64 * 0.75).collect(),
            ))
            .collect();
        for extras in cases {
            let results = ThreadComm::run(world, TIMEOUT, |c| {
                let rank = c.rank();
                let shard = &full[layout.range(rank)];
                global_sum_squares_with(
                    &c,
                    &layout,
                    rank,
                    |lo, hi| Ok(tree_sum_squares(&shard[lo..hi])),
                    Some(extras[rank]),
                )
            });
            let extra: f64 = extras.iter().sum();
            for (rank, r) in results.into_iter().enumerate() {
                let got = r.unwrap();
                if extra.is_nan() {
                    assert!(got.is_nan(), "world {world} rank {rank} {extras:?}: {got}");
                } else if extra == 0.0 {
                    assert_eq!(got.to_bits(), want.to_bits(), "world {world} rank {rank}");
                } else {
                    let e = want + extra;
                    assert!(
                        (got - e).abs() <= 1e-12 * e,
                        "world {world} rank {rank} {extras:?}: {got} vs {e}"
                    );
                }
            }
        }
    }
}

/// A staging directory left by a crashed save is cleared before a save uses it (at world 1 too:
/// rank 0 prepares it), so nothing stale ends up under the final name.
#[test]
fn a_stale_staging_directory_is_cleared_before_a_save() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("step-000001");
    let staging = zhllama::distributed::zero::tmp_dir(&dir);
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("stale.bin"), b"from a crashed save").unwrap();
    let p = PROBLEM.n_params;
    let mut params = PROBLEM.init_params();
    let mut g: Vec<f32> = (0..p).map(|j| PROBLEM.feature(0, j)).collect();
    let mut z = Zero2::new(0, 1, p, 64);
    z.step(
        &LocalComm,
        &mut params,
        &mut g,
        1.0,
        None,
        AdamW { step: 1, ..hp(0) },
    )
    .unwrap();
    z.save_checkpoint(&LocalComm, &dir, |_| Ok(())).unwrap();
    assert!(dir.join(MANIFEST_NAME).exists());
    assert!(!dir.join("stale.bin").exists(), "the stale file was kept");
    assert!(!staging.exists());
}
