//! Every CUDA kernel against its CPU reference (the CPU backend, `crate::ops`) on fresh random inputs
//! at several shapes, ragged ones included, in three precision modes:
//! - `f32`: every buffer `Role::Fp32` (the fp32 kernels);
//! - `mixed`: weights and activations bf16, statistics and gradient accumulators fp32 (the bf16
//!   kernels, the training configuration);
//! - `f16`: the same with f16 storage (a backend started with `CudaOptions::half = Half::F16`, the
//!   recipe's fp16 mode; the `_f16` kernels and cuBLAS with CUDA_R_16F inputs).
//!
//! Inputs are drawn once, rounded to what the GPU buffer stores (bf16 or f32), and both backends
//! get those same values, so the comparison measures the kernels, not the input rounding.
//!
//! Error metric: `max|gpu − cpu| / max|cpu|` over the tensor (normalised max error; element-wise
//! relative error is meaningless near zero crossings of long sums). Tolerances:
//! - `f32` mode: 1e-5 — both sides accumulate in fp32 in different orders (blocks, warps, FMA
//!   contraction); for sums of ≤ 10⁴ terms the order-dependent error stays near 1e-6.
//! - `mixed` mode: 1e-2 — outputs stored in bf16 carry up to 2⁻⁹ ≈ 2e-3 relative rounding each, and
//!   `+=` outputs round twice; 1e-2 leaves room for that and nothing more.
//! - `f16` mode: 2.5e-3 — f16 rounds to 2⁻¹¹ ≈ 4.9e-4 relative, 4× finer than bf16, so the bf16
//!   bound scaled by ¼. Its range is narrower (max 65504, normals from 6.1e-5): every input here is
//!   O(1)–O(10), and results below the normal range only lose absolute precision at the 6e-8
//!   subnormal step, invisible in the error normalised by the tensor's max.
//!   NaN or Inf in any output fails regardless of the tolerance.
//!
//! Without a GPU the GPU tests print why and return (unless `ZHLLAMA_REQUIRE_GPU=1`); the host-side
//! tests (CSR grouping, dropout mask, the no-GPU error) run everywhere. `tools/gpu-check.sh` runs
//! this binary on a GPU and keeps its table.

mod skip_common;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zhllama::backend::cpu::CpuBackend;
use zhllama::backend::cuda::kernels;
use zhllama::backend::cuda::{CudaBackend, ENABLED, Half, LmHeadCeSaved};
use zhllama::backend::{AdamW, Backend, Role};
use zhllama::backend::{
    AttnSaved, AttnShape, CachedAttnShape, GemmShape, LmHeadIn, LmHeadSaved, LmHeadShape,
    RmsNormSaved, RopeShape, RowShape,
};

#[test]
fn no_gpu_is_a_clear_error_not_a_panic() {
    match CudaBackend::new(0) {
        Ok(_) => eprintln!("a GPU is present: nothing to check here"),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("CudaBackend::new(0) = Err({msg})");
            assert!(
                msg.contains("cuda")
                    || msg.contains("CUDA")
                    || msg.contains("NVRTC")
                    || msg.contains("GPU")
                    || msg.contains("cuBLAS"),
                "unhelpful error: {msg}"
            );
        }
    }
}

