//! The communicators' collectives, the launcher environment, shard arithmetic and the batch
//! schedule — all in one process (ranks as threads).

use std::collections::HashMap;
use std::time::Duration;
use zhllama::distributed::shard::{BatchSchedule, epoch_permutation};
use zhllama::distributed::{
    Comm, LaunchInfo, Launcher, LocalComm, ShardLayout, ThreadComm, launch_info, memory_plan,
    rank_batch_indices,
};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Rank `r`'s value at index `i`: magnitudes from 1e-4 to 1e4 so the association shows in the bits.
fn val(r: usize, i: usize) -> f32 {
    let x = ((r * 7919 + i * 104_729) % 1000) as f32 / 999.0 - 0.5;
    x * 10f32.powi(((r * 3 + i) % 9) as i32 - 4)
}

/// The sum over ranks written out by hand in the canonical pairwise order.
fn canonical_sum(world: usize, i: usize) -> f32 {
    let v = |r| val(r, i);
    match world {
        1 => v(0),
        2 => v(0) + v(1),
        3 => (v(0) + v(1)) + v(2),
        4 => (v(0) + v(1)) + (v(2) + v(3)),
        5 => ((v(0) + v(1)) + (v(2) + v(3))) + v(4),
        _ => unreachable!(),
    }
}

#[test]
fn reduce_scatter_all_reduce_all_gather_match_hand_written_order() {
    for world in 1..=5 {
        let n = 13; // per-rank block
        let results = ThreadComm::run(world, TIMEOUT, |c| {
            let r = c.rank();
            let send: Vec<f32> = (0..n * world).map(|i| val(r, i)).collect();
            let mut mine = vec![0f32; n];
            c.reduce_scatter_sum(&send, &mut mine)?;
            let mut all = send.clone();
            c.all_reduce_sum(&mut all)?;
            let mut gathered = vec![0f32; n * world];
            c.all_gather(&mine, &mut gathered)?;
            let mut d: Vec<f64> = (0..7).map(|i| val(r, i) as f64 * 1e-3).collect();
            c.all_reduce_sum_f64(&mut d)?;
            Ok((mine, all, gathered, d, c.bytes_sent()))
        });
        for (r, res) in results.into_iter().enumerate() {
            let (mine, all, gathered, d, sent) = res.unwrap();
            for (i, m) in mine.iter().enumerate() {
                let e = canonical_sum(world, r * n + i);
                assert_eq!(m.to_bits(), e.to_bits(), "world {world} rank {r} i {i}");
            }
            for (i, a) in all.iter().enumerate() {
                assert_eq!(
                    a.to_bits(),
                    canonical_sum(world, i).to_bits(),
                    "all-reduce {i}"
                );
            }
            assert_eq!(
                all, gathered,
                "all-gather of the scattered blocks = all-reduce"
            );
            // f64 all-reduce: rank sum of x·1e-3 in f64, checked against an f64 sum (these values
            // are exact enough that order does not matter at 1e-15 relative).
            for (i, x) in d.iter().enumerate() {
                let e: f64 = (0..world).map(|q| val(q, i) as f64 * 1e-3).sum();
                assert!(
                    (x - e).abs() <= 1e-15 * e.abs().max(1e-12),
                    "f64 all-reduce {i}"
                );
            }
            // bytes: reduce-scatter sends (w−1)·n f32; all-reduce pads 13w to a multiple of w
            // (already one) → reduce-scatter (w−1)·n + all-gather (w−1)·n; all-gather (w−1)·n;
            // f64 all-reduce of 7 → chunk ⌈7/w⌉: 2·(w−1)·chunk f64.
            let w = world as u64;
            let chunk = 7u64.div_ceil(w);
            let expect = 4 * (w - 1) * n as u64 * 4 + 8 * 2 * (w - 1) * chunk;
            assert_eq!(sent, expect, "bytes sent by rank {r} at world {world}");
        }
    }
}

#[test]
fn broadcast_of_variable_length_and_barrier() {
    let results = ThreadComm::run(3, TIMEOUT, |c| {
        let mut b = if c.rank() == 1 {
            b"hello from rank one".to_vec()
        } else {
            vec![9; 3]
        };
        c.broadcast_bytes(&mut b, 1)?;
        c.barrier()?;
        let mut empty = if c.rank() == 0 { vec![] } else { vec![1, 2] };
        c.broadcast_bytes(&mut empty, 0)?;
        Ok((b, empty))
    });
    for r in results {
        let (b, e) = r.unwrap();
        assert_eq!(b, b"hello from rank one");
        assert!(e.is_empty());
    }
}

