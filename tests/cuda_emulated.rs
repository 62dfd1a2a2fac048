//! The CUDA kernels' logic checked without a GPU: `kernels/*.cu` compiled unchanged by the host C++
//! compiler against a CPU emulation of the CUDA execution model (`tests/cuda_emu/emu.h`: a
//! std::thread per CUDA thread, barriers for `__syncthreads` and warp shuffles), launched with the
//! CUDA launchers' own geometry (`zhllama::backend::cuda::grid`, which the launchers call) and the
//! same arguments, and compared with the CPU backend. One test per op family, plus one per 16-bit
//! storage type for the bf16 and f16 instances.
//!
//! What this verifies: indexing, tiling, online softmax and masking, RoPE-on-load, GQA head mapping,
//! the block/warp reductions, the deterministic two-stage reductions and argument order. What it
//! cannot: timing, memory ordering across blocks, occupancy, or NVRTC's code generation (see
//! tests/cuda_parity.rs on a GPU). Skips with a message when no `g++` is installed.
//!
//! Tolerances (normalised max error `max|emu − cpu| / max|cpu|`, as in tests/cuda_parity.rs):
//! fp32 kernels 1e-5 (same fp32 arithmetic in a different order: blocks, warps, exp2 vs exp);
//! bf16 kernels 1e-2 (bf16 storage of the outputs, 2⁻⁹ relative each); dropout 0 (bit-identical:
//! integer mask, one fp32 multiply, at most one rounding to bf16 on both sides); f16 kernels 2.5e-3
//! (see `TOL_F16`).

mod skip_common;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use zhllama::backend::cpu::CpuBackend;
use zhllama::backend::cuda::grid::{self, Launch};
use zhllama::backend::cuda::kernels;
use zhllama::backend::{AdamW, Backend};
use zhllama::backend::{AttnSaved, AttnShape, RmsNormSaved, RopeShape, RowShape};

/// f16 storage: 2⁻¹¹ ≈ 4.9e-4 relative rounding per stored output (4× finer than bf16's 2⁻⁹, so
/// the bf16 bound 1e-2 scaled by ¼), `+=` outputs round twice. Inputs are drawn inside f16's normal
/// range (|x| ≤ 8); values that land below it (softmax tails, < 6.1e-5) lose absolute precision
/// only at the ~6e-8 subnormal step, invisible in the error normalised by the tensor's max.
const TOL_F16: f64 = 2.5e-3;

/// The SM count the SM-bounded launch geometries (rmsnorm backward, AdamW, the reductions) are
/// computed for: one SM gives their smallest grids, so the kernels' grid-stride loops run several
/// rounds at these small sizes.
const SM: u32 = 1;

struct Emu {
    exe: PathBuf,
    dir: tempfile::TempDir,
    script: String,
    next: usize,
}

impl Emu {
    fn new(exe: &Path) -> Emu {
        Emu {
            exe: exe.to_path_buf(),
            dir: tempfile::tempdir().unwrap(),
            script: String::new(),
            next: 0,
        }
    }
    fn put(&mut self, kind: char, bytes: Option<Vec<u8>>, len: usize) -> usize {
        let id = self.next;
        self.next += 1;
        if let Some(b) = bytes {
            std::fs::write(self.dir.path().join(format!("in{id}.bin")), b).unwrap();
        }
        writeln!(self.script, "{kind} {id} {len}").unwrap();
        id
    }
    fn f32(&mut self, v: &[f32]) -> usize {
        self.put(
            'b',
            Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            v.len(),
        )
    }
    fn bf16(&mut self, v: &[f32]) -> usize {
        self.put(
            'B',
            Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            v.len(),
        )
    }
    fn i32(&mut self, v: &[i32]) -> usize {
        self.put(
            'i',
            Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            v.len(),
        )
    }
    fn f16(&mut self, v: &[f32]) -> usize {
        self.put(
            'H',
            Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            v.len(),
        )
    }
    fn zeros_f16(&mut self, len: usize) -> usize {
        self.put('H', None, len)
    }
    fn zeros(&mut self, len: usize) -> usize {
        self.put('b', None, len)
    }
    fn zeros_bf16(&mut self, len: usize) -> usize {
        self.put('B', None, len)
    }
    fn zeros_f64(&mut self, len: usize) -> usize {
        self.put('D', None, len)
    }
    /// Queue a launch with the geometry the CUDA launcher uses (`grid`); `args` in the kernel's
    /// order: `p<id>`, `i<v>`, `l<v>`, `u<v>`, `q<v>`, `f<v>`.
    fn launch(&mut self, name: &str, at: Launch, args: &[String]) {
        assert_eq!(
            at.smem, 0,
            "{name}: the driver gives no dynamic shared memory"
        );
        writeln!(
            self.script,
            "L {name} {} {} {} {} {}",
            at.grid.0,
            at.grid.1,
            at.grid.2,
            at.block,
            args.join(" ")
        )
        .unwrap();
    }
    /// Run the script, then read back the buffers `ids` (as f32).
    fn run(&mut self, ids: &[usize]) -> Vec<Vec<f32>> {
        for id in ids {
            writeln!(self.script, "d {id}").unwrap();
        }
        let mut child = Command::new(&self.exe)
            .arg(self.dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("run the emulation driver");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.script.as_bytes())
            .unwrap();
        let st = child.wait().unwrap();
        assert!(
            st.success(),
            "emulation driver failed ({st}) on script:\n{}",
            self.script
        );
        self.script.clear();
        ids.iter()
            .map(|id| {
                let b = std::fs::read(self.dir.path().join(format!("out{id}.bin"))).unwrap();
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            })
            .collect()
    }
}

fn p(id: usize) -> String {
    format!("p{id}")
}
fn i(v: usize) -> String {
    format!("i{v}")
}
fn f(v: f32) -> String {
    format!("f{v:e}")
}

/// The RoPE frequency table argument the launchers pass: `inv_freq[i]` from the CPU reference's
/// `ops::rope::inv_freq` for theta > 0, a null pointer (no RoPE) for theta = 0.
fn rope_table(e: &mut Emu, theta: f32, d: usize) -> String {
    if theta == 0.0 {
        return "n0".into();
    }
    let t: Vec<f32> = (0..d / 2)
        .map(|i| zhllama::ops::rope::inv_freq(theta, d, i))
        .collect();
    p(e.f32(&t))
}

