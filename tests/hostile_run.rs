//! The other side of "refuse, never destroy": what is allowed still works and keeps what it must
//! (`--overwrite`, `--resume` over a damaged metrics.jsonl, replacing a recognised output), and
//! faults (a failed atomic write, SIGTERM mid-build, a released lock) leave nothing behind.

mod hostile_common;

use hostile_common::{Fixture, snapshot};
use std::path::Path;
use std::process::Command;

fn zh(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sft_args<'a>(fx_model: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--stage",
        "sft",
        "--model",
        fx_model,
        "--data",
        data,
        "--output",
        out,
        "--max-steps",
        steps,
        "--save-steps",
        "1",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--lora-rank",
        "2",
    ]
}

fn metrics_steps(run: &Path) -> Vec<u64> {
    zhllama::train::metrics::read(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.loss.is_some())
        .map(|r| r.step)
        .collect()
}

#[test]
fn overwrite_starts_over_and_resume_repairs_metrics() {
    let fx = Fixture::new();
    let (model, sft, run) = (fx.path("model"), fx.path("sft"), fx.path("run"));
    assert_eq!(metrics_steps(&run), vec![1]);

    // A foreign line in the middle and a torn last line: both dropped, step 1 kept.
    let mpath = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&mpath).unwrap();
    text.insert_str(0, "not json at all\n");
    text.push_str("{\"step\": 7, \"lo");
    std::fs::write(&mpath, text).unwrap();
    // The same settings as the run (max_steps 1): the resume restores checkpoint-1 and ends.
    let mut args = sft_args(s(&model), s(&sft), s(&run), "1");
    args.push("--resume");
    let o = zh(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "resume failed: {err}");
    assert!(err.contains("metrics.jsonl:1: dropped"), "{err}");
    assert!(err.contains("metrics.jsonl:3: dropped"), "{err}");
    assert_eq!(metrics_steps(&run), vec![1], "history kept");
    let text = std::fs::read_to_string(&mpath).unwrap();
    assert!(!text.contains("not json"), "foreign line kept: {text}");

    // --overwrite: the earlier run's checkpoints and metrics are gone, the new run is whole
    // (a later-numbered old checkpoint would otherwise outrank the new run's and be resumed).
    std::fs::create_dir(run.join("checkpoint-9")).unwrap();
    let mut args = sft_args(s(&model), s(&sft), s(&run), "1");
    args.push("--overwrite");
    let o = zh(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(metrics_steps(&run), vec![1]);
    assert!(run.join("checkpoint-1").is_dir());
    assert!(!run.join("checkpoint-9").exists(), "old checkpoint kept");
    assert!(run.join("adapter/adapter_config.json").is_file());
}

