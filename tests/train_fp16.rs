//! fp16 mode: the dynamic loss scaler against DeepSpeed's own `DynamicLossScaler`
//! (tests/fixtures/loss_scale_reference.json, written by tools/oracle/make_loss_scale_reference.py),
//! the trainer's skip pattern, scale trajectory and untouched weights on overflow, bit-identity
//! with the fp32 mode when nothing overflows, exact resume; and the device gradient accumulator
//! against the host one.

mod train_common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::zero::DeviceAccumulator;
use zhllama::distributed::{Comm, GradAccumulator, LocalComm, ThreadComm};
use zhllama::train::checkpoint::{self, TrainerState};
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::data::Data;
use zhllama::train::loss_scale::{DynamicLossScaler, ScaleUpdate};
use zhllama::train::schedule::CosineSchedule;
use zhllama::train::trainer::{RunOptions, Trainer};
use zhllama::train::{metrics, setup};

fn fixture() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loss_scale_reference.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn case<'a>(fx: &'a Value, name: &str) -> &'a Value {
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in the fixture"))
}

fn flags(v: &Value) -> Vec<bool> {
    v.as_str().unwrap().chars().map(|c| c == '1').collect()
}

/// A float of the fixture: a Python repr string (exact through Rust's correctly rounded parse).
fn float(v: &Value) -> f64 {
    v.as_str()
        .unwrap_or_else(|| panic!("{v} is not a float string"))
        .parse()
        .unwrap()
}

fn scaler_of(cfg: &Value) -> DynamicLossScaler {
    DynamicLossScaler::new(
        cfg["initial_scale_power"].as_i64().unwrap() as i32,
        cfg["loss_scale_window"].as_u64().unwrap(),
        cfg["hysteresis"].as_u64().unwrap() as u32,
        float(&cfg["min_loss_scale"]),
        cfg["consecutive_hysteresis"].as_bool().unwrap(),
    )
    .unwrap()
}

#[test]
fn scaler_matches_deepspeed_exactly() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let mut s = scaler_of(&c["config"]);
        let overflow = flags(&c["overflow"]);
        let raises = flags(&c["would_raise"]);
        let hyst: Vec<u32> = c["hysteresis_after"]
            .as_str()
            .unwrap()
            .chars()
            .map(|ch| ch.to_digit(10).unwrap())
            .collect();
        let scales = c["scale_before"].as_array().unwrap();
        assert_eq!(overflow.len(), scales.len());
        for (i, &o) in overflow.iter().enumerate() {
            // Exact: DeepSpeed's scale is a Python float; JSON round-trips f64 exactly.
            assert_eq!(
                s.scale(),
                float(&scales[i]),
                "{name}: scale before step {i}"
            );
            let u = s.update(o);
            // The scaler treats exactly the overflowing steps as overflows (the skip itself is the
            // trainer's: checked against the fixture's `skipped` in
            // `overflow_skips_follow_deepspeed_and_leave_the_weights_alone`).
            assert_eq!(
                matches!(
                    u,
                    ScaleUpdate::HysteresisUsed | ScaleUpdate::Decreased | ScaleUpdate::AtMinimum
                ),
                o,
                "{name}: step {i}: {u:?}"
            );
            assert_eq!(
                u == ScaleUpdate::AtMinimum,
                raises[i],
                "{name}: step {i}: DeepSpeed raises at min scale iff AtMinimum ({u:?})"
            );
            assert_eq!(s.cur_hysteresis, hyst[i], "{name}: hysteresis after {i}");
        }
        let f = &c["final"];
        assert_eq!(s.cur_scale, float(&f["cur_scale"]), "{name}");
        assert_eq!(s.cur_iter, f["cur_iter"].as_u64().unwrap(), "{name}");
        assert_eq!(
            s.last_overflow_iter,
            f["last_overflow_iter"].as_i64().unwrap(),
            "{name}"
        );
        assert_eq!(
            s.cur_hysteresis as u64,
            f["cur_hysteresis"].as_u64().unwrap(),
            "{name}"
        );
    }
    // The fixture covers what it claims: a raise at min scale and the recipe's 1e-10 clamp.
    assert!(flags(&case(&fx, "min_scale_1")["would_raise"]).contains(&true));
    let r = case(&fx, "recipe_min_1e-10");
    assert_eq!(float(&r["final"]["cur_scale"]), 1e-10);
}

