//! The distributed runtime across real processes: `mpirun -np N zero-check ...` (the driver in
//! `tools/zero_check.rs`, built with `--features mpi`). Skips with a message when the build has
//! no MPI or `mpirun` is not installed (`tools/test.sh` installs OpenMPI and builds the feature).

mod skip_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use zhllama::backend::AdamW;
use zhllama::distributed::ThreadComm;
use zhllama::distributed::toy::{self, ToyProblem, ToyRun, checkpoint_dir};
use zhllama::distributed::zero::MANIFEST_NAME;

/// The driver's default toy problem (`zero-check toy` flags' defaults).
const PROBLEM: ToyProblem = ToyProblem {
    n_params: 1003,
    n_frozen: 5,
    n_examples: 97,
    seed: 42,
};

/// One mpirun at a time: the machine has 2 cores.
static MPIRUN: Mutex<()> = Mutex::new(());

fn driver() -> Option<&'static str> {
    // Cargo names the driver even when `required-features` kept it from being built, so the
    // library's own flag says whether this build has MPI.
    let bin = match option_env!("CARGO_BIN_EXE_zero-check") {
        Some(b) if zhllama::distributed::MPI_ENABLED && Path::new(b).exists() => b,
        _ => {
            skip_common::skip("built without --features mpi (no zero-check driver)");
            return None;
        }
    };
    let found = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip_common::skip("mpirun not found (tools/test.sh installs OpenMPI)");
        return None;
    }
    Some(bin)
}

struct Run {
    ok: bool,
    code: Option<i32>,
    stderr: String,
    secs: f64,
}

/// `mpirun -np n zero-check args…`, killed after 120 s.
fn mpirun(bin: &str, n: usize, args: &[&str]) -> Run {
    let _one = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let mut child = Command::new("mpirun")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "-np", &n.to_string(), bin])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mpirun");
    let out = loop {
        if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            break child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stderr,
        secs: t.elapsed().as_secs_f64(),
    }
}

fn toy_args<'a>(steps: &'a str, accum: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["toy", "--steps", steps, "--accum", accum, "--out", out]
}

fn read_params(out: &Path) -> Vec<u32> {
    std::fs::read(out)
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn read_report(out: &Path) -> serde_json::Value {
    let mut j = out.as_os_str().to_owned();
    j.push(".json");
    serde_json::from_slice(&std::fs::read(PathBuf::from(j)).unwrap()).unwrap()
}

fn max_abs_diff(a: &[u32], b: &[u32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f32::from_bits(*x) - f32::from_bits(*y)).abs())
        .fold(0.0, f32::max)
}

/// The same toy run in-process at world 1 (the independent transport to compare with).
fn in_process(steps: u64, accum: usize) -> Vec<u32> {
    let cfg = ToyRun {
        steps,
        micro: 2,
        accum,
        hp: AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 0,
        },
        max_norm: Some(1.0),
        bucket_elems: 256,
        pairwise: true,
        save_every: None,
        ckpt_root: None,
        resume: None,
    };
    let mut r = ThreadComm::run(1, Duration::from_secs(30), |c| {
        toy::train(&c, &PROBLEM, &cfg, &mut |_, _, _| Ok(()))
    });
    r.remove(0)
        .unwrap()
        .params
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn collectives_at_world_2_3_4() {
    let Some(bin) = driver() else { return };
    for n in [2, 3, 4] {
        let r = mpirun(bin, n, &["collectives"]);
        assert!(r.ok, "world {n}: {}", r.stderr);
        assert!(r.stderr.contains(&format!("collectives ok at world {n}")));
    }
}