#[test]
fn recognised_output_is_replaced_whole() {
    let fx = Fixture::new();
    let merged = fx.path("merged");
    let before = std::fs::read(merged.join("tokenizer.model")).unwrap();
    std::fs::write(merged.join("tokenizer.model"), b"stale").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_merge-tokenizers"))
        .args(["--llama-tokenizer-dir", s(&fx.path("tok/en.model"))])
        .args(["--chinese-sp-model-file", s(&fx.path("tok/zh.model"))])
        .args(["--output-dir", s(&merged)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(merged.join("tokenizer.model")).unwrap(),
        before
    );
    let hidden: Vec<String> = std::fs::read_dir(fx.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
    // --overwrite is what lets a foreign directory be replaced.
    let o = Command::new(env!("CARGO_BIN_EXE_merge-tokenizers"))
        .args(["--llama-tokenizer-dir", s(&fx.path("tok/en.model"))])
        .args(["--chinese-sp-model-file", s(&fx.path("tok/zh.model"))])
        .args(["--output-dir", s(&fx.path("foreign")), "--overwrite"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!fx.path("foreign/notes.txt").exists());
    assert_eq!(
        std::fs::read(fx.path("foreign/tokenizer.model")).unwrap(),
        before
    );
}

#[test]
fn failed_atomic_write_leaves_no_temp_file() {
    let tmp = tempfile::tempdir().unwrap();
    // The target is a directory: the final rename fails after the temp file is complete.
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let before = snapshot(tmp.path());
    let err = zhllama::util::write_atomic(&target, b"new bytes").unwrap_err();
    assert!(format!("{err:#}").contains("target"), "{err:#}");
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "temp file left or target changed"
    );
    // A missing parent directory: the temp file cannot even be created; nothing appears.
    let err = zhllama::util::write_atomic(&tmp.path().join("no/such/f"), b"x").unwrap_err();
    assert!(format!("{err:#}").contains("no/such"), "{err:#}");
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn lock_is_exclusive_and_released() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let a = zhllama::util::lock::RunLock::acquire(&dir).unwrap();
    let e = zhllama::util::lock::RunLock::acquire(&dir).err().unwrap();
    assert!(format!("{e:#}").contains("in use"), "{e:#}");
    std::fs::write(dir.join("metrics.jsonl"), b"").unwrap();
    drop(a);
    // The lock file is left (the run wrote something) but no one holds it: taken over.
    assert!(dir.join(".lock").exists());
    let _b = zhllama::util::lock::RunLock::acquire(&dir).unwrap();
}

#[test]
fn sigterm_mid_build_leaves_no_temp_dir() {
    let fx = Fixture::new();
    // Enough text that the build is still running when the signal comes.
    let big = fx.path("big.txt");
    let line = std::fs::read_to_string(fx.path("corpus/en.txt")).unwrap();
    std::fs::write(&big, line.repeat(400)).unwrap();
    let out = fx.path("shards");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["data", "pretrain", "--quiet", "--block-size", "16"])
        .args(["--tokenizer", s(&fx.path("tok/en.model"))])
        .args(["--input", s(&big), "--output", s(&out)])
        .spawn()
        .unwrap();
    let tmp_dir = fx.root().join(format!(".shards.tmp.{}", child.id()));
    let t0 = std::time::Instant::now();
    while !tmp_dir.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the build ended before its temp dir was seen; make the input larger"
        );
        assert!(t0.elapsed().as_secs() < 60, "no temp dir after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    if status.success() {
        // It finished between the check and the signal: then the output must be whole.
        assert!(out.join("manifest.json").is_file());
    } else {
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
        assert!(!out.exists(), "partial output");
    }
    assert!(!tmp_dir.exists(), "temp dir {} left", tmp_dir.display());
}

#[test]
fn sigterm_mid_checkpoint_leaves_no_temp_dir_and_the_previous_checkpoint() {
    use std::sync::Arc;
    use zhllama::model::{Llama, LlamaConfig, TrainSpec};
    let fx = Fixture::new();
    // A wider model than the fixture's (hidden 256, LoRA rank 64 on every projection: 0.6M
    // trainable parameters, 7.5 MB of optimizer state per checkpoint), so a checkpoint write
    // lasts long enough for the signal to land inside it.
    let model = fx.path("wide_model");
    let cfg = LlamaConfig::new(hostile_common::VOCAB, 256, 688, 2, 4, 4);
    Llama::random(
        Arc::new(zhllama::backend::cpu::CpuBackend::new()),
        cfg,
        TrainSpec::frozen(),
        5,
    )
    .unwrap()
    .save_hf(
        &model,
        zhllama::model::weights::SaveOptions {
            dtype: zhllama::tensor::DType::F32,
            max_shard_bytes: None,
        },
    )
    .unwrap();
    let out = fx.path("killed_run");
    let (m, d, o) = (s(&model), fx.path("sft"), s(&out).to_string());
    let mut args = sft_args(m, s(&d), &o, "1000");
    let r = args.iter().position(|a| *a == "--lora-rank").unwrap();
    args[r + 1] = "64";
    args.extend([
        "--lora-targets",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the temp directory of the second checkpoint (the first is then complete).
    let t0 = std::time::Instant::now();
    let tmp = out.join(".checkpoint-2.tmp");
    while !tmp.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its second checkpoint"
        );
        assert!(
            t0.elapsed().as_secs() < 120,
            "no checkpoint temp dir after 120 s"
        );
    }
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") || n.contains(".tmp."))
        .collect();
    assert!(left.is_empty(), "temp paths left: {left:?}");
    // The previous checkpoint is whole: every file matches its manifest.
    let state = zhllama::train::checkpoint::verify(&out.join("checkpoint-1")).unwrap();
    assert_eq!(state.step, 1);
}
