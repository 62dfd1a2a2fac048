//! The CPU reference backend: `f32` vectors in host memory; every op is the same-named function in
//! `crate::ops` (multi-threaded with rayon). `Role` is ignored: everything is f32.

use super::{
    AdamW, AttnSaved, AttnShape, Backend, CachedAttnShape, GemmShape, RmsNormSaved, Role,
    RopeShape, RowShape,
};
use crate::ops;
use anyhow::{Result, ensure};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The CPU backend. No state but the host-transfer count (shared by clones); threads come from
/// rayon's global pool.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    /// [`Backend::host_transfer_bytes`]: counted as the CUDA backend counts the same calls.
    transferred: Arc<AtomicU64>,
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend::default()
    }

    fn count(&self, bytes: usize) {
        self.transferred.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn alloc(&self, len: usize, _role: Role) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn alloc_ids(&self, len: usize) -> Result<Vec<i32>> {
        Ok(vec![0; len])
    }
    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn upload(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<()> {
        ensure!(
            dst.len() == src.len(),
            "upload: buffer holds {} floats, source has {}",
            dst.len(),
            src.len()
        );
        dst.copy_from_slice(src);
        self.count(4 * src.len());
        Ok(())
    }
    fn download(&self, src: &Vec<f32>, dst: &mut [f32]) -> Result<()> {
        ensure!(
            dst.len() == src.len(),
            "download: buffer holds {} floats, destination has {}",
            src.len(),
            dst.len()
        );
        dst.copy_from_slice(src);
        self.count(4 * dst.len());
        Ok(())
    }
    fn upload_ids(&self, dst: &mut Vec<i32>, src: &[i32]) -> Result<()> {
        ensure!(
            dst.len() == src.len(),
            "upload_ids: buffer holds {} ids, source has {}",
            dst.len(),
            src.len()
        );
        dst.copy_from_slice(src);
        self.count(4 * src.len());
        Ok(())
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn zero(&self, out: &mut [f32]) {
        ops::zero(out)
    }
    fn copy(&self, out: &mut [f32], x: &[f32]) {
        ops::copy(out, x)
    }
    fn axpy(&self, out: &mut [f32], alpha: f32, x: &[f32]) {
        ops::axpy(out, alpha, x)
    }
    fn scale(&self, out: &mut [f32], alpha: f32) {
        ops::scale(out, alpha)
    }
    fn fill_uniform(&self, out: &mut [f32], seed: u64, lo: f32, hi: f32) {
        ops::fill_uniform(out, seed, lo, hi)
    }
    fn sum_squares(&self, x: &[f32]) -> Result<f64> {
        self.count(8);
        Ok(ops::sum_squares(x))
    }
    fn sum(&self, x: &[f32]) -> Result<f64> {
        self.count(8);
        Ok(ops::sum(x))
    }
    fn dropout(&self, out: &mut [f32], p: f32, key: u64) {
        ops::dropout(out, p, key)
    }

    fn matmul(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        shape: GemmShape,
        alpha: f32,
        beta: f32,
    ) {
        ops::matmul(out, a, b, shape, alpha, beta)
    }

    fn rmsnorm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        shape: RowShape,
        eps: f32,
    ) {
        ops::rmsnorm_forward(out, rstd, x, w, shape, eps)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        saved: RmsNormSaved<&[f32]>,
        shape: RowShape,
    ) {
        ops::rmsnorm_backward(dx, dw, dout, saved, shape)
    }

    fn rope_forward(&self, x: &mut [f32], shape: RopeShape) {
        ops::rope_forward(x, shape)
    }
    fn rope_backward(&self, dx: &mut [f32], shape: RopeShape) {
        ops::rope_backward(dx, shape)
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) {
        ops::attention_forward(out, lse, q, k, v, shape)
    }
    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        saved: AttnSaved<&[f32]>,
        shape: AttnShape,
    ) {
        ops::attention_backward(dq, dk, dv, dout, saved, shape)
    }

    fn swiglu_forward(&self, out: &mut [f32], gate: &[f32], up: &[f32]) {
        ops::swiglu_forward(out, gate, up)
    }
    fn swiglu_backward(
        &self,
        dgate: &mut [f32],
        dup: &mut [f32],
        dout: &[f32],
        gate: &[f32],
        up: &[f32],
    ) {
        ops::swiglu_backward(dgate, dup, dout, gate, up)
    }

    fn embedding_forward(
        &self,
        out: &mut [f32],
        ids: &Vec<i32>,
        table: &[f32],
        n: usize,
        c: usize,
    ) {
        ops::embedding_forward(out, ids, table, n, c)
    }
    fn embedding_backward(
        &self,
        dtable: &mut [f32],
        dout: &[f32],
        ids: &Vec<i32>,
        n: usize,
        c: usize,
    ) {
        ops::embedding_backward(dtable, dout, ids, n, c)
    }

    fn cross_entropy_forward(
        &self,
        losses: &mut [f32],
        logits: &[f32],
        targets: &Vec<i32>,
        n: usize,
        v: usize,
    ) {
        ops::cross_entropy_forward(losses, logits, targets, n, v)
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &mut [f32],
        logits: &[f32],
        targets: &Vec<i32>,
        n: usize,
        v: usize,
        scale: f32,
    ) {
        ops::cross_entropy_backward(dlogits, logits, targets, n, v, scale)
    }

    fn adamw_step(&self, param: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], hp: AdamW) {
        ops::adamw_step(param, m, v, grad, hp)
    }

    fn adamw_step_copy(
        &self,
        param: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        grad: &[f32],
        copy: &mut [f32],
        hp: AdamW,
    ) {
        ops::adamw_step(param, m, v, grad, hp);
        ops::copy(copy, param);
    }
    fn host_transfer_bytes(&self) -> u64 {
        self.transferred.load(Ordering::Relaxed)
    }
    fn sum_squares_tree(&self, x: &[f32]) -> Result<f64> {
        self.count(8);
        Ok(ops::sum_squares_tree(x))
    }
    fn host_floats<'a>(&self, buf: &'a Vec<f32>) -> Option<&'a [f32]> {
        Some(buf)
    }
    fn host_floats_mut<'a>(&self, buf: &'a mut Vec<f32>) -> Option<&'a mut [f32]> {
        Some(buf)
    }

    fn attention_cached_forward(
        &self,
        out: &mut [f32],
        q: &[f32],
        kcache: &[f32],
        vcache: &[f32],
        shape: CachedAttnShape,
    ) {
        ops::attention_cached_forward(out, q, kcache, vcache, shape)
    }
}