#[test]
fn config_defaults_are_deepspeeds_and_presets_the_recipes() {
    let fx = fixture();
    let d = &fx["config_defaults"];
    let c = TrainConfig::default();
    assert!(!c.fp16);
    assert_eq!(
        (
            c.initial_scale_power as i64,
            c.loss_scale_window,
            c.hysteresis as u64,
            c.min_loss_scale
        ),
        (
            d["initial_scale_power"].as_i64().unwrap(),
            d["loss_scale_window"].as_u64().unwrap(),
            d["hysteresis"].as_u64().unwrap(),
            float(&d["min_loss_scale"])
        )
    );
    // docs/RECIPE.md §3 / ds_zero2_no_offload.json: initial 2^16, window 100, hysteresis 2, min 1e-10.
    for stage in [Stage::Pt1, Stage::Pt2, Stage::Sft] {
        let p = TrainConfig::preset(stage);
        assert_eq!(
            (
                p.initial_scale_power,
                p.loss_scale_window,
                p.hysteresis,
                p.min_loss_scale
            ),
            (16, 100, 2, 1e-10)
        );
        let mut on = p.clone();
        on.set("fp16", "true").unwrap();
        assert!(on.fp16);
        on.validate().unwrap();
    }
    let mut bad = TrainConfig::preset(Stage::Pt2);
    bad.set("fp16", "true").unwrap();
    bad.set("loss-scale-window", "0").unwrap();
    let e = format!("{:#}", bad.validate().unwrap_err());
    assert!(e.contains("loss_scale_window"), "{e}");
}

#[test]
fn device_accumulator_is_bit_identical_to_the_host_one() {
    let be = CpuBackend::new();
    let n = 777;
    let mut lcg = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        lcg = lcg
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // magnitudes spread over ~12 binades so the additions round
        let u = (lcg >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        u * 2f32.powi(((lcg >> 20) % 12) as i32 - 6)
    };
    let mut dev = DeviceAccumulator::<CpuBackend>::new(n);
    let mut host = GradAccumulator::new(n);
    // Several rounds so spare buffers are reused (and must come back zeroed).
    for a in [0usize, 1, 2, 3, 4, 5, 7, 8, 9, 16, 6] {
        for _ in 0..a {
            let g: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let mut buf = dev.take(&be).unwrap();
            let mut z = vec![1.0f32; n];
            be.download(&buf, &mut z).unwrap();
            assert!(z.iter().all(|&x| x == 0.0), "take() lends a zeroed buffer");
            // the backward accumulates (`+=`) into the lent buffer
            be.axpy(
                be.view_mut(&mut buf, 0..n),
                1.0,
                be.view(&upload(&be, &g), 0..n),
            );
            dev.push(&be, buf).unwrap();
            host.push(&g).unwrap();
        }
        assert_eq!(dev.count(), a);
        let (mut d, mut h) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        dev.finish(&be, &mut d).unwrap();
        host.finish(&mut h).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d), bits(&h), "{a} micro-batches");
    }
}

fn upload(be: &CpuBackend, g: &[f32]) -> <CpuBackend as Backend>::Buf {
    let mut b = be
        .alloc(g.len(), zhllama::backend::Role::Fp32)
        .expect("alloc");
    be.upload(&mut b, g).unwrap();
    b
}

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    data: Data,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = train_common::tiny_model(&root.join("m"), 64, 5);
    let data = Data::open(&train_common::pretrain_data(&root.join("d"), 64, 16)).unwrap();
    Env {
        _tmp: tmp,
        root,
        model,
        data,
    }
}

/// LoRA with dropout (so the RNG matters), accumulation 2, warmup then decay (so the LR
/// changes every step).
fn cfg(fp16: bool) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        micro_batch_size: 2,
        max_steps: 14,
        save_steps: 5,
        lora_rank: 4,
        lora_dropout: 0.1,
        learning_rate: 1e-2,
        warmup_steps: 4,
        fp16,
        ..TrainConfig::preset(Stage::Pt2)
    }
}