#[test]
fn local_comm_is_a_world_of_one() {
    let c = LocalComm;
    let send: Vec<f32> = (0..5).map(|i| val(0, i)).collect();
    let mut recv = vec![0f32; 5];
    c.reduce_scatter_sum(&send, &mut recv).unwrap();
    assert_eq!(send, recv);
    let mut g = vec![0f32; 5];
    c.all_gather(&send, &mut g).unwrap();
    assert_eq!(send, g);
    assert!(c.reduce_scatter_sum(&send, &mut [0f32; 4]).is_err());
    assert!(c.broadcast_bytes(&mut vec![], 1).is_err());
    assert_eq!(c.bytes_sent(), 0);
}

#[test]
fn mismatched_sizes_and_failed_ranks_give_errors_not_hangs() {
    // Rank 2 asks for a different size than the others.
    let results = ThreadComm::run(3, TIMEOUT, |c| {
        let n = if c.rank() == 2 { 4 } else { 3 };
        let mut buf = vec![1f32; n * 3];
        c.all_reduce_sum(&mut buf)?;
        Ok(())
    });
    assert!(
        results.iter().any(|r| r.is_err()),
        "size mismatch must be reported"
    );
    // Rank 1 fails before a collective the others wait in: they fail fast, naming rank 1.
    let t0 = std::time::Instant::now();
    let results = ThreadComm::run(3, Duration::from_secs(60), |c| {
        if c.rank() == 1 {
            anyhow::bail!("disk full");
        }
        c.barrier()?;
        Ok(())
    });
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "failure must propagate promptly"
    );
    for (r, res) in results.iter().enumerate() {
        let msg = format!("{:#}", res.as_ref().unwrap_err());
        if r == 1 {
            assert!(msg.contains("disk full"), "{msg}");
        } else {
            assert!(msg.contains("rank 1 failed: disk full"), "rank {r}: {msg}");
        }
    }
    // A rank that never shows up: the others time out.
    let results = ThreadComm::run(2, Duration::from_millis(300), |c| {
        if c.rank() == 0 {
            c.barrier()?;
        } else {
            std::thread::sleep(Duration::from_millis(1500));
        }
        Ok(())
    });
    let msg = format!("{:#}", results[0].as_ref().unwrap_err());
    assert!(msg.contains("timed out"), "{msg}");
}

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn launcher_environments() {
    let info = |rank, local_rank, world_size, launcher| LaunchInfo {
        rank,
        local_rank,
        world_size,
        launcher,
    };
    type Case = (Vec<(&'static str, &'static str)>, Option<LaunchInfo>);
    let ok: Vec<Case> = vec![
        (vec![("HOME", "/root")], None),
        (
            vec![
                ("OMPI_COMM_WORLD_RANK", "3"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                ("OMPI_COMM_WORLD_SIZE", "4"),
            ],
            Some(info(3, 1, 4, Launcher::OpenMpi)),
        ),
        (
            vec![
                ("PMI_RANK", "2"),
                ("PMI_SIZE", "8"),
                ("MPI_LOCALRANKID", "2"),
            ],
            Some(info(2, 2, 8, Launcher::Pmi)),
        ),
        (
            vec![
                ("PMI_RANK", "5"),
                ("PMI_SIZE", "8"),
                ("PMI_LOCAL_RANK", "1"),
            ],
            Some(info(5, 1, 8, Launcher::Pmi)),
        ),
        (
            vec![
                ("SLURM_PROCID", "7"),
                ("SLURM_LOCALID", "3"),
                ("SLURM_NTASKS", "16"),
            ],
            Some(info(7, 3, 16, Launcher::Slurm)),
        ),
        // mpirun inside a Slurm allocation: OpenMPI's variables describe the job.
        (
            vec![
                ("SLURM_PROCID", "0"),
                ("SLURM_LOCALID", "0"),
                ("SLURM_NTASKS", "1"),
                ("OMPI_COMM_WORLD_RANK", "1"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
            ],
            Some(info(1, 1, 2, Launcher::OpenMpi)),
        ),
    ];
    for (v, expect) in ok {
        assert_eq!(launch_info(&vars(&v)).unwrap(), expect, "{v:?}");
    }
    let bad: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("OMPI_COMM_WORLD_RANK", "x"), ("OMPI_COMM_WORLD_SIZE", "2")],
            "OMPI_COMM_WORLD_RANK",
        ),
        (
            vec![("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")],
            "SLURM_NTASKS",
        ),
        (
            vec![
                ("PMI_RANK", "4"),
                ("PMI_SIZE", "4"),
                ("PMI_LOCAL_RANK", "0"),
            ],
            "not below",
        ),
        (vec![("PMI_RANK", "0"), ("PMI_SIZE", "4")], "local rank"),
    ];
    for (v, needle) in bad {
        let e = format!("{:#}", launch_info(&vars(&v)).unwrap_err());
        assert!(e.contains(needle), "{v:?}: {e}");
    }
}

