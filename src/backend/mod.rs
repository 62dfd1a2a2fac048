//! The `Backend` trait: every numerical op a LLaMA needs, forward and backward, over opaque buffers.
//!
//! The backend knows ops and nothing of LLaMA. The CPU backend (`cpu`) is the readable reference:
//! each trait method calls the same-named function in `crate::ops`, which is the spec every CUDA
//! kernel is tested against. The CUDA backend (`cuda`, feature `cuda`) implements the same trait with
//! kernels from `kernels/`; built without the feature, `cuda::CudaBackend::new` returns a clear error.
//!
//! Conventions (llm.c style):
//! - argument order: outputs, inputs, saved statistics, shape, scalars;
//! - shapes: a `Copy` struct per op family ([`GemmShape`], [`RowShape`], [`RopeShape`],
//!   [`AttnShape`], [`AttnRopeShape`], [`CachedAttnShape`], [`LmHeadShape`]) rather than positional
//!   sizes (the short ops, embedding and cross-entropy, keep their `n, c` / `n, v`); a backward
//!   takes what its forward saved as one group ([`AttnSaved`], [`RmsNormSaved`], [`LmHeadSaved`]),
//!   so a signature reads "gradients out, saved in, shape";
//! - sizes: `n` rows (= B·T), `c` channels, `b` batch, `t` sequence, `h` query heads, `hkv` key/value
//!   heads, `d` head dim, `v` vocab;
//! - every tensor is row-major and contiguous; activations are `[B, T, ...]`;
//! - each method's doc says which outputs are written (`=`) and which accumulate (`+=`);
//! - ops never allocate device memory: the caller allocates at the call site (once per shape).
//!
//! Buffers hold floats. The CPU backend stores `f32`; the CUDA backend picks the storage type of a
//! buffer from the [`Role`] it was allocated with (bf16 activations and weights, fp32 master weights,
//! moments and gradient accumulators). Host transfers are always `f32`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
pub mod cuda_options;

use anyhow::Result;
use std::ops::Range;

/// What a buffer is for; lets a mixed-precision backend choose its storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Weights the forward pass reads (bf16 on GPU).
    Weight,
    /// Activations and their gradients (bf16 on GPU).
    Activation,
    /// Gradient accumulators, fp32 master weights, optimizer moments, statistics (fp32 everywhere).
    Fp32,
}

/// The AdamW hyper-parameters live with the op that uses them.
pub use crate::ops::adamw::AdamW;
/// The ops' shapes and saved-tensor groups live with the CPU reference that defines them.
pub use crate::ops::shape::{
    AttnRopeShape, AttnSaved, AttnShape, CachedAttnShape, GemmShape, LmHeadShape, RmsNormSaved,
    RopeShape, RowShape,
};

/// The inputs of [`Backend::lm_head_cross_entropy_forward`]: `x[n,c]`, `w[v,c]`, `targets[n]`.
pub struct LmHeadIn<'a, V, I> {
    pub x: V,
    pub w: V,
    pub targets: &'a I,
}

/// What [`Backend::lm_head_cross_entropy_backward`] re-reads: the forward's inputs and the whole
/// `logits` and `lse` buffers as the forward left them.
pub struct LmHeadSaved<'a, V, B, I> {
    pub x: V,
    pub w: V,
    pub logits: &'a B,
    pub lse: &'a B,
    pub targets: &'a I,
}

/// Element counts of the buffers [`Backend::lm_head_cross_entropy_forward`] and its backward take
/// for `n` rows and vocabulary `v` ([`Backend::lm_head_cross_entropy_buffers`]); a count may be 0
/// (pass an empty view).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LmHeadCeBuffers {
    /// `logits` (`Role::Activation`): the `[n, v]` logits the composite default writes and its
    /// backward reads; 0 on a backend that never holds them.
    pub logits: usize,
    /// `lse` (`Role::Fp32`): per-row statistics a fused forward saves for its backward.
    pub lse: usize,
    /// `scratch` (`Role::Activation`): the default backward's `[n, v]` d-logits, or a fused
    /// backend's vocabulary chunk.
    pub scratch: usize,
}