fn csr_reference(ids: &[i32]) -> Vec<(i32, Vec<i32>)> {
    let mut distinct: Vec<i32> = ids.iter().copied().filter(|&i| i >= 0).collect();
    distinct.sort();
    distinct.dedup();
    distinct
        .into_iter()
        .map(|u| {
            (
                u,
                (0..ids.len() as i32)
                    .filter(|&p| ids[p as usize] == u)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn embedding_backward_grouping_matches_a_direct_scan() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (n, v) in [(0usize, 5i32), (1, 1), (17, 4), (300, 50), (1000, 3)] {
        let ids: Vec<i32> = (0..n)
            .map(|_| {
                if rng.random_range(0..10) == 0 {
                    -100
                } else {
                    rng.random_range(0..v)
                }
            })
            .collect();
        let (uniq, offsets, positions) = kernels::group_positions(&ids);
        let got: Vec<(i32, Vec<i32>)> = uniq
            .iter()
            .enumerate()
            .map(|(k, &u)| {
                (
                    u,
                    positions[offsets[k] as usize..offsets[k + 1] as usize].to_vec(),
                )
            })
            .collect();
        assert_eq!(got, csr_reference(&ids), "n={n} v={v}");
        assert_eq!(offsets.len(), uniq.len() + 1);
    }
}

// ---- GPU parity ------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    F32,
    Mixed,
    F16,
}

impl Mode {
    fn tol(self) -> f64 {
        match self {
            Mode::F32 => 1e-5,
            Mode::Mixed => 1e-2,
            Mode::F16 => 2.5e-3,
        }
    }
    /// The role of a weight / activation buffer in this mode (statistics are always Fp32).
    fn data(self) -> Role {
        match self {
            Mode::F32 => Role::Fp32,
            Mode::Mixed | Mode::F16 => Role::Activation,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::F32 => "f32",
            Mode::Mixed => "mixed",
            Mode::F16 => "f16",
        }
    }
}

struct Ctx {
    gpu: CudaBackend,
    cpu: CpuBackend,
    rng: ChaCha8Rng,
    failures: Vec<String>,
    /// The GPU stores weights/activations as f16 (else bf16).
    half16: bool,
}

fn bf(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

impl Ctx {
    /// Round as a buffer of `role` stores on this GPU backend.
    fn stored(&self, v: &[f32], role: Role) -> Vec<f32> {
        match role {
            Role::Fp32 => v.to_vec(),
            _ if self.half16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
            _ => v.iter().map(|&x| bf(x)).collect(),
        }
    }
    fn rand(&mut self, len: usize, scale: f32, role: Role) -> Vec<f32> {
        let v: Vec<f32> = (0..len)
            .map(|_| (self.rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        self.stored(&v, role)
    }
    fn up(&self, v: &[f32], role: Role) -> zhllama::backend::cuda::CudaBuf {
        let mut b = self.gpu.alloc(v.len(), role).expect("alloc");
        self.gpu.upload(&mut b, v).expect("upload");
        b
    }
    fn down(&self, b: &zhllama::backend::cuda::CudaBuf) -> Vec<f32> {
        let mut v = vec![0.0; self.gpu.buf_len(b)];
        self.gpu.download(b, &mut v).expect("download");
        v
    }
    fn ids(&self, v: &[i32]) -> zhllama::backend::cuda::CudaIds {
        let mut b = self.gpu.alloc_ids(v.len()).expect("alloc_ids");
        self.gpu.upload_ids(&mut b, v).expect("upload_ids");
        b
    }
    fn check(&mut self, op: &str, shape: &str, mode: Mode, got: &[f32], want: &[f32]) {
        self.check_scaled(op, shape, mode, got, want, 0.0);
    }
    /// [`Ctx::check`] with the error measured against `max(max|want|, floor)`: `floor` is the
    /// magnitude of the terms whose difference `want` is, for outputs that are exactly zero in exact
    /// arithmetic (both sides then hold rounding noise, and max|want| would compare noise to noise).
    fn check_scaled(
        &mut self,
        op: &str,
        shape: &str,
        mode: Mode,
        got: &[f32],
        want: &[f32],
        floor: f64,
    ) {
        assert_eq!(got.len(), want.len(), "{op} {shape}: length");
        let scale = want
            .iter()
            .fold(0f64, |m, &x| m.max((x as f64).abs()))
            .max(floor)
            .max(1e-30);
        let mut err = 0f64;
        let mut nonfinite = false;
        for (&g, &w) in got.iter().zip(want) {
            if !g.is_finite() {
                nonfinite = true;
            }
            err = err.max((g as f64 - w as f64).abs());
        }
        let rel = err / scale;
        let ok = !nonfinite && rel <= mode.tol();
        println!(
            "{:<34} {:<26} {:<6} {:>10.3e} {:>8.0e} {}",
            op,
            shape,
            mode.name(),
            rel,
            mode.tol(),
            if ok {
                "ok"
            } else if nonfinite {
                "NaN/Inf"
            } else {
                "FAIL"
            }
        );
        if !ok {
            self.failures.push(format!(
                "{op} {shape} {}: rel err {rel:.3e} (nonfinite: {nonfinite})",
                mode.name()
            ));
        }
    }
}

macro_rules! gv {
    ($c:expr, $b:expr) => {
        $c.gpu.view(&$b, 0..$c.gpu.buf_len(&$b))
    };
}
macro_rules! gm {
    ($c:expr, $b:expr) => {{
        let n = $c.gpu.buf_len(&$b);
        $c.gpu.view_mut(&mut $b, 0..n)
    }};
}

fn gpu_or_skip(half: Half) -> Option<CudaBackend> {
    if !ENABLED {
        skip_common::skip("built without `--features cuda`");
        return None;
    }
    let include = kernels::cuda_include_dirs(|k| std::env::var(k).ok());
    let opts = zhllama::backend::cuda::CudaOptions {
        device: 0,
        include_dirs: include,
        cache_dir: std::env::var("ZHLLAMA_KERNEL_CACHE").ok().map(Into::into),
        profile: false,
        half,
        nvtx: false,
    };
    match CudaBackend::with_options(opts) {
        Ok(g) => Some(g),
        Err(e) => {
            // tools/gpu-check.sh sets ZHLLAMA_REQUIRE_GPU=1: there, no GPU is a failure.
            if std::env::var("ZHLLAMA_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("ZHLLAMA_REQUIRE_GPU=1 but the CUDA backend did not start: {e:#}");
            }
            skip_common::skip_no_gpu(&format!("{e:#}"));
            None
        }
    }
}

#[test]
fn every_kernel_matches_the_cpu_reference() {
    let Some(gpu) = gpu_or_skip(Half::Bf16) else {
        return;
    };
    println!("device: {}", gpu.name());
    println!(
        "{:<34} {:<26} {:<6} {:>10} {:>8} result",
        "op", "shape", "mode", "rel err", "tol"
    );
    let mut c = Ctx {
        gpu,
        cpu: CpuBackend::new(),
        rng: ChaCha8Rng::seed_from_u64(42),
        failures: Vec::new(),
        half16: false,
    };
    // ZHLLAMA_PARITY_OPS=attention,cross_entropy runs only those op families (a kernel engineer's
    // loop on one kernel; the emulated run of the whole sweep takes minutes).
    let only: Option<Vec<String>> = std::env::var("ZHLLAMA_PARITY_OPS")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
    let families: [Family; 13] = [
        ("matmul", matmul),
        ("rmsnorm", rmsnorm),
        ("rope", rope),
        ("attention", attention),
        ("attention_cached", attention_cached),
        ("swiglu", swiglu),
        ("embedding", embedding),
        ("cross_entropy", cross_entropy),
        ("lm_head_ce", lm_head_ce),
        ("adamw", adamw),
        ("elementwise", elementwise),
        ("dropout", dropout),
        ("fill_uniform", fill_uniform),
    ];
    for name in only.iter().flatten() {
        assert!(
            families.iter().any(|(f, _)| f == name),
            "ZHLLAMA_PARITY_OPS: no op family {name:?}"
        );
    }
    for mode in [Mode::F32, Mode::Mixed, Mode::F16] {
        if mode == Mode::F16 {
            // A second backend whose Weight/Activation buffers are f16 (the first is dropped).
            c.gpu = gpu_or_skip(Half::F16).expect("the bf16 backend started, so must the f16 one");
            c.half16 = true;
            println!("device: {} with f16 storage", c.gpu.name());
        }
        for (name, run) in families {
            if only.as_ref().is_none_or(|o| o.iter().any(|x| x == name)) {
                run(&mut c, mode);
            }
        }
    }
    c.gpu.synchronize().expect("no CUDA error queued");
    assert!(
        c.failures.is_empty(),
        "{} parity failures:\n{}",
        c.failures.len(),
        c.failures.join("\n")
    );
}

fn matmul(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (m, n, k) in [(1, 1, 1), (37, 53, 29), (128, 96, 256), (65, 130, 17)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = c.rand(m * k, 1.0, r);
            let b = c.rand(k * n, 1.0, r);
            let o0 = c.rand(m * n, 1.0, Role::Fp32);
            let (alpha, beta) = (0.7, 0.5);
            let mut want = o0.clone();
            c.cpu.matmul(
                &mut want,
                &a,
                &b,
                GemmShape::new(m, n, k, ta, tb),
                alpha,
                beta,
            );
            let (ga, gb) = (c.up(&a, r), c.up(&b, r));
            let mut go = c.up(&o0, Role::Fp32);
            c.gpu.matmul(
                gm!(c, go),
                gv!(c, ga),
                gv!(c, gb),
                GemmShape::new(m, n, k, ta, tb),
                alpha,
                beta,
            );
            let got = c.down(&go);
            c.check(
                "matmul",
                &format!("{m}x{n}x{k} t{}{}", ta as u8, tb as u8),
                mode,
                &got,
                &want,
            );
        }
    }
}

fn rmsnorm(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (n, ch) in [(1, 4), (7, 60), (33, 4096), (5, 8192)] {
        let x = c.rand(n * ch, 2.0, r);
        let w = c.rand(ch, 1.0, r);
        let eps = 1e-6;
        let (mut out, mut rstd) = (vec![0.0; n * ch], vec![0.0; n]);
        c.cpu
            .rmsnorm_forward(&mut out, &mut rstd, &x, &w, RowShape { n, c: ch }, eps);
        let (gx, gw) = (c.up(&x, r), c.up(&w, r));
        let mut gout = c.gpu.alloc(n * ch, r).unwrap();
        let mut grstd = c.gpu.alloc(n, Role::Fp32).unwrap();
        c.gpu.rmsnorm_forward(
            gm!(c, gout),
            gm!(c, grstd),
            gv!(c, gx),
            gv!(c, gw),
            RowShape { n, c: ch },
            eps,
        );
        let shape = format!("n{n} c{ch}");
        let got = c.down(&gout);
        c.check("rmsnorm_forward out", &shape, mode, &got, &out);
        let got = c.down(&grstd);
        c.check("rmsnorm_forward rstd", &shape, mode, &got, &rstd);

        let dout = c.rand(n * ch, 1.0, r);
        let dx0 = c.rand(n * ch, 1.0, r);
        let dw0 = c.rand(ch, 1.0, Role::Fp32);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        c.cpu.rmsnorm_backward(
            &mut dx,
            &mut dw,
            &dout,
            RmsNormSaved {
                x: &x,
                w: &w,
                rstd: &rstd,
            },
            RowShape { n, c: ch },
        );
        let gd = c.up(&dout, r);
        let mut gdx = c.up(&dx0, r);
        let mut gdw = c.up(&dw0, Role::Fp32);
        c.gpu.rmsnorm_backward(
            gm!(c, gdx),
            gm!(c, gdw),
            gv!(c, gd),
            RmsNormSaved {
                x: gv!(c, gx),
                w: gv!(c, gw),
                rstd: gv!(c, grstd),
            },
            RowShape { n, c: ch },
        );
        let got = c.down(&gdx);
        c.check("rmsnorm_backward dx (+=)", &shape, mode, &got, &dx);
        let got = c.down(&gdw);
        c.check("rmsnorm_backward dw (+=)", &shape, mode, &got, &dw);
    }
}

fn rope(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (b, t, h, d, off) in [(1, 1, 1, 2, 0), (2, 37, 3, 64, 5), (1, 300, 2, 128, 0)] {
        let x = c.rand(b * t * h * d, 1.0, r);
        let shape = format!("b{b} t{t} h{h} d{d} +{off}");
        let rs = RopeShape {
            b,
            t,
            h,
            d,
            theta: 10000.0,
            pos_offset: off,
        };
        for fwd in [true, false] {
            let mut want = x.clone();
            let mut gx = c.up(&x, r);
            if fwd {
                c.cpu.rope_forward(&mut want, rs);
                c.gpu.rope_forward(gm!(c, gx), rs);
            } else {
                c.cpu.rope_backward(&mut want, rs);
                c.gpu.rope_backward(gm!(c, gx), rs);
            }
            let got = c.down(&gx);
            c.check(
                if fwd { "rope_forward" } else { "rope_backward" },
                &shape,
                mode,
                &got,
                &want,
            );
        }
    }
}

fn attention(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (b, t, h, hkv, d) in [
        (1, 1, 1, 1, 64),
        (2, 37, 4, 2, 64),
        (1, 70, 2, 2, 128),
        (1, 129, 8, 2, 128),
    ] {
        for theta in [0.0f32, 10000.0] {
            let shape = format!(
                "b{b} t{t} h{h}/{hkv} d{d}{}",
                if theta > 0.0 { " rope" } else { "" }
            );
            let q = c.rand(b * t * h * d, 1.0, r);
            let k = c.rand(b * t * hkv * d, 1.0, r);
            let v = c.rand(b * t * hkv * d, 1.0, r);
            let dout = c.rand(b * t * h * d, 1.0, r);
            // CPU: rotate explicitly, then plain attention (the fused GPU kernel rotates on load).
            let ars = AttnShape { b, t, h, hkv, d }.with_rope(theta, 0);
            let (mut qr, mut kr) = (q.clone(), k.clone());
            if theta > 0.0 {
                c.cpu.rope_forward(&mut qr, ars.rope_q());
                c.cpu.rope_forward(&mut kr, ars.rope_k());
            }
            let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
            c.cpu
                .attention_forward(&mut out, &mut lse, &qr, &kr, &v, ars.attn);
            let (gq, gk, gvv, gd) = (c.up(&q, r), c.up(&k, r), c.up(&v, r), c.up(&dout, r));
            let mut gout = c.gpu.alloc(q.len(), r).unwrap();
            let mut glse = c.gpu.alloc(b * h * t, Role::Fp32).unwrap();
            c.gpu.attention_rope_forward(
                gm!(c, gout),
                gm!(c, glse),
                gv!(c, gq),
                gv!(c, gk),
                gv!(c, gvv),
                ars,
            );
            let gout_h = c.down(&gout);
            c.check("attention_forward out", &shape, mode, &gout_h, &out);
            let got = c.down(&glse);
            c.check("attention_forward lse", &shape, mode, &got, &lse);
            // Backward from the GPU's own saved out/lse (as training does); CPU from its own.
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            c.cpu.attention_backward(
                &mut dq,
                &mut dk,
                &mut dv,
                &dout,
                AttnSaved {
                    q: &qr,
                    k: &kr,
                    v: &v,
                    out: &out,
                    lse: &lse,
                },
                ars.attn,
            );
            if theta > 0.0 {
                c.cpu.rope_backward(&mut dq, ars.rope_q());
                c.cpu.rope_backward(&mut dk, ars.rope_k());
            }
            let mut gdq = c.gpu.alloc(q.len(), r).unwrap();
            let mut gdk = c.gpu.alloc(k.len(), r).unwrap();
            let mut gdv = c.gpu.alloc(v.len(), r).unwrap();
            c.gpu.attention_rope_backward(
                gm!(c, gdq),
                gm!(c, gdk),
                gm!(c, gdv),
                gv!(c, gd),
                AttnSaved {
                    q: gv!(c, gq),
                    k: gv!(c, gk),
                    v: gv!(c, gvv),
                    out: gv!(c, gout),
                    lse: gv!(c, glse),
                },
                ars,
            );
            // With one position the softmax is constant (P = 1), so dq and dk are exactly zero:
            // dS = P·(dP − D) with dP = dout·v and D = dout·out = dout·v. Each side then returns
            // the rounding noise of that difference, ~eps·|dP|, carried into dq = Σ dS·k/√d (and dk
            // with q). Those two are measured against the size of the cancelled terms,
            // max|dout_i|₂·max|v_j|₂ (a bound on |dP|) × max|k| (or |q|) / √d, instead of against
            // max|want|, which is itself noise. Longer sequences keep the plain metric.
            let (dq_floor, dk_floor) = if t == 1 {
                let row_norms = |x: &[f32], w: usize| -> f64 {
                    x.chunks(w)
                        .map(|r| r.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt())
                        .fold(0.0, f64::max)
                };
                let amax = |x: &[f32]| x.iter().fold(0f64, |m, &a| m.max((a as f64).abs()));
                let dp = row_norms(&dout, d) * row_norms(&v, d) / (d as f64).sqrt();
                (dp * amax(&kr), dp * amax(&qr))
            } else {
                (0.0, 0.0)
            };
            for (name, g, w, floor) in [
                ("dq", &gdq, &dq, dq_floor),
                ("dk", &gdk, &dk, dk_floor),
                ("dv", &gdv, &dv, 0.0),
            ] {
                let got = c.down(g);
                c.check_scaled(
                    &format!("attention_backward {name}"),
                    &shape,
                    mode,
                    &got,
                    w,
                    floor,
                );
            }
        }
    }
}

fn attention_cached(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    // (b, tq, past, tmax, h, hkv, d): prefill (past 0), one decode step, a ragged multi-token step.
    for (b, tq, past, tmax, h, hkv, d) in [
        (1, 5, 0, 8, 2, 1, 64),
        (1, 1, 37, 40, 4, 2, 64),
        (2, 3, 17, 33, 8, 2, 128),
    ] {
        let shape = format!("b{b} tq{tq} past{past} h{h}/{hkv} d{d}");
        let q = c.rand(b * tq * h * d, 1.0, r);
        let kc = c.rand(b * tmax * hkv * d, 1.0, r);
        let vc = c.rand(b * tmax * hkv * d, 1.0, r);
        let mut out = vec![0.0; q.len()];
        c.cpu.attention_cached_forward(
            &mut out,
            &q,
            &kc,
            &vc,
            CachedAttnShape {
                b,
                tq,
                past,
                tmax,
                h,
                hkv,
                d,
            },
        );
        let (gq, gk, gvv) = (c.up(&q, r), c.up(&kc, r), c.up(&vc, r));
        let mut gout = c.gpu.alloc(q.len(), r).unwrap();
        c.gpu.attention_cached_forward(
            gm!(c, gout),
            gv!(c, gq),
            gv!(c, gk),
            gv!(c, gvv),
            CachedAttnShape {
                b,
                tq,
                past,
                tmax,
                h,
                hkv,
                d,
            },
        );
        let got = c.down(&gout);
        c.check("attention_cached_forward", &shape, mode, &got, &out);
    }
}

fn swiglu(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for len in [1usize, 7, 4096, 100_003] {
        let g = c.rand(len, 4.0, r);
        let u = c.rand(len, 2.0, r);
        let d = c.rand(len, 1.0, r);
        let mut out = vec![0.0; len];
        c.cpu.swiglu_forward(&mut out, &g, &u);
        let (gg, gu, gd) = (c.up(&g, r), c.up(&u, r), c.up(&d, r));
        let mut gout = c.gpu.alloc(len, r).unwrap();
        c.gpu.swiglu_forward(gm!(c, gout), gv!(c, gg), gv!(c, gu));
        let got = c.down(&gout);
        c.check("swiglu_forward", &format!("len{len}"), mode, &got, &out);
        let (mut dg, mut du) = (vec![0.0; len], vec![0.0; len]);
        c.cpu.swiglu_backward(&mut dg, &mut du, &d, &g, &u);
        let mut gdg = c.gpu.alloc(len, r).unwrap();
        let mut gdu = c.gpu.alloc(len, r).unwrap();
        c.gpu
            .swiglu_backward(gm!(c, gdg), gm!(c, gdu), gv!(c, gd), gv!(c, gg), gv!(c, gu));
        let got = c.down(&gdg);
        c.check(
            "swiglu_backward dgate",
            &format!("len{len}"),
            mode,
            &got,
            &dg,
        );
        let got = c.down(&gdu);
        c.check("swiglu_backward dup", &format!("len{len}"), mode, &got, &du);
    }
}

fn embedding(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (n, v, ch) in [(1, 1, 3), (37, 11, 64), (512, 1000, 4096)] {
        let table = c.rand(v * ch, 1.0, r);
        let ids: Vec<i32> = (0..n).map(|_| c.rng.random_range(0..v as i32)).collect();
        let mut out = vec![0.0; n * ch];
        c.cpu.embedding_forward(&mut out, &ids, &table, n, ch);
        let gt = c.up(&table, r);
        let gi = c.ids(&ids);
        let mut gout = c.gpu.alloc(n * ch, r).unwrap();
        c.gpu
            .embedding_forward(gm!(c, gout), &gi, gv!(c, gt), n, ch);
        let shape = format!("n{n} v{v} c{ch}");
        let got = c.down(&gout);
        c.check("embedding_forward", &shape, mode, &got, &out);
        let dout = c.rand(n * ch, 1.0, r);
        let d0 = c.rand(v * ch, 1.0, Role::Fp32);
        let mut want = d0.clone();
        c.cpu.embedding_backward(&mut want, &dout, &ids, n, ch);
        let gd = c.up(&dout, r);
        let mut g1 = c.up(&d0, Role::Fp32);
        c.gpu.embedding_backward(gm!(c, g1), gv!(c, gd), &gi, n, ch);
        let got = c.down(&g1);
        c.check("embedding_backward (+=)", &shape, mode, &got, &want);
        // Deterministic: a second run gives the same bits.
        let mut g2 = c.up(&d0, Role::Fp32);
        c.gpu.embedding_backward(gm!(c, g2), gv!(c, gd), &gi, n, ch);
        let again = c.down(&g2);
        if got
            .iter()
            .zip(&again)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            c.failures
                .push(format!("embedding_backward {shape}: two runs differ"));
        }
    }
}

fn targets(c: &mut Ctx, n: usize, v: usize) -> Vec<i32> {
    (0..n)
        .map(|i| {
            if i % 5 == 3 {
                -100
            } else {
                c.rng.random_range(0..v as i32)
            }
        })
        .collect()
}

/// An op family's parity check: its name (for `ZHLLAMA_PARITY_OPS`) and body.
type Family = (&'static str, fn(&mut Ctx, Mode));

fn cross_entropy(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (n, v) in [(1, 2), (9, 1000), (33, 49954)] {
        let logits = c.rand(n * v, 8.0, r);
        let t = targets(c, n, v);
        let mut losses = vec![0.0; n];
        c.cpu.cross_entropy_forward(&mut losses, &logits, &t, n, v);
        let gl = c.up(&logits, r);
        let gt = c.ids(&t);
        let mut gloss = c.gpu.alloc(n, Role::Fp32).unwrap();
        c.gpu
            .cross_entropy_forward(gm!(c, gloss), gv!(c, gl), &gt, n, v);
        let shape = format!("n{n} v{v}");
        let got = c.down(&gloss);
        c.check("cross_entropy_forward", &shape, mode, &got, &losses);
        let mut dl = vec![0.0; n * v];
        c.cpu
            .cross_entropy_backward(&mut dl, &logits, &t, n, v, 0.25);
        let mut gdl = c.gpu.alloc(n * v, r).unwrap();
        c.gpu
            .cross_entropy_backward(gm!(c, gdl), gv!(c, gl), &gt, n, v, 0.25);
        let got = c.down(&gdl);
        // dlogits = 0.25·(softmax − onehot): on a confident row (p_t → 1, likely at v = 2 with
        // logits of ±8) every entry is a difference of O(0.25) terms that cancel, and both sides
        // hold ~1 ulp of p_t in it. Measured against the terms' size, 0.25, not max|want|.
        c.check_scaled("cross_entropy_backward", &shape, mode, &got, &dl, 0.25);
    }
}

fn lm_head_ce(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (n, ch, v, chunk_cols) in [(5, 64, 1000, 300), (37, 256, 49954, 8192)] {
        let x = c.rand(n * ch, 1.0, r);
        let w = c.rand(v * ch, 0.2, r);
        let t = targets(c, n, v);
        // CPU: full logits (in the GPU's storage precision), then CE.
        let mut logits = vec![0.0; n * v];
        c.cpu
            .matmul(&mut logits, &x, &w, GemmShape::nt(n, v, ch), 1.0, 0.0);
        let logits = c.stored(&logits, r);
        let mut losses = vec![0.0; n];
        c.cpu.cross_entropy_forward(&mut losses, &logits, &t, n, v);
        let scale = 1.0 / t.iter().filter(|&&x| x != -100).count().max(1) as f32;
        let mut dlog = vec![0.0; n * v];
        c.cpu
            .cross_entropy_backward(&mut dlog, &logits, &t, n, v, scale);
        let dlog = c.stored(&dlog, r);
        let dx0 = c.rand(n * ch, 1.0, r);
        let mut dx = dx0.clone();
        c.cpu
            .matmul(&mut dx, &dlog, &w, GemmShape::nn(n, ch, v), 1.0, 1.0);
        let mut dw = vec![0.0; v * ch];
        c.cpu
            .matmul(&mut dw, &dlog, &x, GemmShape::tn(v, ch, n), 1.0, 1.0);

        let (gx, gw, gt) = (c.up(&x, r), c.up(&w, r), c.ids(&t));
        let mut gchunk = c.gpu.alloc(n * chunk_cols, r).unwrap();
        let mut gloss = c.gpu.alloc(n, Role::Fp32).unwrap();
        let mut glse = c.gpu.alloc(n, Role::Fp32).unwrap();
        c.gpu.lm_head_cross_entropy_forward(
            gm!(c, gloss),
            gm!(c, glse),
            gm!(c, gchunk),
            LmHeadIn {
                x: gv!(c, gx),
                w: gv!(c, gw),
                targets: &gt,
            },
            LmHeadShape { n, c: ch, v },
        );
        let shape = format!("n{n} c{ch} v{v} chunk{chunk_cols}");
        let got = c.down(&gloss);
        c.check("lm_head_ce_forward losses", &shape, mode, &got, &losses);
        let mut gdx = c.up(&dx0, r);
        let mut gdw = c.gpu.alloc(v * ch, Role::Fp32).unwrap();
        c.gpu.lm_head_cross_entropy_backward(
            gm!(c, gdx),
            gm!(c, gdw),
            gm!(c, gchunk),
            LmHeadCeSaved {
                x: gv!(c, gx),
                w: gv!(c, gw),
                lse: gv!(c, glse),
                targets: &gt,
            },
            LmHeadShape { n, c: ch, v },
            scale,
        );
        let got = c.down(&gdx);
        c.check("lm_head_ce_backward dx (+=)", &shape, mode, &got, &dx);
        let got = c.down(&gdw);
        c.check("lm_head_ce_backward dw (+=)", &shape, mode, &got, &dw);
    }
}

fn adamw(c: &mut Ctx, mode: Mode) {
    let gr = mode.data();
    for len in [1usize, 1000, 1 << 20] {
        let p = c.rand(len, 1.0, Role::Fp32);
        let m = c.rand(len, 0.1, Role::Fp32);
        let v: Vec<f32> = c
            .rand(len, 0.01, Role::Fp32)
            .iter()
            .map(|x| x.abs())
            .collect();
        let g = c.rand(len, 0.1, gr);
        let hp = AdamW {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 7,
        };
        let (mut pw, mut mw, mut vw) = (p.clone(), m.clone(), v.clone());
        c.cpu.adamw_step(&mut pw, &mut mw, &mut vw, &g, hp);
        let (mut gp, mut gm_, mut gvv, gg) = (
            c.up(&p, Role::Fp32),
            c.up(&m, Role::Fp32),
            c.up(&v, Role::Fp32),
            c.up(&g, gr),
        );
        let mut copy = c.gpu.alloc(len, Role::Weight).unwrap();
        let cv = {
            let n = c.gpu.buf_len(&copy);
            c.gpu.view_mut(&mut copy, 0..n)
        };
        c.gpu.adamw_step_with_copy(
            gm!(c, gp),
            gm!(c, gm_),
            gm!(c, gvv),
            gv!(c, gg),
            Some(cv),
            hp,
        );
        // The update is fp32 in both modes (master weights); only the gradient's storage differs.
        let shape = format!("len{len}");
        for (name, b, w) in [("param", &gp, &pw), ("m", &gm_, &mw), ("v", &gvv, &vw)] {
            let got = c.down(b);
            c.check(&format!("adamw_step {name}"), &shape, Mode::F32, &got, w);
        }
        let got = c.down(&copy);
        // The copy is a Role::Weight buffer: bf16 on the bf16 backend (also in f32 mode), else f16.
        let copy_mode = if mode == Mode::F16 {
            Mode::F16
        } else {
            Mode::Mixed
        };
        c.check("adamw_step 16-bit copy", &shape, copy_mode, &got, &pw);
    }
}

fn elementwise(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for len in [1usize, 1023, 1 << 20] {
        let x = c.rand(len, 3.0, r);
        let y0 = c.rand(len, 1.0, Role::Fp32);
        let shape = format!("len{len}");
        let mut want = y0.clone();
        c.cpu.axpy(&mut want, -0.3, &x);
        let gx = c.up(&x, r);
        let mut gy = c.up(&y0, Role::Fp32);
        c.gpu.axpy(gm!(c, gy), -0.3, gv!(c, gx));
        let got = c.down(&gy);
        c.check("axpy", &shape, mode, &got, &want);
        c.cpu.scale(&mut want, 1.7);
        c.gpu.scale(gm!(c, gy), 1.7);
        let got = c.down(&gy);
        c.check("scale", &shape, mode, &got, &want);
        let mut gz = c.gpu.alloc(len, r).unwrap();
        c.gpu.copy(gm!(c, gz), gv!(c, gy));
        let got = c.down(&gz);
        let want = c.stored(&want, r);
        c.check("copy (cast)", &shape, mode, &got, &want);
        let ss_cpu = c.cpu.sum_squares(&x).unwrap();
        let ss_gpu = c.gpu.sum_squares(gv!(c, gx)).unwrap();
        c.check(
            "sum_squares",
            &shape,
            Mode::F32,
            &[ss_gpu as f32],
            &[ss_cpu as f32],
        );
    }
    // A NaN anywhere makes sum_squares non-finite.
    let mut x = vec![1.0f32; 5000];
    x[4321] = f32::NAN;
    let gx = c.up(&x, r);
    let ss = c.gpu.sum_squares(gv!(c, gx)).unwrap();
    if ss.is_finite() {
        c.failures.push("sum_squares missed a NaN".into());
    }
}

/// In-place dropout on a sub-view (the mask index counts from the view's start), ragged lengths.
/// f32 mode: the mask is integer logic and the scale one fp32 multiply, so the result must be
/// bit-identical (checked exactly, beyond the 1e-5 table entry); mixed: one bf16 rounding of the
/// same product, also identical since the CPU input is the stored bf16 value and the CPU output is
/// rounded the same way here.
fn dropout(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (len, p) in [
        (1usize, 0.5f32),
        (1023, 0.1),
        (4097, 0.05),
        ((1 << 20) + 3, 0.3),
    ] {
        let off = 7usize;
        let x = c.rand(len + off, 2.0, r);
        let key: u64 = c.rng.random();
        let mut want = x.clone();
        c.cpu.dropout(&mut want[off..], p, key);
        let want = c.stored(&want, r);
        let mut gx = c.up(&x, r);
        c.gpu
            .dropout(c.gpu.view_mut(&mut gx, off..len + off), p, key);
        let got = c.down(&gx);
        let shape = format!("len{len}+{off} p{p}");
        c.check("dropout", &shape, mode, &got, &want);
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.to_bits() != w.to_bits())
            .count();
        if differ != 0 {
            c.failures.push(format!(
                "dropout {shape} {}: {differ} elements not bit-identical",
                mode.name()
            ));
        }
    }
}

/// `fill_uniform` on a view that starts at an unaligned offset (index counted from the view), at
/// ragged lengths. The fp32 kernel computes the same hash, exact `u` and one correctly rounded fma
/// as the CPU, so it must match bit for bit; the bf16 buffer must hold the CPU value rounded to bf16.
fn fill_uniform(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (len, seed, lo, hi) in [
        (1usize, 7u64, -1.0f32, 1.0f32),
        (1000, 8, -0.02, 0.02),
        (1 << 20, 9, 0.5, 3.0),
        (333, 10, 1.0, 1.0),
    ] {
        let off = 3;
        let mut want = vec![0.0f32; len];
        c.cpu.fill_uniform(&mut want, seed, lo, hi);
        let mut g = c.gpu.alloc(off + len, r).unwrap();
        c.gpu
            .fill_uniform(c.gpu.view_mut(&mut g, off..off + len), seed, lo, hi);
        let got = c.down(&g);
        let want = c.stored(&want, r);
        let shape = format!("len{len} [{lo},{hi}) off{off}");
        c.check("fill_uniform", &shape, mode, &got[off..], &want);
        let exact = got[off..]
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        if exact != len || got[..off].iter().any(|&x| x != 0.0) {
            c.failures.push(format!(
                "fill_uniform {shape} {}: {exact}/{len} bit-identical, prefix {:?}",
                mode.name(),
                &got[..off]
            ));
        }
    }
}

/// The trait-level fused ops the model calls (`Backend::lm_head_cross_entropy_*` and
/// `Backend::attention_rope_*`): CUDA's overrides against the CPU backend's composite defaults,
/// each side with the buffers its own `lm_head_cross_entropy_buffers` asks for and with q/k as its
/// own forward left them (the default rotates in place, the fused kernel does not). Beyond the
/// kernel entries above this covers the adapters: the `[n, 8192]` chunking at V > 8192 (two
/// chunks, the last ragged), `dx =` over stale content, `dw +=` and a frozen lm_head (`dw` none),
/// and a RoPE position offset. Tolerances as `Mode::tol` (`f32`: every buffer fp32, the order of
/// the sums only; `mixed`: bf16 storage of the inputs, the logits chunk and the outputs).
#[test]
fn fused_trait_ops_match_the_composite_defaults() {
    let Some(gpu) = gpu_or_skip(Half::Bf16) else {
        return;
    };
    let mut c = Ctx {
        gpu,
        cpu: CpuBackend::new(),
        rng: ChaCha8Rng::seed_from_u64(7),
        failures: Vec::new(),
        half16: false,
    };
    for mode in [Mode::F32, Mode::Mixed] {
        trait_lm_head_ce(&mut c, mode);
        trait_attention_rope(&mut c, mode);
    }
    c.gpu.synchronize().expect("no CUDA error queued");
    assert!(
        c.failures.is_empty(),
        "{} parity failures:\n{}",
        c.failures.len(),
        c.failures.join("\n")
    );
}

fn trait_lm_head_ce(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (n, ch, v) in [(37usize, 64usize, 9000usize), (5, 64, 7)] {
        let x = c.rand(n * ch, 1.0, r);
        let w = c.rand(v * ch, 1.0, r);
        let t = targets(c, n, v);
        let scale = 0.37;
        let dx0 = c.rand(n * ch, 1.0, r);
        let dw0 = c.rand(v * ch, 1.0, Role::Fp32);
        // CPU: the composite default.
        let cb = c.cpu.lm_head_cross_entropy_buffers(n, v, true);
        let (mut clog, mut clse, mut cscr) = (
            vec![0.0; cb.logits],
            vec![0.0; cb.lse],
            vec![0.0; cb.scratch],
        );
        let mut losses = vec![0.0; n];
        Backend::lm_head_cross_entropy_forward(
            &c.cpu,
            &mut losses,
            &mut clse,
            &mut clog,
            &mut cscr,
            LmHeadIn {
                x: &x,
                w: &w,
                targets: &t,
            },
            LmHeadShape { n, c: ch, v },
        );
        // GPU: the fused override.
        let gb = c.gpu.lm_head_cross_entropy_buffers(n, v, true);
        let mut glog = c.gpu.alloc(gb.logits, r).unwrap();
        let mut glse = c.gpu.alloc(gb.lse, Role::Fp32).unwrap();
        let mut gscr = c.gpu.alloc(gb.scratch, r).unwrap();
        let mut gloss = c.gpu.alloc(n, Role::Fp32).unwrap();
        let (gx, gw, gt) = (c.up(&x, r), c.up(&w, r), c.ids(&t));
        Backend::lm_head_cross_entropy_forward(
            &c.gpu,
            gm!(c, gloss),
            &mut glse,
            &mut glog,
            &mut gscr,
            LmHeadIn {
                x: gv!(c, gx),
                w: gv!(c, gw),
                targets: &gt,
            },
            LmHeadShape { n, c: ch, v },
        );
        let shape = format!("n{n} c{ch} v{v}");
        let got = c.down(&gloss);
        c.check(
            "trait lm_head_ce_forward losses",
            &shape,
            mode,
            &got,
            &losses,
        );
        for frozen in [false, true] {
            let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
            Backend::lm_head_cross_entropy_backward(
                &c.cpu,
                &mut dx,
                (!frozen).then_some(&mut dw[..]),
                &mut cscr,
                LmHeadSaved {
                    x: &x,
                    w: &w,
                    logits: &clog,
                    lse: &clse,
                    targets: &t,
                },
                LmHeadShape { n, c: ch, v },
                scale,
            );
            let (mut gdx, mut gdw) = (c.up(&dx0, r), c.up(&dw0, Role::Fp32));
            let gdw_view = if frozen { None } else { Some(gm!(c, gdw)) };
            Backend::lm_head_cross_entropy_backward(
                &c.gpu,
                gm!(c, gdx),
                gdw_view,
                &mut gscr,
                LmHeadSaved {
                    x: gv!(c, gx),
                    w: gv!(c, gw),
                    logits: &glog,
                    lse: &glse,
                    targets: &gt,
                },
                LmHeadShape { n, c: ch, v },
                scale,
            );
            let tag = if frozen { " frozen" } else { "" };
            let got = c.down(&gdx);
            c.check(
                &format!("trait lm_head_ce dx (=){tag}"),
                &shape,
                mode,
                &got,
                &dx,
            );
            let got = c.down(&gdw);
            c.check(
                &format!("trait lm_head_ce dw (+=){tag}"),
                &shape,
                mode,
                &got,
                &dw,
            );
        }
        // The public method (what cuda-bench times) is the trait's code: from a zero dx and the
        // same chunk buffer it gives the trait's dx and dw bit for bit (a dx rounded to 16 bits
        // after each vocabulary chunk would not).
        let zeros = vec![0.0; n * ch];
        let (mut tdx, mut tdw) = (c.up(&zeros, r), c.up(&dw0, Role::Fp32));
        Backend::lm_head_cross_entropy_backward(
            &c.gpu,
            gm!(c, tdx),
            Some(gm!(c, tdw)),
            &mut gscr,
            LmHeadSaved {
                x: gv!(c, gx),
                w: gv!(c, gw),
                logits: &glog,
                lse: &glse,
                targets: &gt,
            },
            LmHeadShape { n, c: ch, v },
            scale,
        );
        let (mut pdx, mut pdw) = (c.up(&zeros, r), c.up(&dw0, Role::Fp32));
        c.gpu.lm_head_cross_entropy_backward(
            gm!(c, pdx),
            gm!(c, pdw),
            gm!(c, gscr),
            LmHeadCeSaved {
                x: gv!(c, gx),
                w: gv!(c, gw),
                lse: gv!(c, glse),
                targets: &gt,
            },
            LmHeadShape { n, c: ch, v },
            scale,
        );
        for (what, a, b) in [("dx", &tdx, &pdx), ("dw", &tdw, &pdw)] {
            let (a, b) = (c.down(a), c.down(b));
            let differ = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            if differ > 0 {
                c.failures.push(format!(
                    "public lm_head_ce backward {what} {shape} {mode:?}: {differ} of {} elements differ from the trait path",
                    a.len()
                ));
            }
        }
    }
}

fn trait_attention_rope(c: &mut Ctx, mode: Mode) {
    let r = mode.data();
    for (b, t, h, hkv, d, off) in [(2, 37, 4, 2, 64, 3), (1, 70, 2, 1, 128, 0)] {
        let theta = 10000.0f32;
        let shape = format!("b{b} t{t} h{h}/{hkv} d{d} +{off}");
        let q = c.rand(b * t * h * d, 1.0, r);
        let k = c.rand(b * t * hkv * d, 1.0, r);
        let v = c.rand(b * t * hkv * d, 1.0, r);
        let dout = c.rand(b * t * h * d, 1.0, r);
        let (mut cq, mut ck) = (q.clone(), k.clone());
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
        Backend::attention_rope_forward(
            &c.cpu,
            &mut out,
            &mut lse,
            &mut cq,
            &mut ck,
            &v,
            AttnShape { b, t, h, hkv, d }.with_rope(theta, off),
        );
        let (mut gq, mut gk, gvv, gd) = (c.up(&q, r), c.up(&k, r), c.up(&v, r), c.up(&dout, r));
        let mut gout = c.gpu.alloc(q.len(), r).unwrap();
        let mut glse = c.gpu.alloc(b * h * t, Role::Fp32).unwrap();
        Backend::attention_rope_forward(
            &c.gpu,
            gm!(c, gout),
            gm!(c, glse),
            &mut gq,
            &mut gk,
            gv!(c, gvv),
            AttnShape { b, t, h, hkv, d }.with_rope(theta, off),
        );
        let got = c.down(&gout);
        c.check("trait attention_rope out", &shape, mode, &got, &out);
        let got = c.down(&glse);
        c.check("trait attention_rope lse", &shape, mode, &got, &lse);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        Backend::attention_rope_backward(
            &c.cpu,
            &mut dq,
            &mut dk,
            &mut dv,
            &dout,
            AttnSaved {
                q: &cq,
                k: &ck,
                v: &v,
                out: &out,
                lse: &lse,
            },
            AttnShape { b, t, h, hkv, d }.with_rope(theta, off),
        );
        let mut gdq = c.gpu.alloc(q.len(), r).unwrap();
        let mut gdk = c.gpu.alloc(k.len(), r).unwrap();
        let mut gdv = c.gpu.alloc(v.len(), r).unwrap();
        Backend::attention_rope_backward(
            &c.gpu,
            &mut gdq,
            &mut gdk,
            gm!(c, gdv),
            gv!(c, gd),
            AttnSaved {
                q: gv!(c, gq),
                k: gv!(c, gk),
                v: gv!(c, gvv),
                out: gv!(c, gout),
                lse: gv!(c, glse),
            },
            AttnShape { b, t, h, hkv, d }.with_rope(theta, off),
        );
        for (name, g, w) in [("dq", &gdq, &dq), ("dk", &gdk, &dk), ("dv", &gdv, &dv)] {
            let got = c.down(g);
            c.check(
                &format!("trait attention_rope {name}"),
                &shape,
                mode,
                &got,
                w,
            );
        }
    }
}

/// Host-side start-up and launch rules that only a device can confirm: the memory pool keeps freed
/// memory, and the cached attention runs past the 48 KiB default shared-memory limit (13000
/// positions: 52000 B of scores + the kernel's static scratch) with the CPU's result (f32 storage:
/// tol 1e-5 normalised, the same fp32 arithmetic in another order).
#[test]
fn pool_threshold_and_long_cached_attention() {
    let Some(gpu) = gpu_or_skip(Half::Bf16) else {
        return;
    };
    assert_eq!(
        gpu.mem_pool_release_threshold().unwrap(),
        u64::MAX,
        "the default memory pool still returns freed memory at every sync"
    );
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (b, tq, past, h, hkv, d) = (1usize, 1usize, 12999usize, 2usize, 1usize, 64usize);
    let tmax = past + tq;
    let mut rand =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect() };
    let (q, kc, vc) = (
        rand(b * tq * h * d),
        rand(b * tmax * hkv * d),
        rand(b * tmax * hkv * d),
    );
    let mut want = vec![0.0; q.len()];
    cpu.attention_cached_forward(
        &mut want,
        &q,
        &kc,
        &vc,
        CachedAttnShape {
            b,
            tq,
            past,
            tmax,
            h,
            hkv,
            d,
        },
    );
    let up = |v: &[f32]| {
        let mut buf = gpu.alloc(v.len(), Role::Fp32).unwrap();
        gpu.upload(&mut buf, v).unwrap();
        buf
    };
    let (gq, gk, gv) = (up(&q), up(&kc), up(&vc));
    let mut gout = gpu.alloc(q.len(), Role::Fp32).unwrap();
    gpu.attention_cached_forward(
        gpu.view_mut(&mut gout, 0..q.len()),
        gpu.view(&gq, 0..q.len()),
        gpu.view(&gk, 0..kc.len()),
        gpu.view(&gv, 0..vc.len()),
        CachedAttnShape {
            b,
            tq,
            past,
            tmax,
            h,
            hkv,
            d,
        },
    );
    gpu.synchronize()
        .expect("the long cached attention launch failed");
    let mut got = vec![0.0; q.len()];
    gpu.download(&gout, &mut got).unwrap();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        err / scale <= 1e-5,
        "attention_cached_forward at {tmax} positions: rel err {}",
        err / scale
    );
}
