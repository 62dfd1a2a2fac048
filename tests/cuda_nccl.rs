//! The NCCL transport. Without NCCL or a GPU: clear errors, never a panic, and the library's version
//! read from PyTorch's `nvidia-nccl-cu13` wheel when it is installed. On a GPU (one is enough, world
//! 1): every collective, host and device level, equals `LocalComm`'s result bit for bit (at world 1
//! NCCL adds nothing, so equality is exact), and a `Zero2` step over NCCL equals the same step over
//! `LocalComm` bit for bit. The GPU test skips with a message here; `ZHLLAMA_REQUIRE_GPU=1`
//! (tools/gpu-check.sh) turns the skip into a failure.

mod skip_common;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::process::Command;
use zhllama::backend::cuda::kernels;
use zhllama::backend::cuda::{CudaBackend, CudaOptions};
use zhllama::backend::{Backend, Role};
use zhllama::distributed::nccl::{NcclComm, NcclLib};
use zhllama::distributed::{Comm, LocalComm, Zero2};

mod zero_common;
use zero_common::{bits, hp};

fn require_gpu() -> bool {
    std::env::var("ZHLLAMA_REQUIRE_GPU").as_deref() == Ok("1")
}

/// `(libnccl.so.2 of the nvidia-nccl-cu13 wheel, the wheel's version)` from the python on PATH.
fn wheel_nccl() -> Option<(PathBuf, String)> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import nvidia.nccl, os, importlib.metadata as m; \
             print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib', 'libnccl.so.2')); \
             print(m.version('nvidia-nccl-cu13'))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let mut lines = s.lines();
    let path = PathBuf::from(lines.next()?);
    let version = lines.next()?.trim().to_string();
    path.exists().then_some((path, version))
}

/// NCCL library paths to try: `ZHLLAMA_NCCL_LIB` (a file), then the wheel's.
fn nccl_paths() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::env::var_os("ZHLLAMA_NCCL_LIB")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    v.extend(wheel_nccl().map(|w| w.0));
    v
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libnccl.so.2");
    match NcclLib::open(std::slice::from_ref(&missing)) {
        // The default names were found on the loader path (a machine with NCCL installed).
        Ok(lib) => eprintln!(
            "NCCL found at {} despite the missing path; error text not checked",
            lib.path()
        ),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("NCCL not found"), "{msg}");
            assert!(msg.contains(&missing.display().to_string()), "{msg}");
            assert!(msg.contains("libnccl.so.2"), "{msg}");
        }
    }
    let not_a_lib = dir.path().join("libfake.so");
    std::fs::write(&not_a_lib, b"not an ELF file").unwrap();
    if let Err(e) = NcclLib::open(std::slice::from_ref(&not_a_lib)) {
        assert!(format!("{e:#}").contains(&not_a_lib.display().to_string()));
    }
}

/// The wheel's library loads through our loader and reports the wheel's version
/// (`ncclGetVersion` = major·10000 + minor·100 + patch since NCCL 2.9).
#[test]
fn the_wheel_library_loads_and_reports_its_version() {
    let Some((path, version)) = wheel_nccl() else {
        skip_common::skip(
            "python package nvidia-nccl-cu13 not installed (tools/test.sh installs it)",
        );
        return;
    };
    let lib = NcclLib::open(std::slice::from_ref(&path)).expect("opening the wheel's libnccl");
    assert_eq!(lib.path(), path.display().to_string());
    let v: Vec<i32> = version
        .split('.')
        .take(3)
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(lib.version().unwrap(), v[0] * 10000 + v[1] * 100 + v[2]);
}

/// Without a GPU, joining a communicator fails with an error (no panic); with one, it succeeds.
#[test]
fn no_gpu_is_an_error_not_a_panic() {
    let paths = nccl_paths();
    if paths.is_empty() && NcclLib::open(&[]).is_err() {
        skip_common::skip("no NCCL library here");
        return;
    }
    match NcclComm::new(Box::new(LocalComm), 0, &paths) {
        Ok(c) => eprintln!("a GPU is present: NCCL {:?} joined", c.lib().version()),
        Err(e) => {
            assert!(
                !require_gpu(),
                "ZHLLAMA_REQUIRE_GPU=1 but NCCL failed: {e:#}"
            );
            eprintln!("as expected without a GPU: {e:#}");
        }
    }
}