pub trait Backend: Send + Sync + 'static {
    /// An owning float buffer in the backend's memory.
    type Buf: Send + 'static;
    /// An owning buffer of `i32` token ids or labels (`-100` = ignore) in the backend's memory.
    type Ids: Send;
    /// A borrowed, read-only range of a `Buf`.
    type View<'a>
    where
        Self: 'a;
    /// A borrowed, writable range of a `Buf`.
    type ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------------------------
    /// A zero-filled buffer of `len` floats.
    fn alloc(&self, len: usize, role: Role) -> Result<Self::Buf>;
    /// A zero-filled buffer of `len` ids.
    fn alloc_ids(&self, len: usize) -> Result<Self::Ids>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// Device bytes `buf` holds (memory reports): 4 per element unless a backend stores narrower.
    fn buf_bytes(&self, buf: &Self::Buf) -> usize {
        4 * self.buf_len(buf)
    }
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    fn download(&self, src: &Self::Buf, dst: &mut [f32]) -> Result<()>;
    fn upload_ids(&self, dst: &mut Self::Ids, src: &[i32]) -> Result<()>;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::View<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'a>;
    /// Wait until every queued op has finished (no-op on CPU).
    fn synchronize(&self) -> Result<()>;

    // ---- profiling ------------------------------------------------------------------------------
    /// Open a named range around the ops queued until the matching [`Backend::range_pop`], so a
    /// profiler attributes their time to it (NVTX on CUDA, for Nsight Systems/Compute). Ranges
    /// nest. No-op by default, and cheap enough to call per layer and per op.
    fn range_push(&self, _name: &str) {}
    /// Close the innermost range opened by [`Backend::range_push`].
    fn range_pop(&self) {}

    // ---- elementwise ----------------------------------------------------------------------------
    /// `out = 0`.
    fn zero(&self, out: Self::ViewMut<'_>);
    /// `out = x`.
    fn copy(&self, out: Self::ViewMut<'_>, x: Self::View<'_>);
    /// `out += alpha * x`.
    fn axpy(&self, out: Self::ViewMut<'_>, alpha: f32, x: Self::View<'_>);
    /// `out *= alpha`.
    fn scale(&self, out: Self::ViewMut<'_>, alpha: f32);
    /// `out[i] =` a uniform value in `[lo, hi)` from a counter-based hash of `(seed, i)`, `i`
    /// counted from the start of `out` (`crate::ops::fill::uniform_at`; every backend gives the same
    /// values before its storage rounding). `lo == hi` fills with `lo`. For on-device weight init.
    fn fill_uniform(&self, out: Self::ViewMut<'_>, seed: u64, lo: f32, hi: f32);
    /// Sum of squares of `x`, accumulated in f64 (for the global gradient norm and NaN checks:
    /// a NaN/Inf anywhere gives a non-finite result).
    fn sum_squares(&self, x: Self::View<'_>) -> Result<f64>;
    /// Sum of `x`, accumulated in f64; only the scalar crosses to the host (the loss of a forward
    /// from its per-token losses). A NaN/Inf anywhere gives a non-finite result.
    fn sum(&self, x: Self::View<'_>) -> Result<f64>;
    /// In place: `out[i] = keep_i ? out[i] / (1 - p) : 0` with `keep_i = uniform(key, i) >= p`, the
    /// stateless mask of `crate::ops::dropout` (`i` counts from the start of the view); `p = 0` is a
    /// no-op. The same call on the gradient is the backward.
    fn dropout(&self, out: Self::ViewMut<'_>, p: f32, key: u64);

    // ---- matmul ---------------------------------------------------------------------------------
    /// `out[m,n] = alpha * op(a) · op(b) + beta * out` with `op(a)` of shape `[m,k]` and `op(b)` of
    /// shape `[k,n]`; `a` is stored `[m,k]` (or `[k,m]` when `trans_a`), `b` is stored `[k,n]` (or
    /// `[n,k]` when `trans_b`, the layout of an HF `Linear` weight `[out, in]`). With `beta = 0` the
    /// previous content of `out` is ignored (even NaN).
    fn matmul(
        &self,
        out: Self::ViewMut<'_>,
        a: Self::View<'_>,
        b: Self::View<'_>,
        shape: GemmShape,
        alpha: f32,
        beta: f32,
    );

    // ---- RMSNorm (HF LlamaRMSNorm: y = x / sqrt(mean(x²) + eps) * w) ------------------------------
    /// `out[n,c] =`, `rstd[n] =` (saved 1/sqrt(mean(x²)+eps)).
    fn rmsnorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        x: Self::View<'_>,
        w: Self::View<'_>,
        shape: RowShape,
        eps: f32,
    );
    /// `dx[n,c] +=` (accumulates into the residual stream's gradient), `dw[c] +=`.
    fn rmsnorm_backward(
        &self,
        dx: Self::ViewMut<'_>,
        dw: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        saved: RmsNormSaved<Self::View<'_>>,
        shape: RowShape,
    );

    // ---- rotary embedding (HF layout: rotate_half over the two halves of each head) ---------------
    /// In place on `x[b,t,h,d]`: position of token `(bi, ti)` is `pos_offset + ti`;
    /// inverse frequencies `theta^(-2i/d)`.
    fn rope_forward(&self, x: Self::ViewMut<'_>, shape: RopeShape);
    /// In place on `dx[b,t,h,d]`: the transpose of `rope_forward` (rotation by the negative angle).
    fn rope_backward(&self, dx: Self::ViewMut<'_>, shape: RopeShape);

    // ---- causal attention with grouped-query heads ----------------------------------------------
    /// `out[b,t,h,d] =`, `lse[b,h,t] =` (saved log-sum-exp of the scaled scores). `q[b,t,h,d]`,
    /// `k`/`v[b,t,hkv,d]`; query head `hi` reads kv head `hi / (h / hkv)`; scale `1/sqrt(d)`;
    /// query `i` attends to keys `0..=i`.
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        shape: AttnShape,
    );
    /// `dq =`, `dk =`, `dv =` (shapes as q, k, v), from `dout` and the forward's inputs, `out`
    /// and `lse`.
    fn attention_backward(
        &self,
        dq: Self::ViewMut<'_>,
        dk: Self::ViewMut<'_>,
        dv: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        saved: AttnSaved<Self::View<'_>>,
        shape: AttnShape,
    );

    // ---- SwiGLU: out = silu(gate) * up ------------------------------------------------------------
    /// `out[len] =`.
    fn swiglu_forward(&self, out: Self::ViewMut<'_>, gate: Self::View<'_>, up: Self::View<'_>);
    /// `dgate =`, `dup =`.
    fn swiglu_backward(
        &self,
        dgate: Self::ViewMut<'_>,
        dup: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        gate: Self::View<'_>,
        up: Self::View<'_>,
    );

    // ---- embedding --------------------------------------------------------------------------------
    /// `out[n,c] = table[ids[i], :]`; ids must be in `0..v` (checked by the caller).
    fn embedding_forward(
        &self,
        out: Self::ViewMut<'_>,
        ids: &Self::Ids,
        table: Self::View<'_>,
        n: usize,
        c: usize,
    );
    /// `dtable[v,c] +=` scatter-add of `dout[n,c]` rows; deterministic (fixed summation order).
    fn embedding_backward(
        &self,
        dtable: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        ids: &Self::Ids,
        n: usize,
        c: usize,
    );

    // ---- cross-entropy with ignore index -100 ----------------------------------------------------
    /// `losses[n] =` per-row `logsumexp(logits) - logits[target]`, `0` where the target is `-100`.
    fn cross_entropy_forward(
        &self,
        losses: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        targets: &Self::Ids,
        n: usize,
        v: usize,
    );
    /// `dlogits[n,v] = scale * (softmax(logits) - onehot(target))`, `0` on ignored rows.
    /// (HF's mean over non-ignored tokens is `scale = 1 / count`.) `dlogits` may not alias `logits`.
    fn cross_entropy_backward(
        &self,
        dlogits: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        targets: &Self::Ids,
        n: usize,
        v: usize,
        scale: f32,
    );

    // ---- fused ops with composite defaults ----------------------------------------------------------
    // Each default is the sequence of primitive ops above that the fused op replaces, so a backend
    // without a fused kernel computes exactly what the model computed before; a backend with one
    // (CUDA) overrides it. Buffers the two paths need differently come from the backend.

    /// What [`Backend::lm_head_cross_entropy_forward`] / `_backward` need for `n` rows, vocabulary
    /// `v`; `backward = false` for a forward-only caller (eval). Default: the full logits, plus the
    /// full d-logits for the backward.
    fn lm_head_cross_entropy_buffers(&self, n: usize, v: usize, backward: bool) -> LmHeadCeBuffers {
        LmHeadCeBuffers {
            logits: n * v,
            lse: 0,
            scratch: if backward { n * v } else { 0 },
        }
    }
    /// lm_head + cross-entropy: `losses[n] =` per-row `logsumexp(x·wᵀ) - (x·wᵀ)[target]` (`0` where
    /// the target is `-100`), from `input`'s `x[n,c]`, `w[v,c]`, `targets[n]`. `logits`, `lse`,
    /// `scratch` are whole buffers holding at least the counts of
    /// [`Backend::lm_head_cross_entropy_buffers`]; `logits` and `lse` must reach the backward
    /// unchanged. Default: `logits[n,v] = x·wᵀ` ([`Backend::matmul`]), then
    /// [`Backend::cross_entropy_forward`]; `lse`, `scratch` untouched.
    fn lm_head_cross_entropy_forward(
        &self,
        losses: Self::ViewMut<'_>,
        lse: &mut Self::Buf,
        logits: &mut Self::Buf,
        scratch: &mut Self::Buf,
        input: LmHeadIn<'_, Self::View<'_>, Self::Ids>,
        shape: LmHeadShape,
    ) {
        let _ = (lse, scratch);
        let LmHeadShape { n, c, v } = shape;
        let nv = 0..n * v;
        self.matmul(
            self.view_mut(logits, nv.clone()),
            input.x,
            input.w,
            GemmShape::nt(n, v, c),
            1.0,
            0.0,
        );
        self.cross_entropy_forward(losses, self.view(logits, nv), input.targets, n, v);
    }
    /// Backward of [`Backend::lm_head_cross_entropy_forward`] with loss weight `scale` per token
    /// (`1/count` for HF's mean): `dx[n,c] =`, `dw[v,c] +=` (`None`: a frozen lm_head). `saved`
    /// holds the forward's inputs and its `logits` and `lse` as the forward left them. Default:
    /// `scratch[n,v] = dlogits` ([`Backend::cross_entropy_backward`]), `dw += dlogitsᵀ·x`, then
    /// `dx = dlogits·w`.
    fn lm_head_cross_entropy_backward(
        &self,
        dx: Self::ViewMut<'_>,
        dw: Option<Self::ViewMut<'_>>,
        scratch: &mut Self::Buf,
        saved: LmHeadSaved<'_, Self::View<'_>, Self::Buf, Self::Ids>,
        shape: LmHeadShape,
        scale: f32,
    ) {
        let LmHeadShape { n, c, v } = shape;
        let nv = 0..n * v;
        self.cross_entropy_backward(
            self.view_mut(scratch, nv.clone()),
            self.view(saved.logits, nv.clone()),
            saved.targets,
            n,
            v,
            scale,
        );
        if let Some(dw) = dw {
            self.matmul(
                dw,
                self.view(scratch, nv.clone()),
                saved.x,
                GemmShape::tn(v, c, n),
                1.0,
                1.0,
            );
        }
        self.matmul(
            dx,
            self.view(scratch, nv),
            saved.w,
            GemmShape::nn(n, c, v),
            1.0,
            0.0,
        );
    }

    /// Causal GQA attention of RoPE'd q and k (as [`Backend::rope_forward`] with `shape`'s base
    /// and positions, then [`Backend::attention_forward`]): `out[b,t,h,d] =`, `lse[b,h,t] =`.
    /// `q[b,t,h,d]`, `k[b,t,hkv,d]` are whole buffers, un-rotated on entry; the op may rotate them
    /// in place (the default does, a fused kernel rotates on load and leaves them) and the
    /// backward must get them as the forward left them.
    fn attention_rope_forward(
        &self,
        out: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: Self::View<'_>,
        shape: AttnRopeShape,
    ) {
        let (qr, kr) = (0..shape.attn.q_len(), 0..shape.attn.kv_len());
        self.rope_forward(self.view_mut(q, qr.clone()), shape.rope_q());
        self.rope_forward(self.view_mut(k, kr.clone()), shape.rope_k());
        self.attention_forward(out, lse, self.view(q, qr), self.view(k, kr), v, shape.attn);
    }
    /// Backward of [`Backend::attention_rope_forward`]: `dq =`, `dk =` (whole buffers, shaped as
    /// q and k) with respect to the un-rotated q and k, `dv =`; `saved.q`, `saved.k` as the
    /// forward left them. Default: [`Backend::attention_backward`], then
    /// [`Backend::rope_backward`] on dq and dk.
    fn attention_rope_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        saved: AttnSaved<Self::View<'_>>,
        shape: AttnRopeShape,
    ) {
        let (qr, kr) = (0..shape.attn.q_len(), 0..shape.attn.kv_len());
        self.attention_backward(
            self.view_mut(dq, qr.clone()),
            self.view_mut(dk, kr.clone()),
            dv,
            dout,
            saved,
            shape.attn,
        );
        self.rope_backward(self.view_mut(dq, qr), shape.rope_q());
        self.rope_backward(self.view_mut(dk, kr), shape.rope_k());
    }

    // ---- optimizer ----------------------------------------------------------------------------------
    /// One AdamW step over a flat range: `param`, `m`, `v` updated in place from `grad`
    /// (`grad` already averaged and clipped by the caller).
    fn adamw_step(
        &self,
        param: Self::ViewMut<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        grad: Self::View<'_>,
        hp: AdamW,
    );

    // ---- inference ----------------------------------------------------------------------------------
    /// Attention of `tq` new queries over a key/value cache: `out[b,tq,h,d] =`. `q[b,tq,h,d]`;
    /// `kcache`/`vcache[b,tmax,hkv,d]` hold positions `0..past+tq` (the new keys already written);
    /// query `i` (absolute position `past+i`) attends keys `0..=past+i`. Inference only (no backward).
    fn attention_cached_forward(
        &self,
        out: Self::ViewMut<'_>,
        q: Self::View<'_>,
        kcache: Self::View<'_>,
        vcache: Self::View<'_>,
        shape: CachedAttnShape,
    );

    // ---- device-resident optimizer step, host-transfer accounting ------------------------------------
    /// Bytes moved between host memory and this backend's memory so far, by the calls that cross
    /// that boundary, counted as their payload: 4 per element of the host slice of
    /// [`Backend::upload`], [`Backend::download`] and [`Backend::upload_ids`], 8 for the `f64` that
    /// [`Backend::sum_squares`] and [`Backend::sum_squares_tree`] return. Every backend counts the
    /// same calls the same way (on the CPU backend host memory *is* its memory, but it counts as a
    /// device backend would), so a count measured on CPU is the CUDA backend's count.
    fn host_transfer_bytes(&self) -> u64;
    /// `Σ x²` in f64 with a result that depends only on `x`'s values and length (never on where
    /// the view starts or on thread counts). The CPU reference is [`crate::ops::sum_squares_tree`]
    /// (the canonical pairwise tree, which makes the distributed gradient norm bit-identical
    /// across world sizes); the default is [`Backend::sum_squares`], a deterministic order of the
    /// backend's own. A NaN/Inf anywhere gives a non-finite result.
    fn sum_squares_tree(&self, x: Self::View<'_>) -> Result<f64> {
        self.sum_squares(x)
    }
    /// [`Backend::adamw_step`] on `param` (fp32 master), `m`, `v`, then `copy =` the updated
    /// `param` in `copy`'s storage type (the 16-bit weights the forward reads on CUDA; a plain copy
    /// on CPU). `copy` has `param`'s length.
    fn adamw_step_copy(
        &self,
        param: Self::ViewMut<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        grad: Self::View<'_>,
        copy: Self::ViewMut<'_>,
        hp: AdamW,
    );
    /// The buffer's floats where this backend's memory is host memory (the CPU backend), so the
    /// host transports' collectives can run on it in place; `None` on a device backend (its
    /// collectives are the device's own, e.g. NCCL). Not a transfer: nothing is copied.
    fn host_floats<'a>(&self, buf: &'a Self::Buf) -> Option<&'a [f32]> {
        let _ = buf;
        None
    }
    /// [`Backend::host_floats`], writable.
    fn host_floats_mut<'a>(&self, buf: &'a mut Self::Buf) -> Option<&'a mut [f32]> {
        let _ = buf;
        None
    }
}