fn check(failures: &mut Vec<String>, what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .fold(0f64, |m, &x| m.max((x as f64).abs()))
        .max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    let finite = got.iter().all(|x| x.is_finite());
    let rel = err / scale;
    println!(
        "{what:<52} rel err {rel:.3e} (tol {tol:.0e}){}",
        if finite && rel <= tol { "" } else { "  FAIL" }
    );
    if !finite || rel > tol {
        failures.push(format!("{what}: rel err {rel:.3e}, finite {finite}"));
    }
}

fn bf(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

fn hf(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// The emulation driver, built once per test run into cargo's scratch directory for this test
/// (`None`, with a skip message, without `g++`).
fn driver() -> Option<&'static Path> {
    static DRIVER: OnceLock<Option<PathBuf>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            if Command::new("g++").arg("--version").output().is_err() {
                skip_common::skip(
                    "no g++ to build the kernel emulation (tools/test.sh installs it)",
                );
                return None;
            }
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emu_driver");
            let out = Command::new("g++")
                .args(["-std=c++20", "-O1", "-pthread", "-I"])
                .arg(root.join("tests/cuda_emu"))
                .arg(root.join("tests/cuda_emu/driver.cpp"))
                .arg("-o")
                .arg(&exe)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "building the emulation driver failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(exe)
        })
        .as_deref()
}

fn finish(fails: &[String]) {
    assert!(
        fails.is_empty(),
        "{} mismatches:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

/// Attention with RoPE on load, forward and backward: fp32 kernels at four shapes, the bf16
/// forward.
#[test]
fn attention() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- attention (+ RoPE on load), forward and backward, fp32 kernels ----
    // Positions from `pos0`: 3 (the start of a sequence) and 3000 (deep into a long context, where
    // an angle error from an inexact inv_freq is ~3000× larger).
    for (b, t, h, hkv, d, theta, pos0) in [
        (2usize, 37usize, 4usize, 2usize, 64usize, 0.0f32, 3usize),
        (2, 37, 4, 2, 64, 10000.0, 3),
        (1, 40, 2, 1, 128, 10000.0, 3),
        (1, 33, 2, 1, 64, 10000.0, 3000),
    ] {
        let shape = format!("b{b} t{t} h{h}/{hkv} d{d} theta{theta} pos{pos0}");
        let (q, k, v, dout) = (
            rand(b * t * h * d, 1.0),
            rand(b * t * hkv * d, 1.0),
            rand(b * t * hkv * d, 1.0),
            rand(b * t * h * d, 1.0),
        );
        let (mut qr, mut kr) = (q.clone(), k.clone());
        let attn_rope = AttnShape { b, t, h, hkv, d }.with_rope(theta, pos0);
        if theta > 0.0 {
            cpu.rope_forward(&mut qr, attn_rope.rope_q());
            cpu.rope_forward(&mut kr, attn_rope.rope_k());
        }
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
        cpu.attention_forward(&mut out, &mut lse, &qr, &kr, &v, attn_rope.attn);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        cpu.attention_backward(
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
            attn_rope.attn,
        );
        if theta > 0.0 {
            cpu.rope_backward(&mut dq, attn_rope.rope_q());
            cpu.rope_backward(&mut dk, attn_rope.rope_k());
        }
        let (iq, ik, iv, id) = (e.f32(&q), e.f32(&k), e.f32(&v), e.f32(&dout));
        let (io, il) = (e.zeros(q.len()), e.zeros(b * h * t));
        let tail = [
            i(b),
            i(t),
            i(h),
            i(hkv),
            rope_table(&mut e, theta, d),
            i(pos0),
        ];
        let mut a = vec![p(io), p(il), p(iq), p(ik), p(iv)];
        a.extend_from_slice(&tail);
        e.launch(
            &format!("attention_forward_v1_d{d}_f32"),
            grid::attention_query_tiles(b, t, h),
            &a,
        );
        let delta = e.zeros(b * h * t);
        e.launch(
            "attention_backward_delta_v1_f32",
            grid::attention_delta(b * t * h),
            &[p(delta), p(id), p(io), i(b), i(t), i(h), i(d)],
        );
        let (idq, idk, idv) = (e.zeros(q.len()), e.zeros(k.len()), e.zeros(v.len()));
        let mut a = vec![p(idk), p(idv), p(id), p(iq), p(ik), p(iv), p(il), p(delta)];
        a.extend_from_slice(&tail);
        e.launch(
            &format!("attention_backward_dkdv_v1_d{d}_f32"),
            grid::attention_key_tiles(b, t, hkv),
            &a,
        );
        let mut a = vec![p(idq), p(id), p(iq), p(ik), p(iv), p(il), p(delta)];
        a.extend_from_slice(&tail);
        e.launch(
            &format!("attention_backward_dq_v1_d{d}_f32"),
            grid::attention_query_tiles(b, t, h),
            &a,
        );
        let r = e.run(&[io, il, idq, idk, idv]);
        check(
            &mut fails,
            &format!("attention_forward out {shape}"),
            &r[0],
            &out,
            1e-5,
        );
        check(
            &mut fails,
            &format!("attention_forward lse {shape}"),
            &r[1],
            &lse,
            1e-5,
        );
        check(
            &mut fails,
            &format!("attention_backward dq {shape}"),
            &r[2],
            &dq,
            1e-5,
        );
        check(
            &mut fails,
            &format!("attention_backward dk {shape}"),
            &r[3],
            &dk,
            1e-5,
        );
        check(
            &mut fails,
            &format!("attention_backward dv {shape}"),
            &r[4],
            &dv,
            1e-5,
        );
    }
    // bf16 attention forward (the training variant's loads and stores).
    {
        let (b, t, h, hkv, d) = (1usize, 33usize, 2usize, 1usize, 64usize);
        let (q, k, v) = (
            bf(&rand(b * t * h * d, 1.0)),
            bf(&rand(b * t * hkv * d, 1.0)),
            bf(&rand(b * t * hkv * d, 1.0)),
        );
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
        cpu.attention_forward(
            &mut out,
            &mut lse,
            &q,
            &k,
            &v,
            AttnShape { b, t, h, hkv, d },
        );
        let (iq, ik, iv) = (e.bf16(&q), e.bf16(&k), e.bf16(&v));
        let (io, il) = (e.zeros_bf16(q.len()), e.zeros(b * h * t));
        let a = [
            p(io),
            p(il),
            p(iq),
            p(ik),
            p(iv),
            i(b),
            i(t),
            i(h),
            i(hkv),
            "n0".into(),
            i(0),
        ];
        e.launch(
            "attention_forward_v1_d64_bf16",
            grid::attention_query_tiles(b, t, h),
            &a,
        );
        let r = e.run(&[io, il]);
        check(
            &mut fails,
            "attention_forward_v1_d64_bf16 out",
            &r[0],
            &out,
            1e-2,
        );
        check(
            &mut fails,
            "attention_forward_v1_d64_bf16 lse",
            &r[1],
            &lse,
            1e-2,
        );
    }

    finish(&fails);
}

/// Standalone RoPE, near the start and deep into a 4K context.
#[test]
fn rope() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- RoPE standalone, near the start and deep into a 4K context ----
    for (d, pos0) in [(8usize, 7usize), (128, 4000)] {
        let (b, t, h) = (2usize, 5usize, 3usize);
        let x = rand(b * t * h * d, 1.0);
        let (mut fw, mut bw) = (x.clone(), x.clone());
        cpu.rope_forward(
            &mut fw,
            RopeShape {
                b,
                t,
                h,
                d,
                theta: 10000.0,
                pos_offset: pos0,
            },
        );
        cpu.rope_backward(
            &mut bw,
            RopeShape {
                b,
                t,
                h,
                d,
                theta: 10000.0,
                pos_offset: pos0,
            },
        );
        let (i1, i2) = (e.f32(&x), e.f32(&x));
        let table = rope_table(&mut e, 10000.0, d);
        let a = |id| [p(id), i(b), i(t), i(h), i(d), table.clone(), i(pos0)];
        e.launch("rope_forward_v1_f32", grid::rope(b * t * h * d / 2), &a(i1));
        e.launch(
            "rope_backward_v1_f32",
            grid::rope(b * t * h * d / 2),
            &a(i2),
        );
        let r = e.run(&[i1, i2]);
        check(
            &mut fails,
            &format!("rope_forward d{d} pos{pos0}"),
            &r[0],
            &fw,
            1e-5,
        );
        check(
            &mut fails,
            &format!("rope_backward d{d} pos{pos0}"),
            &r[1],
            &bw,
            1e-5,
        );
    }

    finish(&fails);
}