#[test]
fn shards_partition_the_buffer() {
    for p in 0..60 {
        for world in 1..7 {
            let l = ShardLayout::new(p, world);
            assert_eq!(l.shard_elems, p.div_ceil(world));
            assert!(l.padded_len() >= p && l.padded_len() < p + world);
            let mut next = 0;
            for r in 0..world {
                let rg = l.range(r);
                assert_eq!(rg.start, next, "P {p} N {world} rank {r}");
                assert!(rg.len() <= l.shard_elems);
                next = rg.end;
            }
            assert_eq!(next, p);
        }
    }
    assert_eq!(
        (0..4)
            .map(|r| ShardLayout::new(5, 4).range(r))
            .collect::<Vec<_>>(),
        vec![0..2, 2..4, 4..5, 5..5]
    );
}

#[test]
fn memory_plan_is_a_shard_per_rank() {
    let p = 204_607_488; // the recipe's stage-1 trainable count (embedding of 49953 × 4096)
    for n in [1usize, 2, 3, 8, 16] {
        let m = memory_plan(p, n);
        let s = p.div_ceil(n) as u64;
        assert_eq!(m.optimizer_bytes_per_rank, 3 * 4 * s);
        assert_eq!(m.gradient_bytes_per_rank, 4 * s);
        assert_eq!(m.comm_bytes_per_step_per_rank, 2 * (n as u64 - 1) * 4 * s);
    }
    let json = serde_json::to_value(memory_plan(10, 3)).unwrap();
    assert_eq!(json["optimizer_bytes_per_rank"], 48);
    assert_eq!(json["gradient_bytes_per_rank"], 16);
}

#[test]
fn batches_split_without_overlap_and_match_across_world_sizes() {
    let (n, seed, micro) = (53, 7, 3);
    for (world, accum) in [(2usize, 2usize), (3, 2), (3, 4), (4, 1)] {
        for step in 0..12u64 {
            let single = rank_batch_indices(step, micro, accum * world, 0, 1, n, seed);
            let mut multi = Vec::new();
            for r in 0..world {
                multi.extend(rank_batch_indices(step, micro, accum, r, world, n, seed));
            }
            assert_eq!(single, multi, "world {world} accum {accum} step {step}");
        }
    }
    // Each epoch is a permutation: consecutive positions [e·n, (e+1)·n) cover every example once.
    let mut s = BatchSchedule::new(n, seed, micro, 2, 3);
    for e in 0..3u64 {
        let mut seen: Vec<usize> = (0..n as u64)
            .map(|i| s.example_at(e * n as u64 + i))
            .collect();
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }
    assert_ne!(epoch_permutation(n, seed, 0), epoch_permutation(n, seed, 1));
    assert_ne!(epoch_permutation(n, seed, 0), (0..n).collect::<Vec<_>>());
    // Within a step (G ≤ n, same epoch) ranks never share an example.
    let mut s = BatchSchedule::new(1000, seed, 4, 2, 3);
    for step in 0..5 {
        let mut all: Vec<usize> = (0..3)
            .flat_map(|r| s.rank_micro_batches(step, r))
            .flatten()
            .collect();
        let len = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), len);
    }
}

#[test]
fn init_picks_the_communicator_for_the_launch() {
    use zhllama::distributed::{MPI_ENABLED, init};
    let c = init(None, None).unwrap();
    assert_eq!((c.rank(), c.world_size()), (0, 1));
    if !MPI_ENABLED {
        let launched = LaunchInfo {
            rank: 1,
            local_rank: 1,
            world_size: 2,
            launcher: Launcher::OpenMpi,
        };
        let e = format!("{:#}", init(Some(&launched), None).err().unwrap());
        assert!(e.contains("--features mpi"), "{e}");
    }
}
