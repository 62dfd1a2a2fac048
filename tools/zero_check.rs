//! `zero-check`: the multi-process driver of the distributed runtime's tests and benchmark
//! (built with `--features mpi`, started by `mpirun`). `tests/distributed_mpi.rs` runs it.
//!
//! - `collectives`: every collective at this world size against the sum written out in the
//!   canonical order; prints `collectives ok` on rank 0.
//! - `toy`: the toy training of `zhllama::distributed::toy` (checkpoints, resume, a rank that
//!   dies on purpose); rank 0 writes the final weights (`--out`, raw f32) and a JSON report
//!   (`--out` + `.json`).
//! - `bench`: step time and bytes per ZeRO-2 step, as a JSON line on rank 0.

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use zhllama::backend::AdamW;
use zhllama::distributed::toy::{self, ToyProblem, ToyRun, checkpoint_dir};
use zhllama::distributed::zero::tmp_dir;
use zhllama::distributed::{Comm, Zero2, launch_info};

#[derive(Parser)]
struct Cli {
    /// End this rank if a collective waits longer than this many seconds.
    #[arg(long, default_value_t = 45)]
    watchdog: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DieHow {
    /// SIGKILL itself (as the OOM killer would).
    Kill,
    /// Return an error (the binary prints it and calls MPI_Abort).
    Error,
    /// Write this rank's shard of a checkpoint, then SIGKILL itself before the manifest.
    KillInSave,
    /// Stop answering (sleep) without dying: the others' watchdog must end the job.
    Hang,
}

#[derive(Subcommand)]
enum Cmd {
    Collectives,
    Toy {
        #[arg(long, default_value_t = 1003)]
        n_params: usize,
        #[arg(long, default_value_t = 97)]
        n_examples: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        steps: u64,
        #[arg(long, default_value_t = 2)]
        micro: usize,
        #[arg(long)]
        accum: usize,
        #[arg(long, default_value_t = 256)]
        bucket: usize,
        /// Running `+=` accumulation instead of the pairwise one.
        #[arg(long)]
        plain: bool,
        #[arg(long)]
        save_every: Option<u64>,
        #[arg(long)]
        ckpt: Option<PathBuf>,
        /// Resume from the newest complete checkpoint under `--ckpt`.
        #[arg(long)]
        resume_latest: bool,
        /// Resume from this checkpoint directory.
        #[arg(long, conflicts_with = "resume_latest")]
        resume: Option<PathBuf>,
        #[arg(long)]
        die_at: Option<u64>,
        #[arg(long, default_value_t = 1)]
        die_rank: usize,
        #[arg(long, value_enum, default_value_t = DieHow::Kill)]
        die_how: DieHow,
        #[arg(long)]
        out: PathBuf,
    },
    Bench {
        /// Trainable parameters of the ZeRO-2-only timing.
        #[arg(long, default_value_t = 4_000_000)]
        params: usize,
        /// Parameters of the full toy step (gradient computation included).
        #[arg(long, default_value_t = 20_000)]
        toy_params: usize,
        /// Examples per global batch of the full toy step.
        #[arg(long, default_value_t = 48)]
        global_examples: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 100_000_000)]
        bucket: usize,
    },
}

fn hp() -> AdamW {
    AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 0,
    }
}