fn trainer<'a>(
    e: &'a Env,
    c: &TrainConfig,
    out: &str,
    resume: Option<&Path>,
) -> Trainer<'a, CpuBackend> {
    let be = Arc::new(CpuBackend::new());
    let model = setup::load_model(be, &e.model, c, Stage::Pt2, 64, None).unwrap();
    Trainer::new(
        model,
        &e.data,
        c.clone(),
        Stage::Pt2,
        &LocalComm,
        &e.root.join(out),
        resume,
    )
    .unwrap()
}

fn scaler_cfg(c: &mut TrainConfig, fx_case: &Value) {
    let k = &fx_case["config"];
    c.initial_scale_power = k["initial_scale_power"].as_i64().unwrap() as i32;
    c.loss_scale_window = k["loss_scale_window"].as_u64().unwrap();
    c.hysteresis = k["hysteresis"].as_u64().unwrap() as u32;
    c.min_loss_scale = float(&k["min_loss_scale"]);
}

#[test]
fn overflow_skips_follow_deepspeed_and_leave_the_weights_alone() {
    let e = env();
    let fx = fixture();
    let want = case(&fx, "trainer_run");
    let overflow = flags(&want["overflow"]);
    // The steps DeepSpeed's ZeRO-2 skipped (its `step()` returns early on an overflow).
    let ds_skipped = flags(&want["skipped"]);
    assert_eq!(ds_skipped.len(), overflow.len());
    let scales = want["scale_before"].as_array().unwrap();
    let mut c = cfg(true);
    scaler_cfg(&mut c, want);
    c.max_steps = overflow.len() as u64;
    let mut t = trainer(&e, &c, "o", None);
    let sched = CosineSchedule {
        base_lr: c.learning_rate,
        warmup_steps: c.warmup(),
        total_steps: c.max_steps,
    };
    for (i, &o) in overflow.iter().enumerate() {
        let before = t.params().to_vec();
        let updates = t.zero().updates();
        let rec = t.step_injected(false, o).unwrap();
        assert_eq!(
            rec.loss_scale,
            Some(float(&scales[i])),
            "step {i}: the scale DeepSpeed runs this step with"
        );
        // The trainer's own decision (from the gradient it sees) against DeepSpeed's.
        assert_eq!(rec.skipped, Some(ds_skipped[i]), "step {i}");
        assert!(rec.loss.unwrap().is_finite(), "an overflow keeps the loss");
        // DeepSpeed's engine does not step the LR scheduler on an overflow: every step runs
        // at the schedule's position of the updates applied before it, not of the step count.
        assert_eq!(rec.lr, Some(sched.lr(updates)), "step {i}");
        if o {
            assert!(before == t.params(), "step {i}: skipped, weights untouched");
            assert_eq!(
                t.zero().updates(),
                updates,
                "step {i}: Adam step count kept"
            );
            assert_eq!(t.state().consecutive_skips, 0, "overflows do not count");
        } else {
            if rec.lr.unwrap() > 0.0 {
                assert!(before != t.params(), "step {i}: applied");
            }
            assert_eq!(t.zero().updates(), updates + 1);
        }
    }
    assert_eq!(
        t.state().loss_scaler.as_ref().unwrap().scale(),
        float(&want["final"]["cur_scale"])
    );
    assert_eq!(t.state().skipped_steps, 4);
}

#[test]
fn a_real_overflow_is_caught_and_the_scale_comes_down() {
    // 2^130, 2^129 and 2^128 are beyond f32's range: the seeded backward is Inf/NaN, however
    // small the gradient, while the (unscaled) loss stays finite.
    let e = env();
    let mut c = cfg(true);
    c.initial_scale_power = 130;
    c.hysteresis = 1;
    let mut t = trainer(&e, &c, "r", None);
    let p0 = t.params().to_vec();
    for k in 0..3 {
        let rec = t.step(false).unwrap();
        assert_eq!(rec.loss_scale, Some(2f64.powi(130 - k)));
        assert_eq!(rec.skipped, Some(true));
        assert!(rec.loss.unwrap().is_finite());
        assert!(!rec.grad_norm.unwrap().is_finite());
    }
    assert!(p0 == t.params());
    assert_eq!(
        t.state().loss_scaler.as_ref().unwrap().scale(),
        2f64.powi(127)
    );
}