/// World 2 and 3 against world 1 with the same global batch: bit-identical weights, identical
/// to the in-process run; each rank's optimizer state is ⌈P/N⌉ elements as measured in the
/// processes; the bytes each step sends are the reduce-scatter + all-gather of the trainable
/// buffer (plus the small f64 norm all-reduce).
#[test]
fn worlds_2_and_3_match_world_1_bit_for_bit() {
    let Some(bin) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = |name: &str| tmp.path().join(name).display().to_string();
    let (o1, o2, o3) = (out("w1"), out("w2"), out("w3"));
    for (n, accum, o) in [(1, "4", &o1), (2, "2", &o2), (3, "4", &o3)] {
        let r = mpirun(bin, n, &toy_args("5", accum, o));
        assert!(r.ok, "world {n}: {}", r.stderr);
    }
    // world 3 accum 4 has global batch 12 micro-batches: compare with world 1 accum 12.
    let o1b = out("w1b");
    let r = mpirun(bin, 1, &toy_args("5", "12", &o1b));
    assert!(r.ok, "{}", r.stderr);
    let w1 = read_params(Path::new(&o1));
    assert_eq!(
        read_params(Path::new(&o2)),
        w1,
        "world 2 accum 2 vs world 1 accum 4"
    );
    assert_eq!(
        read_params(Path::new(&o3)),
        read_params(Path::new(&o1b)),
        "world 3 vs 1"
    );
    assert_eq!(w1, in_process(5, 4), "MPI world 1 vs in-process world 1");
    assert_eq!(read_params(Path::new(&o3)), in_process(5, 12));

    for (n, o) in [(2usize, &o2), (3, &o3)] {
        let rep = read_report(Path::new(o));
        let s = PROBLEM.n_params.div_ceil(n);
        for (r, lens) in rep["state_lens_per_rank"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let lens: Vec<usize> = serde_json::from_value(lens.clone()).unwrap();
            assert_eq!(
                lens,
                vec![s; 4],
                "world {n} rank {r}: master, m, v, grad lengths"
            );
        }
        let padded = (s * n) as u64;
        let psi_bytes = 2 * (n as u64 - 1) * 4 * padded / n as u64;
        // f64 norm all-reduce: ≤ 2·⌈log2 P⌉ slots per rank, reduce-scattered and all-gathered.
        let slots = n as u64 * 2 * 10;
        let norm_bytes = 2 * (n as u64 - 1) * slots.div_ceil(n as u64) * 8;
        for b in rep["bytes_per_step"].as_array().unwrap() {
            let b = b.as_u64().unwrap();
            assert!(
                b > psi_bytes && b <= psi_bytes + norm_bytes,
                "world {n}: {b} bytes"
            );
        }
    }
}

/// Kill one rank (SIGKILL) mid-run: the job ends non-zero within 60 s, the last checkpoint is
/// whole, and resuming from it reproduces the uninterrupted run bit for bit.
#[test]
fn killed_rank_ends_the_job_and_the_last_checkpoint_resumes() {
    let Some(bin) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let ck_s = ck.display().to_string();
    let out = tmp.path().join("out").display().to_string();
    let base = ["--save-every", "2", "--ckpt", &ck_s];
    let mut args = toy_args("9", "2", &out);
    args.extend(base);
    args.extend(["--die-at", "5", "--die-how", "kill"]);
    let r = mpirun(bin, 3, &args);
    assert!(!r.ok, "the job must fail: {}", r.stderr);
    assert!(r.secs < 60.0, "took {} s", r.secs);
    assert!(
        r.stderr.contains("rank 1") && r.stderr.contains("Killed"),
        "{}",
        r.stderr
    );
    let last = toy::latest_checkpoint(&ck).unwrap().unwrap();
    assert_eq!(last, checkpoint_dir(&ck, 4));
    // Resume at world 3 and finish.
    let mut args = toy_args("9", "2", &out);
    args.extend(base);
    args.push("--resume-latest");
    let r = mpirun(bin, 3, &args);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(read_report(Path::new(&out))["steps_run"], 5);
    let resumed = read_params(Path::new(&out));
    let full_out = tmp.path().join("full").display().to_string();
    let r = mpirun(bin, 3, &toy_args("9", "2", &full_out));
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(resumed, read_params(Path::new(&full_out)));
}