/// The CPU reference of RMSNorm over `n` rows of `c` (eps 1e-6): the forward's `(out, rstd)`, then
/// the backward's `(dx, dw)` accumulated onto `dx0`, `dw0`.
fn rmsnorm_reference(
    cpu: &CpuBackend,
    [x, w, dout, dx0, dw0]: [&[f32]; 5],
    n: usize,
    c: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
    cpu.rmsnorm_forward(&mut out, &mut rstd, x, w, RowShape { n, c }, 1e-6);
    let (mut dx, mut dw) = (dx0.to_vec(), dw0.to_vec());
    cpu.rmsnorm_backward(
        &mut dx,
        &mut dw,
        dout,
        RmsNormSaved { x, w, rstd: &rstd },
        RowShape { n, c },
    );
    (out, rstd, dx, dw)
}

/// RMSNorm forward and backward, fp32.
#[test]
fn rmsnorm() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- RMSNorm forward / backward (on a one-SM device the backward runs 2 blocks over 7 rows:
    // the grid-stride path) ----
    for (n, c) in [(7usize, 60usize), (3, 2048)] {
        let (x, w, dout, dx0, dw0) = (
            rand(n * c, 2.0),
            rand(c, 1.0),
            rand(n * c, 1.0),
            rand(n * c, 1.0),
            rand(c, 1.0),
        );
        let (out, rstd, dx, dw) = rmsnorm_reference(&cpu, [&x, &w, &dout, &dx0, &dw0], n, c);
        let (ix, iw, id, idx, idw) = (e.f32(&x), e.f32(&w), e.f32(&dout), e.f32(&dx0), e.f32(&dw0));
        let (io, ir) = (e.zeros(n * c), e.zeros(n));
        e.launch(
            "rmsnorm_forward_v1_f32",
            grid::rmsnorm_forward(n),
            &[p(io), p(ir), p(ix), p(iw), i(n), i(c), f(1e-6)],
        );
        let nb = grid::rmsnorm_backward_blocks(n, SM);
        let part = e.zeros(nb * c);
        e.launch(
            "rmsnorm_backward_v1_f32",
            grid::rmsnorm_backward(nb),
            &[p(idx), p(part), p(id), p(ix), p(iw), p(ir), i(n), i(c)],
        );
        e.launch(
            "rmsnorm_dw_reduce_v1_f32",
            grid::rmsnorm_dw_reduce(c),
            &[p(idw), p(part), i(nb), i(c)],
        );
        let r = e.run(&[io, ir, idx, idw]);
        check(
            &mut fails,
            &format!("rmsnorm_forward out n{n} c{c}"),
            &r[0],
            &out,
            1e-5,
        );
        check(
            &mut fails,
            &format!("rmsnorm_forward rstd n{n} c{c}"),
            &r[1],
            &rstd,
            1e-5,
        );
        check(
            &mut fails,
            &format!("rmsnorm_backward dx n{n} c{c}"),
            &r[2],
            &dx,
            1e-5,
        );
        check(
            &mut fails,
            &format!("rmsnorm_backward dw n{n} c{c}"),
            &r[3],
            &dw,
            1e-5,
        );
    }

    finish(&fails);
}

/// SwiGLU forward and backward, fp32.
#[test]
fn swiglu() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- SwiGLU ----
    {
        let len = 1000usize;
        let (g, u, d) = (rand(len, 4.0), rand(len, 2.0), rand(len, 1.0));
        let mut out = vec![0.0; len];
        cpu.swiglu_forward(&mut out, &g, &u);
        let (mut dg, mut du) = (vec![0.0; len], vec![0.0; len]);
        cpu.swiglu_backward(&mut dg, &mut du, &d, &g, &u);
        let (ig, iu, id) = (e.f32(&g), e.f32(&u), e.f32(&d));
        let (io, idg, idu) = (e.zeros(len), e.zeros(len), e.zeros(len));
        e.launch(
            "swiglu_forward_v1_f32",
            grid::swiglu(len, true),
            &[p(io), p(ig), p(iu), format!("l{len}")],
        );
        e.launch(
            "swiglu_backward_v1_f32",
            grid::swiglu(len, true),
            &[p(idg), p(idu), p(id), p(ig), p(iu), format!("l{len}")],
        );
        let r = e.run(&[io, idg, idu]);
        check(&mut fails, "swiglu_forward", &r[0], &out, 1e-5);
        check(&mut fails, "swiglu_backward dgate", &r[1], &dg, 1e-5);
        check(&mut fails, "swiglu_backward dup", &r[2], &du, 1e-5);
    }

    finish(&fails);
}