fn main() {
    let cli = Cli::parse();
    let vars: HashMap<String, String> = std::env::vars().collect();
    let comm = match launch_info(&vars).and_then(|l| {
        zhllama::distributed::init(l.as_ref(), Some(Duration::from_secs(cli.watchdog)))
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(&*comm, cli.cmd) {
        eprintln!(
            "error: rank {} of {}: {e:#}",
            comm.rank(),
            comm.world_size()
        );
        if comm.world_size() > 1 {
            comm.abort(1);
        }
        std::process::exit(1);
    }
}

fn run(comm: &dyn Comm, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Collectives => collectives(comm),
        Cmd::Toy {
            n_params,
            n_examples,
            seed,
            steps,
            micro,
            accum,
            bucket,
            plain,
            save_every,
            ckpt,
            resume_latest,
            resume,
            die_at,
            die_rank,
            die_how,
            out,
        } => {
            let problem = ToyProblem {
                n_params,
                n_frozen: 5,
                n_examples,
                seed,
            };
            let resume =
                if resume_latest {
                    let root = ckpt.as_ref().context("--resume-latest needs --ckpt")?;
                    Some(toy::latest_checkpoint(root)?.with_context(|| {
                        format!("no complete checkpoint under {}", root.display())
                    })?)
                } else {
                    resume
                };
            let cfg = ToyRun {
                steps,
                micro,
                accum,
                hp: hp(),
                max_norm: Some(1.0),
                bucket_elems: bucket,
                pairwise: !plain,
                save_every,
                ckpt_root: ckpt.clone(),
                resume: resume.clone(),
            };
            let rank = comm.rank();
            let mut times = Vec::new();
            let mut t = Instant::now();
            let mut hook = |step: u64, c: &dyn Comm, z: &Zero2| -> Result<()> {
                times.push(t.elapsed().as_secs_f64());
                if die_at == Some(step) {
                    if rank == die_rank {
                        match die_how {
                            DieHow::Error => bail!("failing on purpose after step {step}"),
                            DieHow::Kill => kill_self(),
                            DieHow::Hang => std::thread::sleep(Duration::from_secs(3600)),
                            DieHow::KillInSave => {
                                // What `save_checkpoint` does on this rank, up to its shard.
                                let dir = checkpoint_dir(ckpt.as_ref().expect("--ckpt"), step);
                                c.barrier()?;
                                z.save_shard(&tmp_dir(&dir))?;
                                kill_self()
                            }
                        }
                    } else if die_how == DieHow::KillInSave {
                        let dir = checkpoint_dir(ckpt.as_ref().expect("--ckpt"), step);
                        z.save_checkpoint(c, &dir, |_| Ok(()))?;
                    }
                }
                t = Instant::now();
                Ok(())
            };
            let res = toy::train(comm, &problem, &cfg, &mut hook)?;
            // Gather every rank's measured state sizes (small integers: exact in f32).
            let (m, mm, v, g) = res.zero.state_lens();
            let r = res.zero.shard_range();
            let mine = [m, mm, v, g, r.start, r.end].map(|x| x as f32);
            let mut all = vec![0f32; 6 * comm.world_size()];
            comm.all_gather(&mine, &mut all)?;
            if rank == 0 {
                let bytes: Vec<f32> = res.params.to_vec();
                zhllama::util::write_atomic(&out, bytemuck::cast_slice(&bytes))?;
                let report = serde_json::json!({
                    "world_size": comm.world_size(),
                    "resumed_from": resume.map(|p| p.display().to_string()),
                    "steps_run": res.reports.len(),
                    "updates": res.zero.updates(),
                    "state_lens_per_rank": all.chunks(6).map(|c| c[..4].iter().map(|x| *x as usize).collect::<Vec<_>>()).collect::<Vec<_>>(),
                    "ranges_per_rank": all.chunks(6).map(|c| [c[4] as usize, c[5] as usize]).collect::<Vec<_>>(),
                    "bytes_per_step": res.reports.iter().map(|r| r.bytes_communicated).collect::<Vec<_>>(),
                    "grad_norms": res.reports.iter().map(|r| r.grad_norm).collect::<Vec<_>>(),
                    "losses": res.losses,
                    "step_seconds": times,
                });
                let mut j = out.as_os_str().to_owned();
                j.push(".json");
                zhllama::util::write_atomic(
                    &PathBuf::from(j),
                    serde_json::to_string_pretty(&report)?.as_bytes(),
                )?;
            }
            Ok(())
        }
        Cmd::Bench {
            params,
            toy_params,
            global_examples,
            steps,
            bucket,
        } => bench(comm, params, toy_params, global_examples, steps, bucket),
    }
}

/// SIGKILL this process (what the OOM killer or a node failure does: no cleanup, no MPI call).
fn kill_self() -> ! {
    let _ = std::process::Command::new("kill")
        .args(["-9", &std::process::id().to_string()])
        .status();
    std::thread::sleep(Duration::from_secs(5));
    std::process::abort()
}

/// Rank `r`'s value at index `i` (spans 8 decades, so the summation order shows in the bits).
fn val(r: usize, i: usize) -> f32 {
    let x = ((r * 7919 + i * 104_729) % 1000) as f32 / 999.0 - 0.5;
    x * 10f32.powi(((r * 3 + i) % 9) as i32 - 4)
}

fn collectives(comm: &dyn Comm) -> Result<()> {
    let (rank, w) = (comm.rank(), comm.world_size());
    let v = |r, i| val(r, i);
    // The canonical order written out by hand for the worlds the tests run.
    let expect = |i: usize| -> f32 {
        match w {
            1 => v(0, i),
            2 => v(0, i) + v(1, i),
            3 => (v(0, i) + v(1, i)) + v(2, i),
            4 => (v(0, i) + v(1, i)) + (v(2, i) + v(3, i)),
            _ => f32::NAN,
        }
    };
    ensure!(w <= 4, "collectives check is written for worlds of 1 to 4");
    let n = 1001;
    let send: Vec<f32> = (0..n * w).map(|i| val(rank, i)).collect();
    let mut mine = vec![0f32; n];
    comm.reduce_scatter_sum(&send, &mut mine)?;
    for (i, x) in mine.iter().enumerate() {
        let e = expect(rank * n + i);
        ensure!(
            x.to_bits() == e.to_bits(),
            "reduce-scatter element {i}: {x} vs {e}"
        );
    }
    let mut all = send.clone();
    comm.all_reduce_sum(&mut all)?;
    for (i, x) in all.iter().enumerate() {
        ensure!(x.to_bits() == expect(i).to_bits(), "all-reduce element {i}");
    }
    let mut gathered = vec![0f32; n * w];
    comm.all_gather(&mine, &mut gathered)?;
    ensure!(
        gathered == all,
        "all-gather of the reduce-scattered blocks differs from all-reduce"
    );
    let mut msg = if rank == w - 1 {
        format!("hello from rank {rank}").into_bytes()
    } else {
        Vec::new()
    };
    comm.broadcast_bytes(&mut msg, w - 1)?;
    ensure!(
        msg == format!("hello from rank {}", w - 1).into_bytes(),
        "broadcast"
    );
    comm.barrier()?;
    if rank == 0 {
        println!(
            "collectives ok at world {w}, rank 0 sent {} bytes",
            comm.bytes_sent()
        );
    }
    Ok(())
}

fn bench(
    comm: &dyn Comm,
    params: usize,
    toy_params: usize,
    global_examples: usize,
    steps: usize,
    bucket: usize,
) -> Result<()> {
    let (rank, w) = (comm.rank(), comm.world_size());
    ensure!(
        global_examples.is_multiple_of(w),
        "--global-examples must be divisible by the world size"
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // 1. The ZeRO-2 step alone (reduce-scatter, norm, AdamW on the shard, all-gather).
    let mut p: Vec<f32> = (0..params).map(|i| val(0, i) * 1e-2).collect();
    let mut g: Vec<f32> = (0..params).map(|i| val(rank, i)).collect();
    let mut z = Zero2::new(rank, w, params, bucket);
    let mut times = Vec::new();
    let mut bytes = 0;
    for s in 0..steps {
        comm.barrier()?;
        let t = Instant::now();
        let r = z.step(
            comm,
            &mut p,
            &mut g,
            1.0,
            Some(1.0),
            AdamW {
                step: s as u64 + 1,
                ..hp()
            },
        )?;
        comm.barrier()?;
        times.push(t.elapsed().as_secs_f64());
        bytes = r.bytes_communicated;
    }
    let zero_step = median(times);
    // 2. A full toy step: gradients of the global batch (split across ranks) + the ZeRO-2 step.
    let problem = ToyProblem {
        n_params: toy_params,
        n_frozen: 5,
        n_examples: 10_000,
        seed: 1,
    };
    let cfg = ToyRun {
        steps: steps as u64,
        micro: 1,
        accum: global_examples / w,
        hp: hp(),
        max_norm: Some(1.0),
        bucket_elems: bucket,
        pairwise: false,
        save_every: None,
        ckpt_root: None,
        resume: None,
    };
    let mut times = Vec::new();
    let mut t = Instant::now();
    let res = toy::train(comm, &problem, &cfg, &mut |_, c, _| {
        c.barrier()?;
        times.push(t.elapsed().as_secs_f64());
        t = Instant::now();
        Ok(())
    })?;
    let toy_step = median(times);
    if rank == 0 {
        println!(
            "{}",
            serde_json::json!({
                "world_size": w,
                "zero_params": params,
                "zero_step_s": zero_step,
                "zero_bytes_sent_per_step_rank0": bytes,
                "zero_param_bytes_2psi": 2 * 4 * params,
                "toy_params": toy_params,
                "toy_global_examples": global_examples,
                "toy_step_s": toy_step,
                "toy_bytes_sent_per_step_rank0": res.reports.last().map(|r| r.bytes_communicated),
            })
        );
    }
    Ok(())
}
