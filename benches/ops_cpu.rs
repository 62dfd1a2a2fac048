//! Every CPU op at the `small` preset's shapes, timed by **process CPU time** as well as wall time
//! (best of N runs each). On a machine shared with other jobs the wall time mostly measures the
//! neighbours; CPU time per op (and GFLOP per CPU-second for the GEMMs) is what this code controls.
//! `RAYON_NUM_THREADS=1` gives the single-core numbers; CPU time barely changes with 2 threads when
//! the threading has no overhead.
//!
//! Run: `cargo bench --bench ops_cpu [-- FILTER...]` (filters: substrings of the op names).

use std::hint::black_box;
use std::time::Instant;
use zhllama::backend::AdamW;
use zhllama::backend::{AttnSaved, GemmShape, RmsNormSaved};
use zhllama::ops;

mod common;
use common::{B, C, D, FFN, H, N, T, V, filled};

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

struct Bench {
    filters: Vec<String>,
}

impl Bench {
    /// Times `f` `reps` times after one warm-up; prints the best CPU and wall time.
    fn run(&self, name: &str, reps: usize, flops: f64, mut f: impl FnMut()) {
        if !self.filters.is_empty() && !self.filters.iter().any(|w| name.contains(w.as_str())) {
            return;
        }
        f();
        let (mut cpu, mut wall) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            let (c0, w0) = (cpu_seconds(), Instant::now());
            f();
            wall = wall.min(w0.elapsed().as_secs_f64());
            cpu = cpu.min(cpu_seconds() - c0);
        }
        let rate = |s: f64| {
            if flops > 0.0 {
                format!("{:7.1} GFLOP/s", flops / s / 1e9)
            } else {
                String::new()
            }
        };
        println!(
            "{name:36} cpu {:9.3} ms {}   wall {:9.3} ms {}",
            cpu * 1e3,
            rate(cpu),
            wall * 1e3,
            rate(wall)
        );
    }
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to check here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("ops_cpu: timings only; run `cargo bench --bench ops_cpu`");
        return;
    }
    let filters = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let bench = Bench { filters };
    println!("{} rayon threads", rayon::current_num_threads());

    // The shared GEMMs, then the LM head's two backward ones.
    let gemms = common::GEMMS.iter().copied().chain([
        ("lm_head_dx", N, C, V, false, false),
        ("lm_head_dw", V, C, N, true, false),
    ]);
    for (op, m, n, k, ta, tb) in gemms {
        let name = &format!("matmul {op}");
        let a = filled(m * k, 1, 1.0);
        let b = filled(k * n, 2, 1.0);
        let mut out = vec![0.0f32; m * n];
        let reps = if n == V { 2 } else { 5 };
        bench.run(name, reps, 2.0 * (m * n * k) as f64, || {
            ops::matmul(&mut out, &a, &b, GemmShape::new(m, n, k, ta, tb), 1.0, 0.0)
        });
        // The candidate we did not pick, same shape and layout (threads: MATMUL_NUM_THREADS).
        let cand = format!("{name} [matrixmultiply]");
        bench.run(&cand, reps, 2.0 * (m * n * k) as f64, || {
            let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
            let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
            // SAFETY: strides and sizes describe the allocated buffers exactly.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    a_rs,
                    a_cs,
                    b.as_ptr(),
                    b_rs,
                    b_cs,
                    0.0,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        });
    }

    let x = filled(N * C, 3, 1.0);
    let w = filled(C, 4, 1.0);
    let dout = filled(N * C, 5, 1.0);
    let common::Shapes { rows, rope, attn } = common::shapes();
    let (mut out, mut rstd) = (vec![0.0; N * C], vec![0.0; N]);
    bench.run("rmsnorm_forward", 20, 0.0, || {
        ops::rmsnorm_forward(&mut out, &mut rstd, &x, &w, rows, 1e-6)
    });
    let (mut dx, mut dw) = (vec![0.0; N * C], vec![0.0; C]);
    bench.run("rmsnorm_backward", 20, 0.0, || {
        ops::rmsnorm_backward(
            &mut dx,
            &mut dw,
            &dout,
            RmsNormSaved {
                x: &x,
                w: &w,
                rstd: &rstd,
            },
            rows,
        )
    });

    let mut q = filled(N * H * D, 6, 1.0);
    bench.run("rope_forward", 20, 0.0, || ops::rope_forward(&mut q, rope));
    bench.run("rope_backward", 20, 0.0, || {
        ops::rope_backward(&mut q, rope)
    });

    let q = filled(N * H * D, 7, 1.0);
    let k = filled(N * H * D, 8, 1.0);
    let v = filled(N * H * D, 9, 1.0);
    let (mut ao, mut lse) = (vec![0.0; N * H * D], vec![0.0; B * H * T]);
    // Causal: QKᵀ and PV over the lower triangle, 2 FLOP per multiply-add.
    let attn_flops = 4.0 * (B * H) as f64 * (T * (T + 1) / 2) as f64 * D as f64;
    bench.run("attention_forward", 5, attn_flops, || {
        ops::attention_forward(&mut ao, &mut lse, &q, &k, &v, attn)
    });
    let dao = filled(N * H * D, 10, 1.0);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    // Backward: QKᵀ recomputed, dO·Vᵀ, dS·K, dSᵀ·Q, Pᵀ·dO: 2.5× the forward.
    bench.run("attention_backward", 5, 2.5 * attn_flops, || {
        ops::attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &dao,
            AttnSaved {
                q: &q,
                k: &k,
                v: &v,
                out: &ao,
                lse: &lse,
            },
            attn,
        )
    });

    let gate = filled(N * FFN, 11, 4.0);
    let up = filled(N * FFN, 12, 1.0);
    let dsw = filled(N * FFN, 13, 1.0);
    let mut sw = vec![0.0; N * FFN];
    bench.run("swiglu_forward", 10, 0.0, || {
        ops::swiglu_forward(&mut sw, &gate, &up)
    });
    let (mut dg, mut du) = (vec![0.0; N * FFN], vec![0.0; N * FFN]);
    bench.run("swiglu_backward", 10, 0.0, || {
        ops::swiglu_backward(&mut dg, &mut du, &dsw, &gate, &up)
    });

    let ids: Vec<i32> = (0..N).map(|i| ((i * 7919) % V) as i32).collect();
    let table = filled(V * C, 14, 1.0);
    let mut emb = vec![0.0; N * C];
    bench.run("embedding_forward", 20, 0.0, || {
        ops::embedding_forward(&mut emb, &ids, &table, N, C)
    });
    let mut dtable = vec![0.0; V * C];
    bench.run("embedding_backward", 20, 0.0, || {
        ops::embedding_backward(&mut dtable, &dout, &ids, N, C)
    });
    drop((table, dtable));

    let logits = filled(N * V, 15, 8.0);
    let targets: Vec<i32> = (0..N)
        .map(|i| {
            if i % 10 == 0 {
                -100
            } else {
                ((i * 31) % V) as i32
            }
        })
        .collect();
    let mut losses = vec![0.0; N];
    bench.run("cross_entropy_forward", 5, 0.0, || {
        ops::cross_entropy_forward(&mut losses, &logits, &targets, N, V)
    });
    let mut dlogits = vec![0.0; N * V];
    bench.run("cross_entropy_backward", 5, 0.0, || {
        ops::cross_entropy_backward(&mut dlogits, &logits, &targets, N, V, 1e-3)
    });
    drop((logits, dlogits));

    let len = 1 << 22;
    let (mut p, mut m, mut vv) = (filled(len, 16, 1.0), vec![0.0; len], vec![0.0; len]);
    let grad = filled(len, 17, 1e-2);
    let mut step = 0;
    bench.run("adamw_step_4M", 10, 0.0, || {
        step += 1;
        let hp = AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        ops::adamw_step(&mut p, &mut m, &mut vv, black_box(&grad), hp)
    });
}