#[test]
fn without_overflow_fp16_is_bit_identical_to_fp32() {
    // Multiplying by a power of two and dividing back is exact in binary floating point (only
    // the exponent changes) barring overflow and underflow into the subnormals; every op of the
    // backward is linear in the seed and the accumulation, the reduce and the unscale commute
    // with it, so the weights must agree bit for bit. Window 2 makes the scale change mid-run.
    let e = env();
    let steps = 6;
    let mut a = trainer(&e, &cfg(false), "a", None);
    let mut c16 = cfg(true);
    c16.loss_scale_window = 2;
    let mut b = trainer(&e, &c16, "b", None);
    let mut seen = Vec::new();
    for i in 0..steps {
        let ra = a.step(false).unwrap();
        let rb = b.step(false).unwrap();
        assert_eq!(ra.loss.map(f64::to_bits), rb.loss.map(f64::to_bits), "{i}");
        assert_eq!(
            ra.grad_norm.map(f64::to_bits),
            rb.grad_norm.map(f64::to_bits),
            "{i}"
        );
        assert_eq!(ra.lr, rb.lr, "{i}");
        assert!(a.params() == b.params(), "step {i}: weights differ");
        assert_eq!(ra.loss_scale, None);
        seen.push(rb.loss_scale.unwrap());
    }
    assert_eq!(
        seen,
        [65536.0, 65536.0, 65536.0, 131072.0, 131072.0, 262144.0]
    );
}

#[test]
fn abort_counts_overflows_only_at_the_minimum_scale() {
    let e = env();
    // Overflows above the minimum do not count: six in a row with max_consecutive_skips 2.
    let mut c = cfg(true);
    c.max_steps = 8;
    c.max_consecutive_skips = 2;
    c.save_steps = 0;
    let mut t = trainer(&e, &c, "x", None);
    let s = t
        .run(&RunOptions {
            inject_overflow_steps: (0..6).collect(),
            ..RunOptions::default()
        })
        .unwrap();
    assert_eq!((s.step, s.skipped_steps), (8, 6));
    // NaN losses still count in fp16 mode.
    let mut t = trainer(&e, &c, "y", None);
    let err = t
        .run(&RunOptions {
            inject_nonfinite_steps: (0..8).collect(),
            ..RunOptions::default()
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("2 consecutive"), "{err:#}");
    assert_eq!(t.state().step, 2);
    // At the minimum scale (2 → 1 at step 0, then nowhere to go) overflows count: DeepSpeed
    // raises on the first; here the run stops after max_consecutive_skips of them.
    c.initial_scale_power = 1;
    c.min_loss_scale = 1.0;
    c.hysteresis = 1;
    let mut t = trainer(&e, &c, "z", None);
    let overflow_all = RunOptions {
        inject_overflow_steps: (0..8).collect(),
        ..RunOptions::default()
    };
    let err = format!("{:#}", t.run(&overflow_all).unwrap_err());
    assert!(
        err.contains("2 consecutive") && err.contains("minimum loss scale"),
        "{err}"
    );
    assert_eq!(t.state().step, 3);
}

#[test]
fn fp16_resume_mid_run_is_exact_and_old_states_load() {
    let e = env();
    let fx = fixture();
    let pattern = case(&fx, "trainer_run");
    let inject: Vec<u64> = flags(&pattern["overflow"])
        .iter()
        .enumerate()
        .filter(|(_, o)| **o)
        .map(|(i, _)| i as u64)
        .collect();
    let mut c = cfg(true);
    scaler_cfg(&mut c, pattern);
    // uninterrupted
    let mut full = trainer(&e, &c, "full", None);
    let sf = full
        .run(&RunOptions {
            inject_overflow_steps: inject.clone(),
            ..RunOptions::default()
        })
        .unwrap();
    // stopped after 5 steps (checkpoint-5, scaler mid-hysteresis), then resumed
    let mut first = trainer(&e, &c, "split", None);
    first
        .run(&RunOptions {
            stop_after: Some(5),
            inject_overflow_steps: inject.clone(),
            ..RunOptions::default()
        })
        .unwrap();
    let cp = checkpoint::checkpoint_dir(&e.root.join("split"), 5);
    let saved = checkpoint::verify(&cp).unwrap();
    assert_eq!(
        saved.loss_scaler.as_ref(),
        first.state().loss_scaler.as_ref()
    );
    drop(first);
    let mut second = trainer(&e, &c, "split", Some(&cp));
    let s2 = second
        .run(&RunOptions {
            resume_from: Some(cp.clone()),
            inject_overflow_steps: inject,
            ..RunOptions::default()
        })
        .unwrap();
    assert!(
        full.params() == second.params(),
        "weights differ after resume"
    );
    assert_eq!(full.state(), second.state());
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&sf.losses[5..]), bits(&s2.losses));
    let key = |r: &metrics::Record| (r.step, r.loss.map(f64::to_bits), r.loss_scale);
    let ma: Vec<_> = metrics::read(&e.root.join("full/metrics.jsonl"))
        .unwrap()
        .iter()
        .map(key)
        .collect();
    let mb: Vec<_> = metrics::read(&e.root.join("split/metrics.jsonl"))
        .unwrap()
        .iter()
        .map(key)
        .collect();
    assert_eq!(ma, mb);
    assert!(ma.iter().filter(|k| k.1.is_some()).all(|k| k.2.is_some()));

    // A trainer state written before the fp16 mode existed (no scaler, no fp16 keys) loads.
    let last = &checkpoint::list(&e.root.join("full")).unwrap()[0].1;
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(last.join(checkpoint::STATE_FILE)).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("loss_scaler");
    let cfgv = o["config"].as_object_mut().unwrap();
    for k in [
        "fp16",
        "initial_scale_power",
        "loss_scale_window",
        "hysteresis",
        "min_loss_scale",
    ] {
        assert!(cfgv.remove(k).is_some(), "{k}");
    }
    let old: TrainerState = serde_json::from_value(v).unwrap();
    assert_eq!(old.loss_scaler, None);
    assert!(!old.config.fp16);
}

