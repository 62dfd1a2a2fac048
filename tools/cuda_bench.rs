//! `cuda-bench`: the CUDA backend's measurements for `tools/gpu-check.sh` and docs/PERF.md
//! (benchmarks, never tests). Every number is GPU time from CUDA events on the backend's stream,
//! the best of `--reps` repetitions after one warm-up.
//!
//! - `ceilings`:  device-to-device copy bandwidth (read + write bytes / time) and the cuBLAS bf16 GEMM
//!   rate (8192³, fp32 accumulate) — the ceilings the other numbers are compared with;
//! - `rooflines`: RMSNorm forward/backward, SwiGLU, dropout, AdamW (+ bf16 copy) achieved
//!   bandwidth, as a fraction of the measured copy bandwidth; attention forward/backward TFLOP/s
//!   at LLaMA-7B shape;
//! - `ce-memory`: the fused chunked lm_head + cross-entropy against the unfused one (full [n, V]
//!   logits and dlogits): working memory and time, forward + backward;
//! - `profile`:   one LLaMA-7B layer's ops (B=1, T=512, LoRA r8 on q/k/v/o/gate/up/down) under the
//!   per-kernel CUDA-event profiler: the table `zhllama bench --profile` prints.
//!
//! Usage: `cuda-bench <ceilings|rooflines|ce-memory|profile|all> [--reps N] [--f16]` (`--f16`:
//! weights and activations stored as f16; the kernel names in the lines then end in `_f16`). Reads
//! `ZHLLAMA_CUDA_INCLUDE`/`CUDA_HOME`/`CUDA_PATH`/`LD_LIBRARY_PATH` to find the CUDA headers and
//! `ZHLLAMA_KERNEL_CACHE` (else the user cache dir) for the cubin cache.

use anyhow::{Context, Result, bail};
use zhllama::backend::cuda::{CudaBackend, CudaBuf, Half, LmHeadCeSaved};
use zhllama::backend::{AdamW, Backend, Role};
use zhllama::backend::{
    AttnSaved, AttnShape, GemmShape, LmHeadIn, LmHeadShape, RmsNormSaved, RowShape,
};

// The options-from-environment helper `zhllama --backend cuda` uses (one copy of that logic).
#[allow(dead_code)]
#[path = "../src/cli/backend.rs"]
mod backend;

struct B {
    g: CudaBackend,
    reps: usize,
}

impl B {
    fn buf(&self, len: usize, role: Role) -> Result<CudaBuf> {
        let mut b = self.g.alloc(len, role)?;
        // Deterministic, finite, non-trivial contents (a ramp), uploaded in pieces to bound host RAM.
        let piece = 1 << 24;
        let mut host = vec![0f32; len.min(piece)];
        let mut off = 0;
        let mut staging = self.g.alloc(host.len(), role)?;
        while off < len {
            let l = piece.min(len - off);
            for (i, h) in host[..l].iter_mut().enumerate() {
                *h = (((off + i) % 1000) as f32 - 500.0) * 1e-3;
            }
            if l == host.len() {
                self.g.upload(&mut staging, &host)?;
                let sl = self.g.buf_len(&staging);
                self.g.copy(
                    self.g.view_mut(&mut b, off..off + l),
                    self.g.view(&staging, 0..sl),
                );
            } else {
                let mut tail = self.g.alloc(l, role)?;
                self.g.upload(&mut tail, &host[..l])?;
                self.g.copy(
                    self.g.view_mut(&mut b, off..off + l),
                    self.g.view(&tail, 0..l),
                );
                self.g.synchronize()?;
            }
            off += l;
        }
        self.g.synchronize()?;
        Ok(b)
    }
    /// Best of `reps` timings (ms) after one warm-up.
    fn best(&self, mut f: impl FnMut()) -> Result<f64> {
        self.g.time_ms(&mut f)?;
        let mut best = f64::INFINITY;
        for _ in 0..self.reps {
            best = best.min(self.g.time_ms(&mut f)? as f64);
        }
        Ok(best)
    }
}