/// Embedding forward and the deterministic backward through the host CSR grouping.
#[test]
fn embedding() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- embedding forward / deterministic backward through the host CSR ----
    {
        let (n, v, c) = (40usize, 9usize, 12usize);
        let ids: Vec<i32> = (0..n).map(|k| ((k * 7) % v) as i32).collect();
        let (table, dout, d0) = (rand(v * c, 1.0), rand(n * c, 1.0), rand(v * c, 1.0));
        let mut out = vec![0.0; n * c];
        cpu.embedding_forward(&mut out, &ids, &table, n, c);
        let mut dt = d0.clone();
        cpu.embedding_backward(&mut dt, &dout, &ids, n, c);
        let (uniq, offsets, positions) = kernels::group_positions(&ids);
        let (iids, it, id, idt) = (e.i32(&ids), e.f32(&table), e.f32(&dout), e.f32(&d0));
        let (iu, ioff, ipos) = (e.i32(&uniq), e.i32(&offsets), e.i32(&positions));
        let io = e.zeros(n * c);
        e.launch(
            "embedding_forward_v1_f32",
            grid::embedding_forward(n),
            &[p(io), p(iids), p(it), i(n), i(c)],
        );
        e.launch(
            "embedding_backward_v1_f32",
            grid::embedding_backward(uniq.len()),
            &[p(idt), p(id), p(iu), p(ioff), p(ipos), i(c)],
        );
        let r = e.run(&[io, idt]);
        check(&mut fails, "embedding_forward", &r[0], &out, 1e-5);
        check(&mut fails, "embedding_backward", &r[1], &dt, 1e-5);
    }

    finish(&fails);
}

/// Cross-entropy over full rows and the fused lm_head kernels over vocabulary chunks.
#[test]
fn cross_entropy() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- cross-entropy (full rows) and the chunked lm_head pieces ----
    {
        let (n, v) = (6usize, 1000usize);
        let logits = rand(n * v, 8.0);
        let t: Vec<i32> = (0..n)
            .map(|k| if k == 2 { -100 } else { ((k * 331) % v) as i32 })
            .collect();
        let mut losses = vec![0.0; n];
        cpu.cross_entropy_forward(&mut losses, &logits, &t, n, v);
        let mut dl = vec![0.0; n * v];
        cpu.cross_entropy_backward(&mut dl, &logits, &t, n, v, 0.2);
        let (il, itg) = (e.f32(&logits), e.i32(&t));
        let (iloss, idl) = (e.zeros(n), e.zeros(n * v));
        e.launch(
            "cross_entropy_forward_v1_f32",
            grid::cross_entropy_rows(n),
            &[p(iloss), p(il), p(itg), i(n), i(v)],
        );
        e.launch(
            "cross_entropy_backward_v1_f32",
            grid::cross_entropy_rows(n),
            &[p(idl), p(il), p(itg), i(n), i(v), f(0.2)],
        );
        // Chunked: columns [v0, v0 + vc) of the same logits, copied into a [n, vc] chunk each time.
        let vc = 300usize;
        let (stats, tlog, lse2, loss2) = (e.zeros(2 * n), e.zeros(n), e.zeros(n), e.zeros(n));
        let mut chunks = Vec::new();
        let mut v0 = 0;
        while v0 < v {
            let w = vc.min(v - v0);
            let chunk: Vec<f32> = (0..n)
                .flat_map(|r| logits[r * v + v0..r * v + v0 + w].to_vec())
                .collect();
            let ic = e.f32(&chunk);
            e.launch(
                "lmhead_ce_chunk_forward_v1_f32",
                grid::cross_entropy_rows(n),
                &[
                    p(stats),
                    p(tlog),
                    p(ic),
                    p(itg),
                    i(n),
                    i(w),
                    i(v0),
                    i((v0 == 0) as usize),
                ],
            );
            chunks.push((ic, v0, w));
            v0 += w;
        }
        e.launch(
            "lmhead_ce_finish_v1_f32",
            grid::lm_head_ce_finish(n),
            &[p(loss2), p(lse2), p(stats), p(tlog), p(itg), i(n)],
        );
        for &(ic, v0, w) in &chunks {
            e.launch(
                "lmhead_ce_chunk_backward_v1_f32",
                grid::cross_entropy_rows(n),
                &[p(ic), p(lse2), p(itg), i(n), i(w), i(v0), f(0.2)],
            );
        }
        let mut ids = vec![iloss, idl, loss2];
        ids.extend(chunks.iter().map(|c| c.0));
        let r = e.run(&ids);
        check(&mut fails, "cross_entropy_forward", &r[0], &losses, 1e-5);
        check(&mut fails, "cross_entropy_backward", &r[1], &dl, 1e-5);
        check(&mut fails, "lmhead_ce chunked losses", &r[2], &losses, 1e-5);
        let mut got = vec![0.0; n * v];
        for (k, &(_, v0, w)) in chunks.iter().enumerate() {
            for row in 0..n {
                got[row * v + v0..row * v + v0 + w]
                    .copy_from_slice(&r[3 + k][row * w..row * w + w]);
            }
        }
        check(&mut fails, "lmhead_ce chunked dlogits", &got, &dl, 1e-5);
    }

    finish(&fails);
}

