//! The CUDA backend (feature `cuda`): the `Backend` trait over device buffers, with the kernels of
//! `kernels/` (compiled at start-up by NVRTC for the device's architecture, cached on disk) and
//! cuBLAS GEMMs (bf16, f16 or fp32 inputs, fp32 accumulation).
//!
//! - Storage by [`Role`]: `Weight` and `Activation` buffers are bf16, or f16 with
//!   [`CudaOptions::half`] = [`Half::F16`] (the recipe's fp16 mode), `Fp32` buffers fp32. Host
//!   transfers are f32 (converted on the host, round to nearest even).
//! - One explicit stream per backend; every op is queued on it and returns at once. The trait's ops
//!   return `()`, so a failed launch is recorded and returned by the next [`Backend::synchronize`]
//!   (or any call that returns `Result`).
//! - Each op picks its kernel variant from the dtypes of its arguments: the mixed-precision
//!   combination (bf16/f16 data, fp32 statistics and gradient accumulators) has a `_bf16`/`_f16`
//!   kernel, an all-fp32 call the `_f32` kernel; any other combination is staged through fp32
//!   scratch (slow but exact, so a caller's unusual `Role` never gives a wrong result).
//! - No driver, no GPU or no NVRTC: [`CudaBackend::new`] returns an error saying which, never panics.
//!
//! Fused ops beyond the trait (the model may call them directly): attention with RoPE applied on the
//! fly ([`CudaBackend::attention_rope_forward`]), the chunked lm_head + cross-entropy
//! ([`CudaBackend::lm_head_cross_entropy_forward`]) and AdamW writing a bf16 copy
//! ([`CudaBackend::adamw_step_with_copy`]).
//! Profiling: [`CudaBackend::set_profiling`] + [`CudaBackend::profile_report`] (CUDA events per launch).
//!
//! Layout: `device.rs` (the struct, start-up, buffers, errors, scratch, profiler), `view.rs`,
//! `launch.rs` (the one launch path: view checks, native or fp32-staged variant), `grid.rs`
//! (every launch's geometry), `gemm.rs` (cuBLAS), `compile.rs` (NVRTC + cubin cache),
//! `kernels.rs` (the embedded sources and host-side helpers), and one file per op family, named
//! as its `kernels/<family>.cu` and `crate::ops::<family>`. This file holds only the `Backend`
//! delegates.

mod adamw;
mod attention;
mod attention_cached;
mod compile;
mod cross_entropy;
mod device;
mod dropout;
mod elementwise;
mod embedding;
mod fill;
mod gemm;
pub mod grid;
pub mod kernels;
mod launch;
pub mod nvrtc;
pub mod nvtx;
mod rmsnorm;
mod rope;
mod swiglu;
mod view;

pub use super::cuda_options::{CudaOptions, Half, KernelTime, device_for_local_rank};
pub use compile::{CompiledFile, compile_all};
pub use cross_entropy::LmHeadCeSaved;
pub use device::{CudaBackend, CudaBuf, CudaIds, keep_pool_memory};
pub use view::{DView, DViewMut};

use super::cuda_options::LM_HEAD_CE_CHUNK_COLS;
use super::{
    AdamW, AttnRopeShape, AttnSaved, AttnShape, Backend, CachedAttnShape, GemmShape,
    LmHeadCeBuffers, LmHeadIn, LmHeadSaved, LmHeadShape, RmsNormSaved, Role, RopeShape, RowShape,
};
use anyhow::Result;
use cross_entropy::LmHeadCeGrads;
use rope::Dir;
use std::ops::Range;