fn full(b: &CudaBackend, x: &CudaBuf) -> usize {
    b.buf_len(x)
}

/// Returns (copy GB/s, bf16 GEMM TFLOP/s).
fn ceilings(b: &B) -> Result<(f64, f64)> {
    let len = 1usize << 29; // 1 GiB of bf16 each side: several times the L2
    let src = b.buf(len, Role::Activation)?;
    let mut dst = b.g.alloc(len, Role::Activation)?;
    let ms = b.best(|| {
        b.g.copy(b.g.view_mut(&mut dst, 0..len), b.g.view(&src, 0..len))
    })?;
    let copy_gbs = 2.0 * (len * 2) as f64 / (ms * 1e-3) / 1e9;
    println!(
        "ceiling  d2d_copy        {:>10.1} GB/s   ({} MiB read + write, {ms:.3} ms)",
        copy_gbs,
        (len * 2) >> 20
    );
    drop((src, dst));
    let n = 8192;
    let a = b.buf(n * n, Role::Weight)?;
    let w = b.buf(n * n, Role::Weight)?;
    let mut o = b.g.alloc(n * n, Role::Activation)?;
    let ms = b.best(|| {
        let on = full(&b.g, &o);
        b.g.matmul(
            b.g.view_mut(&mut o, 0..on),
            b.g.view(&a, 0..n * n),
            b.g.view(&w, 0..n * n),
            GemmShape::nt(n, n, n),
            1.0,
            0.0,
        )
    })?;
    let tflops = 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
    println!(
        "ceiling  gemm_bf16_8192  {:>10.1} TFLOP/s ({ms:.3} ms)",
        tflops
    );
    Ok((copy_gbs, tflops))
}

fn line(name: &str, bytes: f64, ms: f64, copy_gbs: f64) {
    let gbs = bytes / (ms * 1e-3) / 1e9;
    println!(
        "roofline {name:<28} {gbs:>8.1} GB/s  {:>5.1}% of copy  ({ms:.3} ms, {:.0} MB)",
        100.0 * gbs / copy_gbs,
        bytes / 1e6
    );
}