/// AdamW on fp32 master weights writing a bf16 copy.
#[test]
fn adamw() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- AdamW (fp32 everything, writing a bf16 copy) ----
    {
        let len = 3000usize;
        let (pp, m, g) = (rand(len, 1.0), rand(len, 0.1), rand(len, 0.1));
        let v: Vec<f32> = rand(len, 0.01).iter().map(|x| x.abs()).collect();
        let hp = AdamW {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 3,
        };
        let (mut pw, mut mw, mut vw) = (pp.clone(), m.clone(), v.clone());
        cpu.adamw_step(&mut pw, &mut mw, &mut vw, &g, hp);
        let k = kernels::adamw_coefficients(hp);
        let (ip, im, iv, ig) = (e.f32(&pp), e.f32(&m), e.f32(&v), e.f32(&g));
        let icopy = e.zeros_bf16(len);
        let mut a = vec![p(ip), p(im), p(iv), p(ig), p(icopy), format!("l{len}")];
        a.extend(k.iter().map(|&x| f(x)));
        e.launch("adamw_step_v1_f32_f32", grid::adamw(len, SM), &a);
        let r = e.run(&[ip, im, iv, icopy]);
        check(&mut fails, "adamw_step param", &r[0], &pw, 1e-5);
        check(&mut fails, "adamw_step m", &r[1], &mw, 1e-5);
        check(&mut fails, "adamw_step v", &r[2], &vw, 1e-5);
        check(&mut fails, "adamw_step bf16 copy", &r[3], &pw, 1e-2);
    }

    finish(&fails);
}

/// The elementwise family: the f64 reductions and the copies between the two 16-bit
/// formats.
#[test]
fn elementwise() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- f64 sum of squares and sum: per-block partials, one fixed-order finish ----
    {
        let len = 3000usize;
        let x = rand(len, 3.0);
        let ix = e.f32(&x);
        let nparts = grid::reduce_partial(len, SM).grid.0 as usize;
        let (part, out) = (e.zeros_f64(nparts), e.zeros_f64(1));
        e.launch(
            "sum_squares_partial_v1_f32",
            grid::reduce_partial(len, SM),
            &[p(part), p(ix), format!("l{len}")],
        );
        e.launch(
            "sum_squares_finish_v1_f64",
            grid::reduce_finish(),
            &[p(out), p(part), i(nparts)],
        );
        // Σ x over positive values (per-token losses), same two-stage grid as sum_squares.
        let xs: Vec<f32> = rand(len, 3.0).iter().map(|v| v.abs()).collect();
        let ixs = e.f32(&xs);
        let (part2, out2) = (e.zeros_f64(nparts), e.zeros_f64(1));
        e.launch(
            "sum_partial_v1_f32",
            grid::reduce_partial(len, SM),
            &[p(part2), p(ixs), format!("l{len}")],
        );
        e.launch(
            "sum_squares_finish_v1_f64",
            grid::reduce_finish(),
            &[p(out2), p(part2), i(nparts)],
        );
        let r = e.run(&[out, out2]);
        check(
            &mut fails,
            "sum_squares",
            &r[0],
            &[cpu.sum_squares(&x).unwrap() as f32],
            1e-5,
        );
        check(
            &mut fails,
            "sum",
            &r[1],
            &[cpu.sum(&xs).unwrap() as f32],
            1e-5,
        );
    }

    // ---- copies between the two 16-bit formats: one rounding, bit-identical to the host's ----
    // (`half`'s conversions through f32, which `Backend::copy` on the CPU side amounts to). Values
    // span 2⁻¹⁰..2⁶ so both the f16 mantissa (finer than bf16's) and bf16's rounding are exercised.
    {
        let len = 1000;
        let v: Vec<f32> = rand(len, 1.0)
            .iter()
            .enumerate()
            .map(|(k, &x)| x * 2f32.powi((k % 17) as i32 - 10))
            .collect();
        let (src_bf, src_h) = (bf(&v), hf(&v));
        let (ib, ih) = (e.bf16(&src_bf), e.f16(&src_h));
        let (oh, ob) = (e.zeros_f16(len), e.zeros_bf16(len));
        let l = format!("l{len}");
        e.launch(
            "copy_v1_f16_bf16",
            grid::cast(len),
            &[p(oh), p(ib), l.clone()],
        );
        e.launch(
            "copy_v1_bf16_f16",
            grid::cast(len),
            &[p(ob), p(ih), l.clone()],
        );
        let r = e.run(&[oh, ob]);
        check(
            &mut fails,
            "copy_v1_f16_bf16 (exact)",
            &r[0],
            &hf(&src_bf),
            0.0,
        );
        check(
            &mut fails,
            "copy_v1_bf16_f16 (exact)",
            &r[1],
            &bf(&src_h),
            0.0,
        );
    }

    finish(&fails);
}

/// Dropout: the model's own mask on the device, bit for bit.
#[test]
fn dropout() {
    let Some(exe) = driver() else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- dropout (the LoRA mask): integer hash on the device, one fp32 multiply ----
    // Against the model's own host function `apply_dropout_mask` with the key `dropout_key` makes
    // for the kernel: f32 must be bit-identical (the mask is integer logic, the scale the same fp32
    // product), bf16 the same product rounded once (the reference rounds the CPU result likewise).
    {
        use zhllama::model::lora::{Proj, apply_dropout_mask, dropout_key};
        let (len, pdrop, step_key) = (5000usize, 0.3f32, 0x0123_4567_89ab_cdefu64);
        let x = rand(len, 2.0);
        let mut want = x.clone();
        apply_dropout_mask(&mut want, pdrop, step_key, 3, Proj::Gate);
        let xb = bf(&x);
        let mut want_b = xb.clone();
        apply_dropout_mask(&mut want_b, pdrop, step_key, 3, Proj::Gate);
        let want_b = bf(&want_b);
        let key = dropout_key(step_key, 3, Proj::Gate);
        let (ix, ixb) = (e.f32(&x), e.bf16(&xb));
        let args = |id| {
            [
                p(id),
                format!("l{len}"),
                format!("q{key}"),
                f(pdrop),
                f(1.0 / (1.0 - pdrop)),
            ]
        };
        // 3 blocks of 256 threads: the grid-stride loop covers 5000 elements in 7 rounds.
        e.launch("dropout_v1_f32", grid::dropout(len), &args(ix));
        e.launch("dropout_v1_bf16", grid::dropout(len), &args(ixb));
        let r = e.run(&[ix, ixb]);
        check(&mut fails, "dropout_v1_f32", &r[0], &want, 0.0);
        check(&mut fails, "dropout_v1_bf16", &r[1], &want_b, 0.0);
        for (what, got, want) in [("f32", &r[0], &want), ("bf16", &r[1], &want_b)] {
            let differ = got
                .iter()
                .zip(want.iter())
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            if differ != 0 {
                fails.push(format!(
                    "dropout_v1_{what}: {differ} elements not bit-identical"
                ));
            }
        }
        let kept = r[0].iter().filter(|v| **v != 0.0).count();
        // Binomial(5000, 0.7): std 32; ±200 is > 6 sigma.
        assert!((kept as i64 - 3500).abs() < 200, "kept {kept} of 5000");
    }

    finish(&fails);
}