/// A rank that errors (MPI_Abort), one killed while writing a checkpoint (the torn checkpoint
/// stays in `step-N.tmp`, never picked), and one that hangs (the others' watchdog ends the job).
#[test]
fn errors_torn_checkpoints_and_hangs_end_the_job() {
    let Some(bin) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out").display().to_string();
    let mut args = toy_args("9", "2", &out);
    args.extend(["--die-at", "3", "--die-how", "error"]);
    let r = mpirun(bin, 2, &args);
    assert!(!r.ok && r.secs < 60.0);
    assert!(
        r.stderr
            .contains("rank 1 of 2: failing on purpose after step 3"),
        "{}",
        r.stderr
    );

    let ck = tmp.path().join("ck");
    let ck_s = ck.display().to_string();
    let mut args = toy_args("9", "2", &out);
    args.extend(["--save-every", "2", "--ckpt", &ck_s]);
    args.extend(["--die-at", "5", "--die-how", "kill-in-save"]);
    let r = mpirun(bin, 3, &args);
    assert!(!r.ok && r.secs < 60.0, "{}", r.stderr);
    assert!(
        !checkpoint_dir(&ck, 5).exists(),
        "the torn checkpoint never gets its name"
    );
    let tmp5 = zhllama::distributed::zero::tmp_dir(&checkpoint_dir(&ck, 5));
    assert!(!tmp5.join(MANIFEST_NAME).exists());
    assert_eq!(
        toy::latest_checkpoint(&ck).unwrap().unwrap(),
        checkpoint_dir(&ck, 4)
    );

    let mut args = vec!["--watchdog", "5"];
    args.extend(toy_args("9", "2", &out));
    args.extend(["--die-at", "3", "--die-how", "hang"]);
    let r = mpirun(bin, 2, &args);
    assert!(!r.ok && r.secs < 60.0, "took {} s", r.secs);
    assert!(r.stderr.contains("has waited"), "{}", r.stderr);
    assert_ne!(r.code, Some(0));
}

/// Save at world 2, resume at world 3 and 1: matches the uninterrupted world-2 run. Global batch
/// 6 micro-batches: world 2 accumulates 3 (not a power of two), so the gradient sums associate
/// differently — the tolerance of `distributed_zero::rounding_tol` (16 ulps of the largest weight;
/// measured 1.5e-8 here, one ulp). With 4 micro-batches (world 2 × 2 vs world 1 × 4) it is
/// bit-exact.
#[test]
fn save_at_world_2_resume_at_3_and_1() {
    let Some(bin) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let ck_s = ck.display().to_string();
    let o = |n: &str| tmp.path().join(n).display().to_string();
    let (full, r3, r1) = (o("full"), o("r3"), o("r1"));
    let mut args = toy_args("6", "3", &full);
    args.extend(["--save-every", "3", "--ckpt", &ck_s]);
    assert!(mpirun(bin, 2, &args).ok);
    let at3 = checkpoint_dir(&ck, 3).display().to_string();
    for (n, accum, out) in [(3, "2", &r3), (1, "6", &r1)] {
        let mut args = toy_args("6", accum, out);
        args.extend(["--resume", &at3]);
        let r = mpirun(bin, n, &args);
        assert!(r.ok, "{}", r.stderr);
        assert_eq!(read_report(Path::new(out))["steps_run"], 3);
        let want = read_params(Path::new(&full));
        let d = max_abs_diff(&read_params(Path::new(out)), &want);
        let tol = 16.0
            * f32::EPSILON
            * want
                .iter()
                .fold(0f32, |m, &w| m.max(f32::from_bits(w).abs()));
        eprintln!("saved at world 2, resumed at world {n}: max |Δ| {d:e} (tolerance {tol:e})");
        assert!(d <= tol);
    }
    // Bit-exact case: accumulation 2 at world 2 ↔ 4 at world 1.
    let ck2 = tmp.path().join("ck2");
    let ck2_s = ck2.display().to_string();
    let (full2, r12) = (o("full2"), o("r12"));
    let mut args = toy_args("6", "2", &full2);
    args.extend(["--save-every", "3", "--ckpt", &ck2_s]);
    assert!(mpirun(bin, 2, &args).ok);
    let mut args = toy_args("6", "4", &r12);
    let at3 = checkpoint_dir(&ck2, 3).display().to_string();
    args.extend(["--resume", &at3]);
    assert!(mpirun(bin, 1, &args).ok);
    assert_eq!(read_report(Path::new(&r12))["steps_run"], 3);
    assert_eq!(read_params(Path::new(&r12)), read_params(Path::new(&full2)));
}
