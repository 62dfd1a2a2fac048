//! The LoRA low-rank path (`kernels/lora.cu`).

use super::grid::{self, blocks};
use super::launch::{KArg, check_view, suffix, uni16};
use super::view::{DView, DViewMut};
use super::{CudaBackend, kernels};
use crate::tensor::DType;
use anyhow::{Result, ensure};

impl CudaBackend {
    /// LoRA low-rank path added to a base projection's output: `out[n,o] += s·(dropout(x)·aᵀ)·bᵀ`,
    /// `u[n,r] =` (saved for the backward). `a[r,in]`, `b[o,r]` (PEFT layouts); dropout drops with
    /// probability `p` by the mask `kernels::dropout_keep(seed, row·in + col)`, kept values ×1/(1−p).
    /// The down-projection reads x once with the mask fused; the up-projection is one cuBLAS call
    /// with beta = 1 (the add folded into its epilogue).
    /// LoRA low-rank path added to a base projection's output: `out[n,o] += s·(dropout(x)·aᵀ)·bᵀ`,
    /// `u[n,r] =` (saved for the backward). `a[r,in]`, `b[o,r]` (PEFT layouts); dropout drops with
    /// probability `p` by the mask `kernels::dropout_keep(seed, row·in + col)`, kept values ×1/(1−p).
    /// The down-projection reads x once with the mask fused; the up-projection is one cuBLAS call
    /// with beta = 1 (the add folded into its epilogue).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_forward(
        &self,
        out: DViewMut<'_>,
        u: DViewMut<'_>,
        x: DView<'_>,
        a: DView<'_>,
        bw: DView<'_>,
        n: usize,
        inf: usize,
        outf: usize,
        r: usize,
        s: f32,
        p: f32,
        seed: u64,
    ) {
        self.run(|| {
            ensure!(
                matches!(r, 8 | 16 | 64),
                "lora: rank {r} has no kernel (8, 16 or 64)"
            );
            ensure!((0.0..1.0).contains(&p), "lora: dropout {p} not in [0, 1)");
            check_view("lora out", out.len, n * outf)?;
            check_view("lora u", u.len, n * r)?;
            check_view("lora x", x.len, n * inf)?;
            check_view("lora a", a.len, r * inf)?;
            check_view("lora b", bw.len, outf * r)?;
            let thr = kernels::dropout_threshold(p);
            let inv_keep = 1.0 / (1.0 - p);
            let run = |sfx: &str, ptr: &[u64]| {
                self.launch(
                    &format!("lora_down_forward_v1_r{r}_{sfx}"),
                    grid::Launch {
                        grid: (n.div_ceil(8) as u32, 1, 1),
                        block: 256,
                        smem: 0,
                    },
                    &[
                        KArg::P(ptr[0]),
                        KArg::P(ptr[1]),
                        KArg::P(ptr[2]),
                        KArg::I(n as i32),
                        KArg::I(inf as i32),
                        KArg::Q(seed),
                        KArg::U(thr),
                        KArg::F(inv_keep),
                    ],
                )
            };
            if uni16(&[u.dtype, x.dtype, a.dtype]) {
                run(suffix(u.dtype), &[u.ptr, x.ptr, a.ptr])?;
            } else {
                self.with_f32(
                    &[
                        u.out("u", 0).any_len(),
                        x.arg("x", 0).any_len(),
                        a.arg("a", 0).any_len(),
                    ],
                    |ptr| run("f32", ptr),
                )?;
            }
            self.matmul_impl(out, u.ro(), bw, n, outf, r, false, true, s, 1.0)
        });
    }

    /// Backward of [`Self::lora_forward`]: `du[n,r] =` (scratch the caller provides), `dx[n,in] +=`,
    /// `da[r,in] +=`, `db[o,r] +=`. dA uses a deterministic two-stage reduction over rows.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward(
        &self,
        dx: DViewMut<'_>,
        da: DViewMut<'_>,
        db: DViewMut<'_>,
        mut du: DViewMut<'_>,
        dout: DView<'_>,
        x: DView<'_>,
        u: DView<'_>,
        a: DView<'_>,
        bw: DView<'_>,
        n: usize,
        inf: usize,
        outf: usize,
        r: usize,
        s: f32,
        p: f32,
        seed: u64,
    ) {
        self.run(|| {
            ensure!(
                matches!(r, 8 | 16 | 64),
                "lora: rank {r} has no kernel (8, 16 or 64)"
            );
            check_view("lora dx", dx.len, n * inf)?;
            check_view("lora da", da.len, r * inf)?;
            check_view("lora db", db.len, outf * r)?;
            check_view("lora du", du.len, n * r)?;
            check_view("lora dout", dout.len, n * outf)?;
            // db[o,r] += s·doutᵀ[o,n]·u[n,r];  du[n,r] = s·dout[n,o]·b[o,r]
            self.matmul_impl(db, dout, u, outf, r, n, true, false, s, 1.0)?;
            self.matmul_impl(du.reborrow(), dout, bw, n, r, outf, false, false, s, 0.0)?;
            let thr = kernels::dropout_threshold(p);
            let inv_keep = 1.0 / (1.0 - p);
            let nsplit = n.clamp(1, 64);
            let partial = self.scratch("lora_partial", nsplit * r * inf * 4)?;
            let run = |sfx: &str, ptr: &[u64]| -> Result<()> {
                // ptr: dx da du x a
                self.launch(
                    &format!("lora_grad_a_partial_v1_r{r}_{sfx}"),
                    grid::Launch {
                        grid: (inf.div_ceil(256) as u32, nsplit as u32, 1),
                        block: 256,
                        smem: 0,
                    },
                    &[
                        KArg::P(partial),
                        KArg::P(ptr[2]),
                        KArg::P(ptr[3]),
                        KArg::I(n as i32),
                        KArg::I(inf as i32),
                        KArg::Q(seed),
                        KArg::U(thr),
                        KArg::F(inv_keep),
                    ],
                )?;
                self.launch(
                    "lora_grad_a_reduce_v1_f32",
                    grid::Launch {
                        grid: (blocks(r * inf, 256), 1, 1),
                        block: 256,
                        smem: 0,
                    },
                    &[
                        KArg::P(ptr[1]),
                        KArg::P(partial),
                        KArg::I(nsplit as i32),
                        KArg::L((r * inf) as i64),
                    ],
                )?;
                self.launch(
                    &format!("lora_dx_v1_r{r}_{sfx}"),
                    grid::Launch {
                        grid: (blocks(n * inf, 256).min(8 * self.sm_count.max(1) * 4), 1, 1),
                        block: 256,
                        smem: 0,
                    },
                    &[
                        KArg::P(ptr[0]),
                        KArg::P(ptr[2]),
                        KArg::P(ptr[4]),
                        KArg::I(n as i32),
                        KArg::I(inf as i32),
                        KArg::Q(seed),
                        KArg::U(thr),
                        KArg::F(inv_keep),
                    ],
                )
            };
            if uni16(&[dx.dtype, du.dtype, x.dtype, a.dtype]) && da.dtype == DType::F32 {
                run(suffix(dx.dtype), &[dx.ptr, da.ptr, du.ptr, x.ptr, a.ptr])
            } else {
                self.with_f32(
                    &[
                        dx.inout("dx", 0).any_len(),
                        da.inout("da", 0).any_len(),
                        du.ro().arg("du", 0).any_len(),
                        x.arg("x", 0).any_len(),
                        a.arg("a", 0).any_len(),
                    ],
                    |ptr| run("f32", ptr),
                )
            }
        });
    }
}