/// fill_uniform: the CPU's hash and arithmetic on the device, bit for bit.
#[test]
fn fill() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- fill_uniform (kernels/fill.cu): the same hash, exact u and one fma as the CPU, so the
    // fp32 kernel must match bit for bit (tolerance 0) and the bf16 one must hold bf16(cpu) ----
    for (len, seed, lo, hi) in [(3001usize, 5u64, -0.02f32, 0.02f32), (77, 6, 1.0, 1.0)] {
        let mut want = vec![0.0f32; len];
        cpu.fill_uniform(&mut want, seed, lo, hi);
        let key = zhllama::ops::fill::uniform_key(seed);
        let (i32o, ib) = (e.zeros(len), e.zeros_bf16(len));
        for (name, id) in [("fill_uniform_v1_f32", i32o), ("fill_uniform_v1_bf16", ib)] {
            e.launch(
                name,
                grid::fill(len),
                &[p(id), format!("q{key}"), f(lo), f(hi), format!("l{len}")],
            );
        }
        let r = e.run(&[i32o, ib]);
        check(&mut fails, "fill_uniform_v1_f32", &r[0], &want, 0.0);
        check(&mut fails, "fill_uniform_v1_bf16", &r[1], &bf(&want), 0.0);
    }

    finish(&fails);
}

/// The bf16 (training) instances of rmsnorm, swiglu, embedding, adamw, axpy and copy.
#[test]
fn bf16_storage() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- bf16 (training) variants: 8-byte bf16 vector loads/stores, fp32 statistics ----
    {
        let (n, c) = (5usize, 256usize);
        let (x, w, dout, dx0) = (
            bf(&rand(n * c, 2.0)),
            bf(&rand(c, 1.0)),
            bf(&rand(n * c, 1.0)),
            bf(&rand(n * c, 1.0)),
        );
        let dw0 = rand(c, 1.0);
        let (out, rstd, dx, dw) = rmsnorm_reference(&cpu, [&x, &w, &dout, &dx0, &dw0], n, c);
        let (ix, iw, id, idx, idw) = (
            e.bf16(&x),
            e.bf16(&w),
            e.bf16(&dout),
            e.bf16(&dx0),
            e.f32(&dw0),
        );
        let (io, ir) = (e.zeros_bf16(n * c), e.zeros(n));
        e.launch(
            "rmsnorm_forward_v1_bf16",
            grid::rmsnorm_forward(n),
            &[p(io), p(ir), p(ix), p(iw), i(n), i(c), f(1e-6)],
        );
        let nb = grid::rmsnorm_backward_blocks(n, SM);
        let part = e.zeros(nb * c);
        e.launch(
            "rmsnorm_backward_v1_bf16",
            grid::rmsnorm_backward(nb),
            &[p(idx), p(part), p(id), p(ix), p(iw), p(ir), i(n), i(c)],
        );
        e.launch(
            "rmsnorm_dw_reduce_v1_f32",
            grid::rmsnorm_dw_reduce(c),
            &[p(idw), p(part), i(nb), i(c)],
        );
        // SwiGLU bf16, embedding backward with bf16 dout into an fp32 table, AdamW with bf16 grads
        // (no copy: null pointer), axpy fp32 += bf16, cast fp32 -> bf16.
        let len = 1000usize;
        let (g, u) = (bf(&rand(len, 4.0)), bf(&rand(len, 2.0)));
        let mut sw = vec![0.0; len];
        cpu.swiglu_forward(&mut sw, &g, &u);
        let (ig, iu, isw) = (e.bf16(&g), e.bf16(&u), e.zeros_bf16(len));
        e.launch(
            "swiglu_forward_v1_bf16",
            grid::swiglu(len, true),
            &[p(isw), p(ig), p(iu), format!("l{len}")],
        );
        let ids: Vec<i32> = (0..n).map(|k| (k % 3) as i32).collect();
        let d0 = rand(3 * c, 1.0);
        let mut dt = d0.clone();
        cpu.embedding_backward(&mut dt, &dout, &ids, n, c);
        let (uniq, offsets, positions) = kernels::group_positions(&ids);
        let (idt, iu2, ioff, ipos) = (e.f32(&d0), e.i32(&uniq), e.i32(&offsets), e.i32(&positions));
        e.launch(
            "embedding_backward_v1_bf16",
            grid::embedding_backward(uniq.len()),
            &[p(idt), p(id), p(iu2), p(ioff), p(ipos), i(c)],
        );
        let (pp, m, gr) = (rand(len, 1.0), rand(len, 0.1), bf(&rand(len, 0.1)));
        let v: Vec<f32> = rand(len, 0.01).iter().map(|x| x.abs()).collect();
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        let (mut pw, mut mw, mut vw) = (pp.clone(), m.clone(), v.clone());
        cpu.adamw_step(&mut pw, &mut mw, &mut vw, &gr, hp);
        let (ip, im, iv, igr) = (e.f32(&pp), e.f32(&m), e.f32(&v), e.bf16(&gr));
        let mut a = vec![
            p(ip),
            p(im),
            p(iv),
            p(igr),
            "n0".to_string(),
            format!("l{len}"),
        ];
        a.extend(kernels::adamw_coefficients(hp).iter().map(|&x| f(x)));
        e.launch("adamw_step_v1_f32_bf16", grid::adamw(len, SM), &a);
        let y0 = rand(len, 1.0);
        let mut y = y0.clone();
        cpu.axpy(&mut y, 0.5, &g);
        let iy = e.f32(&y0);
        e.launch(
            "axpy_v1_f32_bf16",
            grid::elementwise(len),
            &[p(iy), p(ig), f(0.5), format!("l{len}")],
        );
        let icast = e.zeros_bf16(len);
        e.launch(
            "copy_v1_bf16_f32",
            grid::cast(len),
            &[p(icast), p(iy), format!("l{len}")],
        );
        let r = e.run(&[io, ir, idx, idw, isw, idt, ip, im, iv, iy, icast]);
        check(&mut fails, "rmsnorm_forward_v1_bf16 out", &r[0], &out, 1e-2);
        check(
            &mut fails,
            "rmsnorm_forward_v1_bf16 rstd",
            &r[1],
            &rstd,
            1e-5,
        );
        check(
            &mut fails,
            "rmsnorm_backward_v1_bf16 dx (+=)",
            &r[2],
            &dx,
            1e-2,
        );
        check(
            &mut fails,
            "rmsnorm_backward_v1_bf16 dw (+=)",
            &r[3],
            &dw,
            1e-5,
        );
        check(&mut fails, "swiglu_forward_v1_bf16", &r[4], &sw, 1e-2);
        check(
            &mut fails,
            "embedding_backward_v1_bf16 (fp32 table)",
            &r[5],
            &dt,
            1e-5,
        );
        check(&mut fails, "adamw_step_v1_f32_bf16 param", &r[6], &pw, 1e-5);
        check(&mut fails, "adamw_step_v1_f32_bf16 m", &r[7], &mw, 1e-5);
        check(&mut fails, "adamw_step_v1_f32_bf16 v", &r[8], &vw, 1e-5);
        check(&mut fails, "axpy_v1_f32_bf16", &r[9], &y, 1e-5);
        check(&mut fails, "copy_v1_bf16_f32", &r[10], &bf(&y), 1e-5);
    }

    finish(&fails);
}

