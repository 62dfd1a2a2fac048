//! The real training loop (`zhllama train`, a tiny LLaMA with LoRA) across processes under
//! `mpirun`: world 2 and 3 against world 1 with the same global batch, a rank killed mid-run,
//! save at world 2 and resume at world 3 and 1. Skips with a message when the build has no MPI
//! or `mpirun` is missing (`tools/test.sh` installs OpenMPI and builds `--features mpi`).

mod skip_common;

mod train_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use zhllama::distributed::{LocalComm, Zero2};
use zhllama::train::checkpoint;

/// One mpirun at a time: the machine has 2 cores.
static MPIRUN: Mutex<()> = Mutex::new(());

const LR: f32 = 1e-3;
/// Resumed-loss tolerance of `save_at_world_2_resume_at_world_3_and_1` (relative): the losses
/// are f64 means of f32 per-token cross-entropies computed from weights that differ by rounding
/// only, so they agree to a few f32 ulps (2⁻²⁴ ≈ 6e-8 each); measured: equal. Four ulps.
const LOSS_RTOL: f64 = 2.4e-7;

fn have_mpi() -> bool {
    if !zhllama::distributed::MPI_ENABLED {
        skip_common::skip("built without --features mpi");
        return false;
    }
    let found = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip_common::skip("mpirun not found (tools/test.sh installs OpenMPI)");
    }
    found
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = train_common::tiny_model(&root.join("model"), 64, 11);
    let data = train_common::pretrain_data(&root.join("data"), 64, 16);
    Fixture {
        _tmp: tmp,
        root,
        model,
        data,
    }
}

/// `zhllama train` arguments: pt2 (LoRA with dropout + embedding + lm_head), global batch
/// `batch` of micro-batches of 1, `steps` steps, a checkpoint every `save` steps; `resume`:
/// `Some("")` for `--resume`, `Some(dir)` for `--resume-from dir`.
fn train_args(
    f: &Fixture,
    out: &Path,
    batch: usize,
    steps: u64,
    save: u64,
    resume: Option<&Path>,
) -> Vec<String> {
    let mut a: Vec<String> = vec!["train", "--stage", "pt2", "--model"]
        .into_iter()
        .map(String::from)
        .collect();
    a.push(f.model.display().to_string());
    a.extend(["--data".into(), f.data.display().to_string()]);
    a.extend(["--output".into(), out.display().to_string()]);
    a.extend(["--max-steps".into(), steps.to_string()]);
    a.extend(["--save-steps".into(), save.to_string()]);
    match resume {
        Some(p) if p.as_os_str().is_empty() => a.push("--resume".into()),
        Some(p) => a.extend(["--resume-from".into(), p.display().to_string()]),
        None => {}
    }
    // Config overrides come last (they take the rest of the command line).
    for (k, v) in [
        ("--batch-size", batch.to_string()),
        ("--micro-batch-size", "1".into()),
        ("--lora-rank", "4".into()),
        ("--lora-dropout", "0.1".into()),
        ("--learning-rate", LR.to_string()),
        ("--warmup-ratio", "0".into()),
        ("--eval-steps", "0".into()),
        ("--save-total-limit", "100".into()),
    ] {
        a.extend([k.to_string(), v]);
    }
    a
}