/// True in builds with the `cuda` feature.
pub const ENABLED: bool = true;

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type View<'a> = DView<'a>;
    type ViewMut<'a> = DViewMut<'a>;

    fn name(&self) -> String {
        self.describe()
    }

    fn alloc(&self, len: usize, role: Role) -> Result<CudaBuf> {
        self.alloc_buf(len, role)
    }
    fn alloc_ids(&self, len: usize) -> Result<CudaIds> {
        self.alloc_id_buf(len)
    }
    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }
    fn buf_bytes(&self, buf: &CudaBuf) -> usize {
        buf.mem.len()
    }
    fn upload(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        self.upload_host(dst, src)
    }
    fn download(&self, src: &CudaBuf, dst: &mut [f32]) -> Result<()> {
        self.download_host(src, dst)
    }
    fn upload_ids(&self, dst: &mut CudaIds, src: &[i32]) -> Result<()> {
        self.upload_id_groups(dst, src)
    }
    fn view<'a>(&self, buf: &'a CudaBuf, range: Range<usize>) -> DView<'a> {
        DView::of(buf, range)
    }
    fn view_mut<'a>(&self, buf: &'a mut CudaBuf, range: Range<usize>) -> DViewMut<'a> {
        DViewMut::of(buf, range)
    }
    fn range_push(&self, name: &str) {
        nvtx::range_push(name);
    }
    fn range_pop(&self) {
        nvtx::range_pop();
    }

    fn synchronize(&self) -> Result<()> {
        self.sync_and_take_error()
    }

    fn zero(&self, out: DViewMut<'_>) {
        self.run(|| self.zero_impl(out));
    }
    fn copy(&self, out: DViewMut<'_>, x: DView<'_>) {
        self.run(|| self.copy_impl(out, x));
    }
    fn axpy(&self, out: DViewMut<'_>, alpha: f32, x: DView<'_>) {
        self.run(|| self.axpy_impl(out, alpha, x));
    }
    fn scale(&self, out: DViewMut<'_>, alpha: f32) {
        self.run(|| self.scale_impl(out, alpha));
    }
    fn fill_uniform(&self, out: DViewMut<'_>, seed: u64, lo: f32, hi: f32) {
        self.run(|| self.fill_uniform_impl(out, seed, lo, hi));
    }
    fn sum_squares(&self, x: DView<'_>) -> Result<f64> {
        self.reduce_f64(x, "sum_squares")
    }
    fn sum(&self, x: DView<'_>) -> Result<f64> {
        self.reduce_f64(x, "sum")
    }
    fn dropout(&self, out: DViewMut<'_>, p: f32, key: u64) {
        self.run(|| self.dropout_impl(out, p, key));
    }

    fn matmul(
        &self,
        out: DViewMut<'_>,
        a: DView<'_>,
        b: DView<'_>,
        shape: GemmShape,
        alpha: f32,
        beta: f32,
    ) {
        self.run(|| self.matmul_impl(out, a, b, shape, alpha, beta));
    }

    fn rmsnorm_forward(
        &self,
        out: DViewMut<'_>,
        rstd: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        shape: RowShape,
        eps: f32,
    ) {
        self.run(|| self.rmsnorm_forward_impl(out, rstd, x, w, shape, eps));
    }
    fn rmsnorm_backward(
        &self,
        dx: DViewMut<'_>,
        dw: DViewMut<'_>,
        dout: DView<'_>,
        saved: RmsNormSaved<DView<'_>>,
        shape: RowShape,
    ) {
        self.run(|| self.rmsnorm_backward_impl(dx, dw, dout, saved, shape));
    }

    fn rope_forward(&self, x: DViewMut<'_>, shape: RopeShape) {
        self.run(|| self.rope_impl(x, shape, Dir::Forward));
    }
    fn rope_backward(&self, dx: DViewMut<'_>, shape: RopeShape) {
        self.run(|| self.rope_impl(dx, shape, Dir::Backward));
    }

    fn attention_forward(
        &self,
        out: DViewMut<'_>,
        lse: DViewMut<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        shape: AttnShape,
    ) {
        self.attention_rope_forward(out, lse, q, k, v, shape.with_rope(0.0, 0));
    }
    fn attention_backward(
        &self,
        dq: DViewMut<'_>,
        dk: DViewMut<'_>,
        dv: DViewMut<'_>,
        dout: DView<'_>,
        saved: AttnSaved<DView<'_>>,
        shape: AttnShape,
    ) {
        self.attention_rope_backward(dq, dk, dv, dout, saved, shape.with_rope(0.0, 0));
    }

    fn swiglu_forward(&self, out: DViewMut<'_>, gate: DView<'_>, up: DView<'_>) {
        self.run(|| self.swiglu_forward_impl(out, gate, up));
    }
    fn swiglu_backward(
        &self,
        dgate: DViewMut<'_>,
        dup: DViewMut<'_>,
        dout: DView<'_>,
        gate: DView<'_>,
        up: DView<'_>,
    ) {
        self.run(|| self.swiglu_backward_impl(dgate, dup, dout, gate, up));
    }

    fn embedding_forward(
        &self,
        out: DViewMut<'_>,
        ids: &CudaIds,
        table: DView<'_>,
        n: usize,
        c: usize,
    ) {
        self.run(|| self.embedding_forward_impl(out, ids, table, n, c));
    }
    fn embedding_backward(
        &self,
        dtable: DViewMut<'_>,
        dout: DView<'_>,
        ids: &CudaIds,
        n: usize,
        c: usize,
    ) {
        self.run(|| self.embedding_backward_impl(dtable, dout, ids, n, c));
    }

    fn cross_entropy_forward(
        &self,
        losses: DViewMut<'_>,
        logits: DView<'_>,
        targets: &CudaIds,
        n: usize,
        v: usize,
    ) {
        self.run(|| self.cross_entropy_forward_impl(losses, logits, targets, n, v));
    }
    fn cross_entropy_backward(
        &self,
        dlogits: DViewMut<'_>,
        logits: DView<'_>,
        targets: &CudaIds,
        n: usize,
        v: usize,
        scale: f32,
    ) {
        self.run(|| self.cross_entropy_backward_impl(dlogits, logits, targets, n, v, scale));
    }

    /// Fused: RoPE applied as q and k are loaded; the buffers stay un-rotated.
    fn attention_rope_forward(
        &self,
        out: DViewMut<'_>,
        lse: DViewMut<'_>,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: DView<'_>,
        shape: AttnRopeShape,
    ) {
        CudaBackend::attention_rope_forward(
            self,
            out,
            lse,
            self.view(q, 0..shape.attn.q_len()),
            self.view(k, 0..shape.attn.kv_len()),
            v,
            shape,
        );
    }
    fn attention_rope_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: DViewMut<'_>,
        dout: DView<'_>,
        saved: AttnSaved<DView<'_>>,
        shape: AttnRopeShape,
    ) {
        CudaBackend::attention_rope_backward(
            self,
            self.view_mut(dq, 0..shape.attn.q_len()),
            self.view_mut(dk, 0..shape.attn.kv_len()),
            dv,
            dout,
            saved,
            shape,
        );
    }
    /// Fused: one `[n, LM_HEAD_CE_CHUNK_COLS]` vocabulary chunk and the per-row lse, never the
    /// logits.
    fn lm_head_cross_entropy_buffers(
        &self,
        n: usize,
        v: usize,
        _backward: bool,
    ) -> LmHeadCeBuffers {
        LmHeadCeBuffers {
            logits: 0,
            lse: n,
            scratch: n * v.clamp(1, LM_HEAD_CE_CHUNK_COLS),
        }
    }
    fn lm_head_cross_entropy_forward(
        &self,
        losses: DViewMut<'_>,
        lse: &mut CudaBuf,
        _logits: &mut CudaBuf,
        scratch: &mut CudaBuf,
        input: LmHeadIn<'_, DView<'_>, CudaIds>,
        shape: LmHeadShape,
    ) {
        let (ll, sl) = (lse.len, scratch.len);
        CudaBackend::lm_head_cross_entropy_forward(
            self,
            losses,
            self.view_mut(lse, 0..ll.min(shape.n)),
            self.view_mut(scratch, 0..sl),
            input,
            shape,
        );
    }
    fn lm_head_cross_entropy_backward(
        &self,
        dx: DViewMut<'_>,
        dw: Option<DViewMut<'_>>,
        scratch: &mut CudaBuf,
        saved: LmHeadSaved<'_, DView<'_>, CudaBuf, CudaIds>,
        shape: LmHeadShape,
        scale: f32,
    ) {
        let (sl, ll) = (scratch.len, saved.lse.len.min(shape.n));
        let grads = LmHeadCeGrads {
            dx,
            accumulate: false,
            dw,
        };
        let fused = LmHeadCeSaved {
            x: saved.x,
            w: saved.w,
            lse: self.view(saved.lse, 0..ll),
            targets: saved.targets,
        };
        let r = self.lm_head_ce_backward_fp32_dx(
            grads,
            self.view_mut(scratch, 0..sl),
            fused,
            shape,
            scale,
        );
        self.record(r);
    }

    fn adamw_step(
        &self,
        param: DViewMut<'_>,
        m: DViewMut<'_>,
        v: DViewMut<'_>,
        grad: DView<'_>,
        hp: AdamW,
    ) {
        self.adamw_step_with_copy(param, m, v, grad, None, hp);
    }
    fn adamw_step_copy(
        &self,
        param: DViewMut<'_>,
        m: DViewMut<'_>,
        v: DViewMut<'_>,
        grad: DView<'_>,
        copy: DViewMut<'_>,
        hp: AdamW,
    ) {
        self.adamw_step_copy_impl(param, m, v, grad, copy, hp);
    }
    fn host_transfer_bytes(&self) -> u64 {
        self.transfer_bytes()
    }
    fn attention_cached_forward(
        &self,
        out: DViewMut<'_>,
        q: DView<'_>,
        kcache: DView<'_>,
        vcache: DView<'_>,
        shape: CachedAttnShape,
    ) {
        self.run(|| self.attention_cached_forward_impl(out, q, kcache, vcache, shape));
    }
}