/// The f16 (fp16 mode) instances of rmsnorm, swiglu, cross_entropy, adamw, dropout and
/// attention.
#[test]
fn f16_storage() {
    let Some(exe) = driver() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect()
    };
    let mut fails = Vec::new();
    let mut e = Emu::new(exe);

    // ---- f16 storage (the recipe's fp16 mode): the same templates instantiated for __half ----
    {
        let tol = TOL_F16;
        // RMSNorm forward / backward.
        let (n, c) = (5usize, 256usize);
        let (x, w, dout, dx0) = (
            hf(&rand(n * c, 2.0)),
            hf(&rand(c, 1.0)),
            hf(&rand(n * c, 1.0)),
            hf(&rand(n * c, 1.0)),
        );
        let dw0 = rand(c, 1.0);
        let (out, rstd, dx, dw) = rmsnorm_reference(&cpu, [&x, &w, &dout, &dx0, &dw0], n, c);
        let (ix, iw, id, idx, idw) = (e.f16(&x), e.f16(&w), e.f16(&dout), e.f16(&dx0), e.f32(&dw0));
        let (io, ir) = (e.zeros_f16(n * c), e.zeros(n));
        e.launch(
            "rmsnorm_forward_v1_f16",
            grid::rmsnorm_forward(n),
            &[p(io), p(ir), p(ix), p(iw), i(n), i(c), f(1e-6)],
        );
        let nb = grid::rmsnorm_backward_blocks(n, SM);
        let part = e.zeros(nb * c);
        e.launch(
            "rmsnorm_backward_v1_f16",
            grid::rmsnorm_backward(nb),
            &[p(idx), p(part), p(id), p(ix), p(iw), p(ir), i(n), i(c)],
        );
        e.launch(
            "rmsnorm_dw_reduce_v1_f32",
            grid::rmsnorm_dw_reduce(c),
            &[p(idw), p(part), i(nb), i(c)],
        );
        // SwiGLU forward / backward.
        let len = 1000usize;
        let (g, u, d) = (
            hf(&rand(len, 4.0)),
            hf(&rand(len, 2.0)),
            hf(&rand(len, 1.0)),
        );
        let mut sw = vec![0.0; len];
        cpu.swiglu_forward(&mut sw, &g, &u);
        let (mut dg, mut du) = (vec![0.0; len], vec![0.0; len]);
        cpu.swiglu_backward(&mut dg, &mut du, &d, &g, &u);
        let (ig, iu, isd) = (e.f16(&g), e.f16(&u), e.f16(&d));
        let (isw, idg, idu) = (e.zeros_f16(len), e.zeros_f16(len), e.zeros_f16(len));
        e.launch(
            "swiglu_forward_v1_f16",
            grid::swiglu(len, true),
            &[p(isw), p(ig), p(iu), format!("l{len}")],
        );
        e.launch(
            "swiglu_backward_v1_f16",
            grid::swiglu(len, true),
            &[p(idg), p(idu), p(isd), p(ig), p(iu), format!("l{len}")],
        );
        // Cross-entropy forward / backward (f16 logits, fp32 losses).
        let (cn, cv) = (6usize, 1000usize);
        let logits = hf(&rand(cn * cv, 8.0));
        let tg: Vec<i32> = (0..cn)
            .map(|k| {
                if k == 2 {
                    -100
                } else {
                    ((k * 331) % cv) as i32
                }
            })
            .collect();
        let mut losses = vec![0.0; cn];
        cpu.cross_entropy_forward(&mut losses, &logits, &tg, cn, cv);
        let mut dl = vec![0.0; cn * cv];
        cpu.cross_entropy_backward(&mut dl, &logits, &tg, cn, cv, 0.2);
        let (il, itg) = (e.f16(&logits), e.i32(&tg));
        let (iloss, idl) = (e.zeros(cn), e.zeros_f16(cn * cv));
        e.launch(
            "cross_entropy_forward_v1_f16",
            grid::cross_entropy_rows(cn),
            &[p(iloss), p(il), p(itg), i(cn), i(cv)],
        );
        e.launch(
            "cross_entropy_backward_v1_f16",
            grid::cross_entropy_rows(cn),
            &[p(idl), p(il), p(itg), i(cn), i(cv), f(0.2)],
        );
        // AdamW: fp32 master/moments, f16 gradients, writing the f16 weight copy (`_cf16`).
        let (pp, m, gr) = (rand(len, 1.0), rand(len, 0.1), hf(&rand(len, 0.1)));
        let v: Vec<f32> = rand(len, 0.01).iter().map(|x| x.abs()).collect();
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 2,
        };
        let (mut pw, mut mw, mut vw) = (pp.clone(), m.clone(), v.clone());
        cpu.adamw_step(&mut pw, &mut mw, &mut vw, &gr, hp);
        let (ip, im, iv, igr, icp) = (
            e.f32(&pp),
            e.f32(&m),
            e.f32(&v),
            e.f16(&gr),
            e.zeros_f16(len),
        );
        let mut a = vec![p(ip), p(im), p(iv), p(igr), p(icp), format!("l{len}")];
        a.extend(kernels::adamw_coefficients(hp).iter().map(|&x| f(x)));
        e.launch("adamw_step_v1_f32_f16_cf16", grid::adamw(len, SM), &a);
        // Dropout on f16: the same fp32 product rounded once to f16 on both sides.
        use zhllama::model::lora::{Proj, apply_dropout_mask, dropout_key};
        let xd = hf(&rand(len, 2.0));
        let mut want_d = xd.clone();
        apply_dropout_mask(&mut want_d, 0.1, 99, 1, Proj::Up);
        let want_d = hf(&want_d);
        let ixd = e.f16(&xd);
        e.launch(
            "dropout_v1_f16",
            grid::dropout(len),
            &[
                p(ixd),
                format!("l{len}"),
                format!("q{}", dropout_key(99, 1, Proj::Up)),
                f(0.1),
                f(1.0 / (1.0 - 0.1f32)),
            ],
        );
        let r = e.run(&[
            io, ir, idx, idw, isw, idg, idu, iloss, idl, ip, im, iv, icp, ixd,
        ]);
        check(&mut fails, "rmsnorm_forward_v1_f16 out", &r[0], &out, tol);
        check(
            &mut fails,
            "rmsnorm_forward_v1_f16 rstd",
            &r[1],
            &rstd,
            1e-5,
        );
        check(
            &mut fails,
            "rmsnorm_backward_v1_f16 dx (+=)",
            &r[2],
            &dx,
            tol,
        );
        check(
            &mut fails,
            "rmsnorm_backward_v1_f16 dw (+=)",
            &r[3],
            &dw,
            1e-5,
        );
        check(&mut fails, "swiglu_forward_v1_f16", &r[4], &sw, tol);
        check(&mut fails, "swiglu_backward_v1_f16 dgate", &r[5], &dg, tol);
        check(&mut fails, "swiglu_backward_v1_f16 dup", &r[6], &du, tol);
        check(
            &mut fails,
            "cross_entropy_forward_v1_f16",
            &r[7],
            &losses,
            1e-5,
        );
        check(&mut fails, "cross_entropy_backward_v1_f16", &r[8], &dl, tol);
        check(
            &mut fails,
            "adamw_step_v1_f32_f16_cf16 param",
            &r[9],
            &pw,
            1e-5,
        );
        check(
            &mut fails,
            "adamw_step_v1_f32_f16_cf16 m",
            &r[10],
            &mw,
            1e-5,
        );
        check(
            &mut fails,
            "adamw_step_v1_f32_f16_cf16 v",
            &r[11],
            &vw,
            1e-5,
        );
        check(
            &mut fails,
            "adamw_step_v1_f32_f16_cf16 f16 copy",
            &r[12],
            &hf(&pw),
            1e-5,
        );
        check(&mut fails, "dropout_v1_f16", &r[13], &want_d, 0.0);

        // Attention forward and backward (d = 64, GQA 4/2, RoPE off; the backward is fed the
        // f16-stored forward output and the fp32 lse on both sides).
        let (b, t, h, hkv, dd) = (1usize, 33usize, 4usize, 2usize, 64usize);
        let (q, k, vv, dout) = (
            hf(&rand(b * t * h * dd, 1.0)),
            hf(&rand(b * t * hkv * dd, 1.0)),
            hf(&rand(b * t * hkv * dd, 1.0)),
            hf(&rand(b * t * h * dd, 1.0)),
        );
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
        cpu.attention_forward(
            &mut out,
            &mut lse,
            &q,
            &k,
            &vv,
            AttnShape {
                b,
                t,
                h,
                hkv,
                d: dd,
            },
        );
        let out16 = hf(&out);
        let (mut dq, mut dk, mut dv) =
            (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; vv.len()]);
        cpu.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &dout,
            AttnSaved {
                q: &q,
                k: &k,
                v: &vv,
                out: &out16,
                lse: &lse,
            },
            AttnShape {
                b,
                t,
                h,
                hkv,
                d: dd,
            },
        );
        let (iq, ik, iv, id) = (e.f16(&q), e.f16(&k), e.f16(&vv), e.f16(&dout));
        let (io, il) = (e.zeros_f16(q.len()), e.zeros(b * h * t));
        let tail = [i(b), i(t), i(h), i(hkv), "n0".to_string(), i(0)];
        let mut a = vec![p(io), p(il), p(iq), p(ik), p(iv)];
        a.extend_from_slice(&tail);
        e.launch(
            "attention_forward_v1_d64_f16",
            grid::attention_query_tiles(b, t, h),
            &a,
        );
        let (iout, ilse) = (e.f16(&out16), e.f32(&lse));
        let delta = e.zeros(b * h * t);
        e.launch(
            "attention_backward_delta_v1_f16",
            grid::attention_delta(b * t * h),
            &[p(delta), p(id), p(iout), i(b), i(t), i(h), i(dd)],
        );
        let (idq, idk, idv) = (
            e.zeros_f16(q.len()),
            e.zeros_f16(k.len()),
            e.zeros_f16(vv.len()),
        );
        let mut a = vec![
            p(idk),
            p(idv),
            p(id),
            p(iq),
            p(ik),
            p(iv),
            p(ilse),
            p(delta),
        ];
        a.extend_from_slice(&tail);
        e.launch(
            "attention_backward_dkdv_v1_d64_f16",
            grid::attention_key_tiles(b, t, hkv),
            &a,
        );
        let mut a = vec![p(idq), p(id), p(iq), p(ik), p(iv), p(ilse), p(delta)];
        a.extend_from_slice(&tail);
        e.launch(
            "attention_backward_dq_v1_d64_f16",
            grid::attention_query_tiles(b, t, h),
            &a,
        );
        let r = e.run(&[io, il, idq, idk, idv]);
        check(
            &mut fails,
            "attention_forward_v1_d64_f16 out",
            &r[0],
            &out,
            tol,
        );
        check(
            &mut fails,
            "attention_forward_v1_d64_f16 lse",
            &r[1],
            &lse,
            1e-5,
        );
        check(
            &mut fails,
            "attention_backward_v1_d64_f16 dq",
            &r[2],
            &dq,
            tol,
        );
        check(
            &mut fails,
            "attention_backward_v1_d64_f16 dk",
            &r[3],
            &dk,
            tol,
        );
        check(
            &mut fails,
            "attention_backward_v1_d64_f16 dv",
            &r[4],
            &dv,
            tol,
        );
    }

    finish(&fails);
}
