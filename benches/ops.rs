//! Criterion benches of every CPU op, forward and backward, at the `small` preset's shapes
//! (dim 512, 8 heads of 64, ffn 1376, vocab 49954, seq 256, batch 4 → n = 1024 rows), plus the
//! GEMMs of that model and the 1024³ SGEMM, reported as FLOP/s ("elem/s" in criterion's output).
//!
//! Run: `cargo bench --bench ops` (or a filter: `cargo bench --bench ops -- matmul`).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use zhllama::backend::AdamW;
use zhllama::backend::{AttnSaved, GemmShape, RmsNormSaved};
use zhllama::ops;

mod common;
use common::{B, C, D, FFN, H, N, T, V, filled};

fn bench_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for &(name, m, n, k, ta, tb) in &common::GEMMS {
        let a = filled(m * k, 1, 1.0);
        let b = filled(k * n, 2, 1.0);
        let mut out = vec![0.0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(BenchmarkId::new(name, format!("{m}x{n}x{k}")), |bch| {
            bch.iter(|| ops::matmul(&mut out, &a, &b, GemmShape::new(m, n, k, ta, tb), 1.0, 0.0))
        });
    }
    g.finish();
}

fn bench_layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("ops");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));

    // RMSNorm
    let x = filled(N * C, 3, 1.0);
    let w = filled(C, 4, 1.0);
    let dout = filled(N * C, 5, 1.0);
    let common::Shapes { rows, rope, attn } = common::shapes();
    let (mut out, mut rstd) = (vec![0.0; N * C], vec![0.0; N]);
    g.bench_function("rmsnorm_forward", |b| {
        b.iter(|| ops::rmsnorm_forward(&mut out, &mut rstd, &x, &w, rows, 1e-6))
    });
    let (mut dx, mut dw) = (vec![0.0; N * C], vec![0.0; C]);
    g.bench_function("rmsnorm_backward", |b| {
        b.iter(|| {
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
        })
    });

    // RoPE on q (in place; repeated rotation keeps values bounded).
    let mut q = filled(N * H * D, 6, 1.0);
    g.bench_function("rope_forward", |b| {
        b.iter(|| ops::rope_forward(&mut q, rope))
    });
    g.bench_function("rope_backward", |b| {
        b.iter(|| ops::rope_backward(&mut q, rope))
    });

    // Attention (MHA, as the small preset).
    let q = filled(N * H * D, 7, 1.0);
    let k = filled(N * H * D, 8, 1.0);
    let v = filled(N * H * D, 9, 1.0);
    let (mut ao, mut lse) = (vec![0.0; N * H * D], vec![0.0; B * H * T]);
    g.bench_function("attention_forward", |b| {
        b.iter(|| ops::attention_forward(&mut ao, &mut lse, &q, &k, &v, attn))
    });
    let dao = filled(N * H * D, 10, 1.0);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    g.bench_function("attention_backward", |b| {
        b.iter(|| {
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
        })
    });

    // SwiGLU
    let gate = filled(N * FFN, 11, 4.0);
    let up = filled(N * FFN, 12, 1.0);
    let dsw = filled(N * FFN, 13, 1.0);
    let mut sw = vec![0.0; N * FFN];
    g.bench_function("swiglu_forward", |b| {
        b.iter(|| ops::swiglu_forward(&mut sw, &gate, &up))
    });
    let (mut dg, mut du) = (vec![0.0; N * FFN], vec![0.0; N * FFN]);
    g.bench_function("swiglu_backward", |b| {
        b.iter(|| ops::swiglu_backward(&mut dg, &mut du, &dsw, &gate, &up))
    });

    // Embedding
    let ids: Vec<i32> = (0..N).map(|i| ((i * 7919) % V) as i32).collect();
    let table = filled(V * C, 14, 1.0);
    let mut emb = vec![0.0; N * C];
    g.bench_function("embedding_forward", |b| {
        b.iter(|| ops::embedding_forward(&mut emb, &ids, &table, N, C))
    });
    let mut dtable = vec![0.0; V * C];
    g.bench_function("embedding_backward", |b| {
        b.iter(|| ops::embedding_backward(&mut dtable, &dout, &ids, N, C))
    });
    drop((table, dtable));

    // Cross-entropy over the full vocabulary.
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
    g.bench_function("cross_entropy_forward", |b| {
        b.iter(|| ops::cross_entropy_forward(&mut losses, &logits, &targets, N, V))
    });
    let mut dlogits = vec![0.0; N * V];
    g.bench_function("cross_entropy_backward", |b| {
        b.iter(|| ops::cross_entropy_backward(&mut dlogits, &logits, &targets, N, V, 1e-3))
    });
    drop((logits, dlogits));

    // AdamW over 4M parameters.
    let len = 1 << 22;
    let (mut p, mut m, mut vv) = (filled(len, 16, 1.0), vec![0.0; len], vec![0.0; len]);
    let grad = filled(len, 17, 1e-2);
    let mut step = 0;
    g.throughput(Throughput::Elements(len as u64));
    g.bench_function("adamw_step_4M", |b| {
        b.iter(|| {
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
        })
    });
    g.finish();
}

criterion_group!(benches, bench_matmul, bench_layers);
criterion_main!(benches);