fn gpu_and_nccl_or_skip() -> Option<(CudaBackend, NcclComm)> {
    let opts = CudaOptions {
        device: 0,
        include_dirs: kernels::cuda_include_dirs(|k| std::env::var(k).ok()),
        cache_dir: std::env::var("ZHLLAMA_KERNEL_CACHE").ok().map(Into::into),
        profile: false,
        nvtx: false,
        ..CudaOptions::default()
    };
    let r = CudaBackend::with_options(opts).and_then(|g| {
        let c = NcclComm::new(Box::new(LocalComm), 0, &nccl_paths())?;
        Ok((g, c))
    });
    match r {
        Ok(x) => Some(x),
        Err(e) => {
            if require_gpu() {
                panic!("ZHLLAMA_REQUIRE_GPU=1 but the CUDA backend or NCCL did not start: {e:#}");
            }
            skip_common::skip_no_gpu(&format!("{e:#}"));
            None
        }
    }
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// One GPU (world 1): NCCL's collectives equal LocalComm's bit for bit, on host slices and on device
/// buffers (f32 and bf16), and ZeRO-2 steps over NCCL equal the same steps over LocalComm.
#[test]
fn nccl_at_world_1_equals_local_comm() {
    let Some((gpu, nccl)) = gpu_and_nccl_or_skip() else {
        return;
    };
    println!(
        "device {}, NCCL {} from {}",
        gpu.name(),
        nccl.lib().version().unwrap(),
        nccl.lib().path()
    );
    let local = LocalComm;
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    // Ragged and empty lengths as well as a large one (several NCCL chunks).
    for n in [0usize, 1, 7, 1000, 1 << 20] {
        let x = random(&mut rng, n);
        // Host slices.
        let (mut a, mut b) = (x.clone(), x.clone());
        nccl.all_reduce_sum(&mut a).unwrap();
        local.all_reduce_sum(&mut b).unwrap();
        assert_eq!(bits(&a), bits(&b), "all_reduce_sum n={n}");
        let xd: Vec<f64> = x.iter().map(|&v| v as f64 * 1.5).collect();
        let (mut a, mut b) = (xd.clone(), xd.clone());
        nccl.all_reduce_sum_f64(&mut a).unwrap();
        local.all_reduce_sum_f64(&mut b).unwrap();
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        let (mut a, mut b) = (vec![9f32; n], vec![7f32; n]);
        nccl.reduce_scatter_sum(&x, &mut a).unwrap();
        local.reduce_scatter_sum(&x, &mut b).unwrap();
        assert_eq!(bits(&a), bits(&b), "reduce_scatter_sum n={n}");
        let (mut a, mut b) = (vec![9f32; n], vec![7f32; n]);
        nccl.all_gather(&x, &mut a).unwrap();
        local.all_gather(&x, &mut b).unwrap();
        assert_eq!(bits(&a), bits(&b), "all_gather n={n}");
        if n == 0 {
            continue;
        }
        // Device buffers: the reference is LocalComm on what the buffer holds (bf16-rounded for
        // Activation buffers), read back through the same download.
        for role in [Role::Fp32, Role::Activation] {
            let mut src = gpu.alloc(n, role).unwrap();
            gpu.upload(&mut src, &x).unwrap();
            let mut held = vec![0f32; n];
            gpu.download(&src, &mut held).unwrap();
            let mut want = vec![0f32; n];
            local.reduce_scatter_sum(&held, &mut want).unwrap();

            let mut rs = gpu.alloc(n, role).unwrap();
            let mut ag = gpu.alloc(n, role).unwrap();
            nccl.reduce_scatter_device(&gpu, gpu.view(&src, 0..n), gpu.view_mut(&mut rs, 0..n))
                .unwrap();
            nccl.join(&gpu).unwrap();
            nccl.all_gather_device(&gpu, gpu.view(&rs, 0..n), gpu.view_mut(&mut ag, 0..n))
                .unwrap();
            nccl.all_reduce_device(&gpu, gpu.view_mut(&mut src, 0..n))
                .unwrap();
            nccl.join(&gpu).unwrap();
            for (what, buf) in [
                ("reduce_scatter", &rs),
                ("all_gather", &ag),
                ("all_reduce", &src),
            ] {
                let mut got = vec![0f32; n];
                gpu.download(buf, &mut got).unwrap();
                assert_eq!(bits(&got), bits(&want), "{what}_device n={n} {role:?}");
            }
        }
    }

    // ZeRO-2 over NCCL vs over LocalComm: three steps with clipping and small buckets (several
    // collective calls per step), plus a step with a non-finite gradient (skipped on both).
    let p = 10_007;
    let params0 = random(&mut rng, p);
    let (mut pa, mut pb) = (params0.clone(), params0.clone());
    let mut za = Zero2::new(0, 1, p, 3000);
    let mut zb = Zero2::new(0, 1, p, 3000);
    for step in 1..=4u64 {
        let mut g = random(&mut rng, p);
        if step == 3 {
            g[17] = f32::NAN;
        }
        let (mut ga, mut gb) = (g.clone(), g.clone());
        let h = hp(za.updates() + 1);
        let ra = za
            .step(&nccl, &mut pa, &mut ga, 0.25, Some(1.0), h)
            .unwrap();
        let rb = zb
            .step(&local, &mut pb, &mut gb, 0.25, Some(1.0), h)
            .unwrap();
        assert_eq!(ra.skipped, rb.skipped, "step {step}");
        assert_eq!(ra.skipped, step == 3);
        if ra.skipped {
            assert!(!ra.grad_norm.is_finite() && !rb.grad_norm.is_finite());
        } else {
            assert_eq!(
                ra.grad_norm.to_bits(),
                rb.grad_norm.to_bits(),
                "step {step}: norm {} vs {}",
                ra.grad_norm,
                rb.grad_norm
            );
        }
        assert_eq!(bits(&pa), bits(&pb), "params after step {step}");
    }
    assert_ne!(bits(&pa), bits(&params0), "the steps changed nothing");
    println!("NCCL world 1: collectives and 4 ZeRO-2 steps bit-identical to LocalComm");
}

/// The wait every NCCL host call now makes (`nccl::wait_polling`), with a scripted stream and error
/// source: it returns when the work is done, stops with NCCL's error when a peer dies mid-wait, and
/// gives up after the timeout when nothing happens — where a blocking synchronize would hang.
#[test]
fn nccl_waits_end_on_a_dead_peer_or_the_timeout() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    use zhllama::distributed::nccl::wait_polling;
    let poll = Duration::from_millis(1);

    // Work finishes after 5 polls, no error: Ok.
    let polls = Cell::new(0);
    let done = || {
        polls.set(polls.get() + 1);
        Ok(polls.get() > 5)
    };
    wait_polling("all_gather", done, || Ok(()), None, poll).unwrap();
    assert_eq!(polls.get(), 6);

    // A peer dies during the wait: NCCL's async error after 3 polls ends it with that error, even
    // without a timeout (the work itself never finishes).
    let checks = Cell::new(0);
    let peer_dies = || {
        checks.set(checks.get() + 1);
        if checks.get() >= 3 {
            anyhow::bail!(
                "ncclCommGetAsyncError: NCCL error 6 (remote process exited or there was a network error)"
            )
        }
        Ok(())
    };
    let e = wait_polling("reduce_scatter", || Ok(false), peer_dies, None, poll).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("reduce_scatter") && msg.contains("remote process exited"),
        "{msg}"
    );
    assert_eq!(checks.get(), 3);

    // A hung peer: no error, no progress; the timeout ends the wait.
    let t0 = Instant::now();
    let e = wait_polling(
        "barrier",
        || Ok(false),
        || Ok(()),
        Some(Duration::from_millis(50)),
        poll,
    )
    .unwrap_err();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(50),
        "gave up early: {waited:?}"
    );
    assert!(
        format!("{e:#}").contains("barrier: no progress")
            && format!("{e:#}").contains("--comm-timeout"),
        "{e:#}"
    );

    // A failed stream (e.g. an illegal address) is reported as it is.
    let e = wait_polling(
        "all_reduce",
        || anyhow::bail!("NCCL stream: CUDA_ERROR_ILLEGAL_ADDRESS"),
        || Ok(()),
        None,
        poll,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("ILLEGAL_ADDRESS"), "{e:#}");
}