fn rooflines(b: &B, copy_gbs: f64) -> Result<()> {
    // RMSNorm at 32 tokens-batches of 512 × 4096 (bf16): forward reads x, writes out (+ w, rstd).
    let (n, c) = (16384usize, 4096usize);
    let x = b.buf(n * c, Role::Activation)?;
    let w = b.buf(c, Role::Weight)?;
    let mut out = b.g.alloc(n * c, Role::Activation)?;
    let mut rstd = b.g.alloc(n, Role::Fp32)?;
    let ms = b.best(|| {
        b.g.rmsnorm_forward(
            b.g.view_mut(&mut out, 0..n * c),
            b.g.view_mut(&mut rstd, 0..n),
            b.g.view(&x, 0..n * c),
            b.g.view(&w, 0..c),
            RowShape { n, c },
            1e-6,
        )
    })?;
    line(
        "rmsnorm_forward_v1_bf16",
        (2 * n * c * 2 + n * 4) as f64,
        ms,
        copy_gbs,
    );
    let dout = b.buf(n * c, Role::Activation)?;
    let mut dx = b.buf(n * c, Role::Activation)?;
    let mut dw = b.g.alloc(c, Role::Fp32)?;
    let ms = b.best(|| {
        b.g.rmsnorm_backward(
            b.g.view_mut(&mut dx, 0..n * c),
            b.g.view_mut(&mut dw, 0..c),
            b.g.view(&dout, 0..n * c),
            RmsNormSaved {
                x: b.g.view(&x, 0..n * c),
                w: b.g.view(&w, 0..c),
                rstd: b.g.view(&rstd, 0..n),
            },
            RowShape { n, c },
        )
    })?;
    // reads dout, x, dx; writes dx (the dw partials are ≤ 2·SMs rows: not counted).
    line(
        "rmsnorm_backward_v1_bf16",
        (4 * n * c * 2) as f64,
        ms,
        copy_gbs,
    );
    drop((x, out, dout, dx));

    let len = n * 11008 / 4; // a quarter of the 7B FFN activations at 16k tokens
    let g = b.buf(len, Role::Activation)?;
    let u = b.buf(len, Role::Activation)?;
    let mut o = b.g.alloc(len, Role::Activation)?;
    let ms = b.best(|| {
        b.g.swiglu_forward(
            b.g.view_mut(&mut o, 0..len),
            b.g.view(&g, 0..len),
            b.g.view(&u, 0..len),
        )
    })?;
    line("swiglu_forward_v1_bf16", (3 * len * 2) as f64, ms, copy_gbs);
    drop((g, u, o));

    // LoRA dropout in place (reads and writes each element once), bf16 and f32; and the host
    // round-trip it replaced (download, ops::dropout, upload) on one 7B layer input [512·4, 4096].
    for role in [Role::Activation, Role::Fp32] {
        let mut x = b.buf(len, role)?;
        let ms = b.best(|| b.g.dropout(b.g.view_mut(&mut x, 0..len), 0.05, 0x5eed))?;
        let (name, es) = if role == Role::Fp32 {
            ("dropout_v1_f32", 4)
        } else {
            ("dropout_v1_bf16", 2)
        };
        line(name, (2 * len * es) as f64, ms, copy_gbs);
    }
    {
        let l = 2048 * 4096;
        let mut x = b.buf(l, Role::Activation)?;
        let mut host = vec![0f32; l];
        let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            f()?;
            let mut best = f64::INFINITY;
            for _ in 0..b.reps {
                let t0 = std::time::Instant::now();
                f()?;
                best = best.min(t0.elapsed().as_secs_f64() * 1e3);
            }
            Ok(best)
        };
        let host_ms = time(&mut || {
            b.g.download(&x, &mut host)?;
            zhllama::ops::dropout(&mut host, 0.05, 0x5eed);
            b.g.upload(&mut x, &host)
        })?;
        let dev_ms = time(&mut || {
            b.g.dropout(b.g.view_mut(&mut x, 0..l), 0.05, 0x5eed);
            b.g.synchronize()
        })?;
        println!(
            "dropout  [2048, 4096] bf16: device {dev_ms:.3} ms vs host round-trip {host_ms:.3} ms ({:.1}x, wall time incl. sync)",
            host_ms / dev_ms
        );
    }

    // AdamW over 64M fp32 master parameters, fp32 grads, writing the bf16 copy.
    let len = 1usize << 26;
    let mut p = b.buf(len, Role::Fp32)?;
    let mut m = b.g.alloc(len, Role::Fp32)?;
    let mut v = b.g.alloc(len, Role::Fp32)?;
    let gr = b.buf(len, Role::Fp32)?;
    let mut copy = b.g.alloc(len, Role::Weight)?;
    let hp = AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    let ms = b.best(|| {
        b.g.adamw_step_with_copy(
            b.g.view_mut(&mut p, 0..len),
            b.g.view_mut(&mut m, 0..len),
            b.g.view_mut(&mut v, 0..len),
            b.g.view(&gr, 0..len),
            Some(b.g.view_mut(&mut copy, 0..len)),
            hp,
        )
    })?;
    // reads p, m, v, g (16 B), writes p, m, v (12 B) and the bf16 copy (2 B).
    line(
        "adamw_step_v1_f32_f32 +copy",
        (len * 30) as f64,
        ms,
        copy_gbs,
    );
    drop((p, m, v, gr, copy));

    // Attention at LLaMA-7B shape: B=1, T=512, 32 heads of 128, causal (FLOPs: 4·T²·d·h/2 forward,
    // 2.5× that backward, counting only the causal half).
    for (bb, t) in [(1usize, 512usize), (4, 512)] {
        let (h, d) = (32usize, 128usize);
        let l = bb * t * h * d;
        let q = b.buf(l, Role::Activation)?;
        let k = b.buf(l, Role::Activation)?;
        let vv = b.buf(l, Role::Activation)?;
        let mut o = b.g.alloc(l, Role::Activation)?;
        let mut lse = b.g.alloc(bb * h * t, Role::Fp32)?;
        let flops = 4.0 * (t * t) as f64 / 2.0 * (d * h * bb) as f64;
        let ms = b.best(|| {
            b.g.attention_rope_forward(
                b.g.view_mut(&mut o, 0..l),
                b.g.view_mut(&mut lse, 0..bb * h * t),
                b.g.view(&q, 0..l),
                b.g.view(&k, 0..l),
                b.g.view(&vv, 0..l),
                AttnShape {
                    b: bb,
                    t,
                    h,
                    hkv: h,
                    d,
                }
                .with_rope(10000.0, 0),
            )
        })?;
        println!(
            "attention forward v1 rope b{bb} t{t} h{h} d{d}: {:.2} TFLOP/s ({ms:.3} ms)",
            flops / (ms * 1e-3) / 1e12
        );
        let (mut dq, mut dk, mut dv) = (
            b.g.alloc(l, Role::Activation)?,
            b.g.alloc(l, Role::Activation)?,
            b.g.alloc(l, Role::Activation)?,
        );
        let ms = b.best(|| {
            b.g.attention_rope_backward(
                b.g.view_mut(&mut dq, 0..l),
                b.g.view_mut(&mut dk, 0..l),
                b.g.view_mut(&mut dv, 0..l),
                b.g.view(&o, 0..l),
                AttnSaved {
                    q: b.g.view(&q, 0..l),
                    k: b.g.view(&k, 0..l),
                    v: b.g.view(&vv, 0..l),
                    out: b.g.view(&o, 0..l),
                    lse: b.g.view(&lse, 0..bb * h * t),
                },
                AttnShape {
                    b: bb,
                    t,
                    h,
                    hkv: h,
                    d,
                }
                .with_rope(10000.0, 0),
            )
        })?;
        println!(
            "attention backward v1 rope b{bb} t{t} h{h} d{d}: {:.2} TFLOP/s ({ms:.3} ms)",
            2.5 * flops / (ms * 1e-3) / 1e12
        );
    }
    Ok(())
}