/// `mpirun -np n zhllama args…` (n = 0: the binary alone, no launcher), killed after 240 s.
fn launch(n: usize, args: &[String]) -> Command {
    let bin = env!("CARGO_BIN_EXE_zhllama");
    let mut c;
    if n == 0 {
        c = Command::new(bin);
    } else {
        c = Command::new("mpirun");
        c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .args(["--oversubscribe", "--mca", "mpi_yield_when_idle", "1"])
            .args(["-np", &n.to_string(), bin]);
    }
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn run_ok(n: usize, args: &[String]) {
    let _one = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let o = launch(n, args).output().unwrap();
    assert!(
        o.status.success(),
        "world {n} failed: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// The full fp32 master weights of the checkpoint in `dir`, whatever world size saved it
/// (re-cut to one rank), and each saved rank's shard length read from the shard files.
fn master_weights(dir: &Path) -> (Vec<f32>, Vec<usize>) {
    let st = checkpoint::verify(dir).unwrap();
    let p = st.trainable_len;
    let mut z = Zero2::load(dir, 0, 1, p, 1 << 20).unwrap();
    let mut w = vec![0f32; p];
    z.gather_params(&LocalComm, &mut w).unwrap();
    let n = st.world_size;
    let lens = (0..n)
        .map(|r| {
            let f = dir.join(zhllama::distributed::zero::shard_file_name(r, n));
            // header 56 bytes + master, m, v (4 bytes each per element) + 32-byte checksum
            (std::fs::metadata(f).unwrap().len() as usize - 56 - 32) / 12
        })
        .collect();
    (w, lens)
}

fn final_master(out: &Path) -> Vec<f32> {
    let (dir, _) = checkpoint::latest(out).unwrap().expect("a checkpoint");
    master_weights(&dir).0
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn worlds_2_and_3_train_bit_identically_to_world_1() {
    if !have_mpi() {
        return;
    }
    let f = fixture();
    // Global batch 4 (world 1 × 4 micro-batches, world 2 × 2) and 6 (world 1 × 6, world 3 × 2).
    for (batch, world) in [(4usize, 2usize), (6, 3)] {
        let one = f.root.join(format!("w1-b{batch}"));
        let many = f.root.join(format!("w{world}-b{batch}"));
        run_ok(0, &train_args(&f, &one, batch, 4, 4, None));
        run_ok(world, &train_args(&f, &many, batch, 4, 4, None));
        let (w1, _) = master_weights(&checkpoint::latest(&one).unwrap().unwrap().0);
        let (wn, lens) = master_weights(&checkpoint::latest(&many).unwrap().unwrap().0);
        assert_eq!(
            bits(&wn),
            bits(&w1),
            "world {world} vs world 1, global batch {batch}"
        );
        // The final adapter files are byte-identical too.
        let a1 = std::fs::read(one.join("adapter/adapter_model.safetensors")).unwrap();
        let an = std::fs::read(many.join("adapter/adapter_model.safetensors")).unwrap();
        assert!(a1 == an, "adapter bytes differ at world {world}");
        // Each rank saved (and so held) a shard of at most ⌈P/N⌉ elements, ⌈P/N⌉ for all but
        // possibly the last.
        let s = w1.len().div_ceil(world);
        assert_eq!(lens.len(), world);
        assert!(
            lens[..world - 1].iter().all(|&l| l == s),
            "{lens:?} vs ⌈P/N⌉ = {s}"
        );
        assert_eq!(lens.iter().sum::<usize>(), w1.len());
        // The weights moved (LoRA B starts at zero, so any change shows training happened).
        let init = f.root.join(format!("w0-{world}"));
        run_ok(0, &train_args(&f, &init, batch, 1, 1, None));
        assert_ne!(bits(&final_master(&init)), bits(&w1));
    }
}

/// The pids of `pid`'s children named `name`.
fn children(pid: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 2..].split_whitespace().nth(1);
        if comm == name && ppid == Some(&pid.to_string()) {
            out.push(e.file_name().to_string_lossy().parse().unwrap());
        }
    }
    out
}

#[test]
fn a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes_bit_exactly() {
    if !have_mpi() {
        return;
    }
    let f = fixture();
    let (batch, steps) = (4, 40);
    let out = f.root.join("killed");
    let args = train_args(&f, &out, batch, steps, 2, None);
    {
        let _one = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
        let mut job = launch(2, &args).spawn().unwrap();
        let t0 = Instant::now();
        // Wait for a checkpoint at step ≥ 4, then SIGKILL one rank.
        loop {
            let latest = checkpoint::list(&out)
                .ok()
                .and_then(|l| l.first().map(|c| c.0));
            if latest.is_some_and(|s| s >= 4) {
                break;
            }
            assert!(
                job.try_wait().unwrap().is_none(),
                "finished before the kill"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no checkpoint appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let ranks = children(job.id(), "zhllama");
        assert_eq!(ranks.len(), 2, "two rank processes under mpirun: {ranks:?}");
        let killed_at = Instant::now();
        Command::new("kill")
            .args(["-9", &ranks[1].to_string()])
            .status()
            .unwrap();
        let status = loop {
            if let Some(s) = job.try_wait().unwrap() {
                break s;
            }
            if killed_at.elapsed() > Duration::from_secs(90) {
                job.kill().ok();
                panic!("the job did not end within 90 s of the kill");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let secs = killed_at.elapsed().as_secs_f64();
        let o = job.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        eprintln!("job ended {secs:.1} s after the kill with {status}");
        assert!(!status.success(), "the job must fail");
        assert!(secs < 60.0, "took {secs} s");
        assert!(
            stderr.contains("Killed") || stderr.contains("signal 9"),
            "{stderr}"
        );
    }
    // The newest checkpoint is whole (verify checks every file) and the run was cut short.
    let (_, state) = checkpoint::latest(&out).unwrap().unwrap();
    let step = state.step;
    assert!(step >= 4 && step < steps, "checkpoint at step {step}");
    // Resume at world 2 to the end: identical to an uninterrupted world-2 run. The metrics lines
    // up to the checkpoint are marked: the resumed job must keep exactly those (it started at
    // `step`, not over) and log the uninterrupted run's losses for the rest, bit for bit.
    train_common::mark_metrics(&out, step);
    run_ok(
        2,
        &train_args(&f, &out, batch, steps, 2, Some(Path::new(""))),
    );
    let full = f.root.join("full");
    run_ok(2, &train_args(&f, &full, batch, steps, 2, None));
    let kept: Vec<u64> = zhllama::train::metrics::read(&full.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| r.step)
        .filter(|&s| s <= step)
        .collect();
    let marked: Vec<u64> = train_common::marked_steps(&out);
    assert_eq!(marked, kept, "the resumed job did not start at step {step}");
    let tail = |o: &Path| -> Vec<(u64, u64)> {
        train_common::logged_losses(o)
            .into_iter()
            .filter(|&(s, _)| s > step)
            .map(|(s, l)| (s, l.to_bits()))
            .collect()
    };
    let want = tail(&full);
    assert_eq!(want.len() as u64, steps - step);
    assert_eq!(
        tail(&out),
        want,
        "resumed losses differ from the uninterrupted run's"
    );
    assert_eq!(bits(&final_master(&out)), bits(&final_master(&full)));
}

/// A rank that fails on its own (here rank 1's `--data` does not exist, an MPMD launch) says why and
/// ends the whole job at once; the other rank must not be left waiting in a collective (its next
/// barrier would only give up after ten times `--comm-timeout`, 600 s by default).
#[test]
fn a_rank_that_fails_alone_ends_the_job() {
    if !have_mpi() {
        return;
    }
    let f = fixture();
    let out = f.root.join("alone");
    let good = train_args(&f, &out, 2, 4, 2, None);
    let missing = f.root.join("no-such-data");
    let bad: Vec<String> = good
        .iter()
        .map(|a| {
            if *a == f.data.display().to_string() {
                missing.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let _one = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let bin = env!("CARGO_BIN_EXE_zhllama");
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--mca", "mpi_yield_when_idle", "1"])
        .args(["-np", "1", bin])
        .args(&good)
        .args([":", "-np", "1", bin])
        .args(&bad)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut job = c.spawn().unwrap();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            job.kill().ok();
            panic!("the job still runs 120 s after rank 1 failed: rank 0 hangs in a collective");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!status.success(), "the job must fail: {stderr}");
    assert!(
        stderr.contains("rank 1 of 2") && stderr.contains("no-such-data"),
        "the failing rank names itself and the cause: {stderr}"
    );
}

/// Save at world 2, resume at world 3 and at world 1: the continued runs match the uninterrupted
/// world-2 run. Global batch 6: world 2 accumulates 3 micro-batches (not a power of two), so
/// its gradient sums associate differently from world 3's (2) and world 1's (6) — equal within
/// rounding. Tolerance: a differing f32 addition moves a gradient coordinate by ≤ 2⁻²⁴
/// relative, and Adam's update (≤ ~lr per step) has relative sensitivity ~1 to its gradient, so
/// each step can move a weight by ~1e-7·lr; we allow 1e-5·lr per step plus two ulps of the
/// weight for the rounding of the weight itself (measured worst 0.13 of this bound: about one
/// ulp). With global batch 4 (world 2 × 2 vs world 1 × 4) the resumed run is bit-exact.
#[test]
fn save_at_world_2_resume_at_world_3_and_1() {
    if !have_mpi() {
        return;
    }
    let f = fixture();
    let steps = 6;
    let full = f.root.join("w2");
    run_ok(2, &train_args(&f, &full, 6, steps, 3, None));
    let want = final_master(&full);
    let ck3 = checkpoint::checkpoint_dir(&full, 3);
    for world in [3usize, 1] {
        let out = f.root.join(format!("from2-w{world}"));
        let args = train_args(&f, &out, 6, steps, 3, Some(&ck3));
        run_ok(if world == 1 { 0 } else { world }, &args);
        // It resumed at step 3: a fresh output directory logs exactly steps 4..=6, and their
        // losses match the uninterrupted run's tail. Tolerance on the loss: the weights differ by
        // the rounding bound below (≤ 3e-4·lr ≈ 3e-7 absolute), and the cross-entropy moves by at
        // most |∂L/∂w|₁·|Δw|; measured worst relative difference in `LOSS_RTOL`'s comment.
        let got_l = train_common::logged_losses(&out);
        let want_l: Vec<(u64, f64)> = train_common::logged_losses(&full)
            .into_iter()
            .filter(|&(s, _)| s > 3)
            .collect();
        assert_eq!(
            got_l.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![4, 5, 6],
            "resumed at world {world}: not from step 3"
        );
        let mut worst_l = 0f64;
        for ((_, g), (_, w)) in got_l.iter().zip(&want_l) {
            worst_l = worst_l.max((g - w).abs() / w.abs());
        }
        eprintln!("resumed at world {world}: worst relative loss difference {worst_l:.2e}");
        assert!(worst_l <= LOSS_RTOL, "{got_l:?} vs {want_l:?}");
        let got = final_master(&out);
        let mut worst = 0f32;
        for (g, w) in got.iter().zip(&want) {
            let tol = 1e-5 * LR * (steps - 3) as f32 + 2.0 * w.abs() * f32::EPSILON;
            worst = worst.max((g - w).abs() / tol);
        }
        let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        eprintln!(
            "resumed at world {world}: {differ} of {} weights differ, worst |Δ|/tolerance {worst:.3}",
            got.len()
        );
        assert!(worst <= 1.0);
    }
    // The bit-exact case.
    let full4 = f.root.join("w2-b4");
    run_ok(2, &train_args(&f, &full4, 4, steps, 3, None));
    let out = f.root.join("from2-w1-b4");
    let ck = checkpoint::checkpoint_dir(&full4, 3);
    run_ok(0, &train_args(&f, &out, 4, steps, 3, Some(&ck)));
    let tail: Vec<(u64, u64)> = train_common::logged_losses(&full4)
        .into_iter()
        .filter(|&(s, _)| s > 3)
        .map(|(s, l)| (s, l.to_bits()))
        .collect();
    let got: Vec<(u64, u64)> = train_common::logged_losses(&out)
        .into_iter()
        .map(|(s, l)| (s, l.to_bits()))
        .collect();
    assert_eq!(tail.len(), 3);
    assert_eq!(
        got, tail,
        "resumed at step 3, losses bit-identical to the uninterrupted tail"
    );
    assert_eq!(bits(&final_master(&out)), bits(&final_master(&full4)));
}