/// (weights, losses, scaler) of an fp16 run whose gradient overflows at steps 1, 2 and 4 on the
/// last rank only.
fn run_world(comm: &dyn Comm, e: &Env, out: &str) -> (Vec<f32>, Vec<f64>, DynamicLossScaler) {
    let mut c = cfg(true);
    c.max_steps = 7;
    c.loss_scale_window = 2;
    c.micro_batch_size = 1;
    c.world_size = comm.world_size();
    let m = setup::load_model(
        Arc::new(CpuBackend::new()),
        &e.model,
        &c,
        Stage::Pt2,
        64,
        None,
    )
    .unwrap();
    let mut t = Trainer::new(m, &e.data, c, Stage::Pt2, comm, &e.root.join(out), None).unwrap();
    // Only the last rank overflows; the step must be skipped everywhere.
    let last_rank = comm.rank() + 1 == comm.world_size();
    let s = t
        .run(&RunOptions {
            inject_overflow_steps: if last_rank { vec![1, 2, 4] } else { Vec::new() },
            ..RunOptions::default()
        })
        .unwrap();
    assert_eq!(s.skipped_steps, 3, "rank {}", comm.rank());
    let scaler = t.state().loss_scaler.clone().unwrap();
    (t.params().to_vec(), s.losses, scaler)
}

#[test]
fn an_overflow_on_one_rank_skips_everywhere_and_worlds_agree() {
    let e = env();
    let (w1, l1, s1) = run_world(&LocalComm, &e, "w1");
    let res = ThreadComm::run(2, Duration::from_secs(60), |comm| {
        Ok(run_world(&comm, &e, "w2"))
    });
    for (rank, r) in res.into_iter().enumerate() {
        let (w, l, s) = r.unwrap();
        assert!(w == w1, "rank {rank}: weights differ from world 1");
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&l), bits(&l1), "rank {rank}: losses differ");
        assert_eq!(s, s1, "rank {rank}: loss scaler out of step");
    }
}