fn ce_memory(b: &B) -> Result<()> {
    let (n, c, v, chunk) = (2048usize, 4096usize, 49954usize, 8192usize);
    let x = b.buf(n * c, Role::Activation)?;
    let w = b.buf(v * c, Role::Weight)?;
    let ids: Vec<i32> = (0..n as i32).map(|i| (i * 7919) % v as i32).collect();
    let mut t = b.g.alloc_ids(n)?;
    b.g.upload_ids(&mut t, &ids)?;
    let mut dx = b.g.alloc(n * c, Role::Activation)?;
    let mut dw = b.g.alloc(v * c, Role::Fp32)?;
    let mut losses = b.g.alloc(n, Role::Fp32)?;
    let mut lse = b.g.alloc(n, Role::Fp32)?;
    // Fused: one [n, chunk] bf16 buffer.
    let mut ch = b.g.alloc(n * chunk, Role::Activation)?;
    let fused_bytes = n * chunk * 2;
    let ms_fused = b.best(|| {
        b.g.lm_head_cross_entropy_forward(
            b.g.view_mut(&mut losses, 0..n),
            b.g.view_mut(&mut lse, 0..n),
            b.g.view_mut(&mut ch, 0..n * chunk),
            LmHeadIn {
                x: b.g.view(&x, 0..n * c),
                w: b.g.view(&w, 0..v * c),
                targets: &t,
            },
            LmHeadShape { n, c, v },
        );
        b.g.lm_head_cross_entropy_backward(
            b.g.view_mut(&mut dx, 0..n * c),
            b.g.view_mut(&mut dw, 0..v * c),
            b.g.view_mut(&mut ch, 0..n * chunk),
            LmHeadCeSaved {
                x: b.g.view(&x, 0..n * c),
                w: b.g.view(&w, 0..v * c),
                lse: b.g.view(&lse, 0..n),
                targets: &t,
            },
            LmHeadShape { n, c, v },
            1.0 / n as f32,
        );
    })?;
    drop(ch);
    // Unfused: full logits and dlogits, [n, V] bf16 each.
    let mut logits = b.g.alloc(n * v, Role::Activation)?;
    let mut dlogits = b.g.alloc(n * v, Role::Activation)?;
    let unfused_bytes = 2 * n * v * 2;
    let ms_unfused = b.best(|| {
        b.g.matmul(
            b.g.view_mut(&mut logits, 0..n * v),
            b.g.view(&x, 0..n * c),
            b.g.view(&w, 0..v * c),
            GemmShape::nt(n, v, c),
            1.0,
            0.0,
        );
        b.g.cross_entropy_forward(
            b.g.view_mut(&mut losses, 0..n),
            b.g.view(&logits, 0..n * v),
            &t,
            n,
            v,
        );
        b.g.cross_entropy_backward(
            b.g.view_mut(&mut dlogits, 0..n * v),
            b.g.view(&logits, 0..n * v),
            &t,
            n,
            v,
            1.0 / n as f32,
        );
        b.g.matmul(
            b.g.view_mut(&mut dx, 0..n * c),
            b.g.view(&dlogits, 0..n * v),
            b.g.view(&w, 0..v * c),
            GemmShape::nn(n, c, v),
            1.0,
            1.0,
        );
        b.g.matmul(
            b.g.view_mut(&mut dw, 0..v * c),
            b.g.view(&dlogits, 0..n * v),
            b.g.view(&x, 0..n * c),
            GemmShape::tn(v, c, n),
            1.0,
            1.0,
        );
    })?;
    println!(
        "ce_memory n{n} V{v}: fused {:.1} MiB (chunk {chunk}) {ms_fused:.2} ms | unfused {:.1} MiB {ms_unfused:.2} ms | memory ratio {:.3}",
        fused_bytes as f64 / 1048576.0,
        unfused_bytes as f64 / 1048576.0,
        fused_bytes as f64 / unfused_bytes as f64
    );
    Ok(())
}

fn profile(b: &B) -> Result<()> {
    // One LLaMA-7B decoder layer's backend ops at B=1, T=512 (forward + backward), LoRA r8 on all
    // seven projections, base weights frozen (no dW GEMMs), as the SFT stage runs them.
    let (t, c, h, d, f, r) = (512usize, 4096usize, 32usize, 128usize, 11008usize, 8usize);
    let g = &b.g;
    let x = b.buf(t * c, Role::Activation)?;
    let wn = b.buf(c, Role::Weight)?;
    let wq = b.buf(c * c, Role::Weight)?;
    let wup = b.buf(f * c, Role::Weight)?;
    let wdown = b.buf(c * f, Role::Weight)?;
    let la = b.buf(r * f, Role::Weight)?;
    let lb = b.buf(f * r, Role::Weight)?;
    let mut xn = g.alloc(t * c, Role::Activation)?;
    let mut rstd = g.alloc(t, Role::Fp32)?;
    let mut q = g.alloc(t * c, Role::Activation)?;
    let mut u = g.alloc(t * r, Role::Activation)?;
    let mut att = g.alloc(t * c, Role::Activation)?;
    let mut lse = g.alloc(h * t, Role::Fp32)?;
    let mut gate = g.alloc(t * f, Role::Activation)?;
    let mut up = g.alloc(t * f, Role::Activation)?;
    let mut hid = g.alloc(t * f, Role::Activation)?;
    let mut o = g.alloc(t * c, Role::Activation)?;
    g.set_profiling(true);
    g.profile_reset();
    let ms = g.time_ms(|| {
        g.rmsnorm_forward(
            g.view_mut(&mut xn, 0..t * c),
            g.view_mut(&mut rstd, 0..t),
            g.view(&x, 0..t * c),
            g.view(&wn, 0..c),
            RowShape { n: t, c },
            1e-6,
        );
        for _ in 0..4 {
            // q, k, v, o projections (+ LoRA)
            g.matmul(
                g.view_mut(&mut q, 0..t * c),
                g.view(&xn, 0..t * c),
                g.view(&wq, 0..c * c),
                GemmShape::nt(t, c, c),
                1.0,
                0.0,
            );
            // LoRA as the model runs it (dropout off): u = x·Aᵀ, then q += s·u·Bᵀ.
            g.matmul(
                g.view_mut(&mut u, 0..t * r),
                g.view(&xn, 0..t * c),
                g.view(&la, 0..r * c),
                GemmShape::nt(t, r, c),
                1.0,
                0.0,
            );
            g.matmul(
                g.view_mut(&mut q, 0..t * c),
                g.view(&u, 0..t * r),
                g.view(&lb, 0..c * r),
                GemmShape::nt(t, c, r),
                2.0,
                1.0,
            );
        }
        g.attention_rope_forward(
            g.view_mut(&mut att, 0..t * c),
            g.view_mut(&mut lse, 0..h * t),
            g.view(&q, 0..t * c),
            g.view(&q, 0..t * c),
            g.view(&q, 0..t * c),
            AttnShape {
                b: 1,
                t,
                h,
                hkv: h,
                d,
            }
            .with_rope(10000.0, 0),
        );
        g.matmul(
            g.view_mut(&mut gate, 0..t * f),
            g.view(&xn, 0..t * c),
            g.view(&wup, 0..f * c),
            GemmShape::nt(t, f, c),
            1.0,
            0.0,
        );
        g.matmul(
            g.view_mut(&mut up, 0..t * f),
            g.view(&xn, 0..t * c),
            g.view(&wup, 0..f * c),
            GemmShape::nt(t, f, c),
            1.0,
            0.0,
        );
        g.swiglu_forward(
            g.view_mut(&mut hid, 0..t * f),
            g.view(&gate, 0..t * f),
            g.view(&up, 0..t * f),
        );
        g.matmul(
            g.view_mut(&mut o, 0..t * c),
            g.view(&hid, 0..t * f),
            g.view(&wdown, 0..c * f),
            GemmShape::nt(t, c, f),
            1.0,
            0.0,
        );
    })?;
    let rep = g.profile_report()?;
    g.set_profiling(false);
    println!("profile: one LLaMA-7B layer forward (B=1 T=512, LoRA r8): {ms:.3} ms");
    println!("{:<44} {:>6} {:>10} {:>6}", "kernel", "calls", "ms", "%");
    let total: f64 = rep.iter().map(|k| k.total_ms).sum();
    for k in rep {
        println!(
            "{:<44} {:>6} {:>10.3} {:>5.1}%",
            k.name,
            k.calls,
            k.total_ms,
            100.0 * k.total_ms / total.max(1e-9)
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args
        .first()
        .map(String::as_str)
        .unwrap_or("all")
        .to_string();
    let reps = match args.iter().position(|a| a == "--reps") {
        Some(i) => args
            .get(i + 1)
            .context("--reps needs a number")?
            .parse()
            .context("--reps")?,
        None => 5,
    };
    let mut opts = backend::cuda_options(0, false);
    // `--f16`: weights and activations stored as f16 (the fp16 mode) instead of bf16.
    if args.iter().any(|a| a == "--f16") {
        opts.half = Half::F16;
    }
    let g = CudaBackend::with_options(opts)?;
    println!(
        "device {} ({}), {} MiB free",
        g.device_name(),
        g.arch(),
        g.mem_info()?.0 >> 20
    );
    let b = B { g, reps };
    match what.as_str() {
        "ceilings" => {
            ceilings(&b)?;
        }
        "rooflines" => {
            let (copy, _) = ceilings(&b)?;
            rooflines(&b, copy)?;
        }
        "ce-memory" => ce_memory(&b)?,
        "profile" => profile(&b)?,
        "all" => {
            let (copy, _) = ceilings(&b)?;
            rooflines(&b, copy)?;
            ce_memory(&b)?;
            profile(&b)?;
        }
        other => bail!(
            "unknown cuda-bench command {other:?} (ceilings, rooflines, ce-memory, profile, all)"
        ),
    }
    Ok(())
}
