// Cross-entropy with ignore index -100: over full logits rows (the Backend trait's ops), and the
// chunked pieces of the fused lm_head + cross-entropy, which never holds the B×T×V logits: the host
// loops over vocabulary chunks, cuBLAS writes one [n, vc] chunk of logits, and these kernels fold it
// into running per-row statistics (forward) or turn it into dlogits in place (backward), which the
// next cuBLAS calls consume. CPU reference: crate::ops::cross_entropy_forward / _backward (the fused
// path is checked against matmul + those).
#include "common.cuh"

#define CE_THREADS 256

// losses[n] = logsumexp(logits[i,:]) − logits[i, target[i]], 0 where target = −100.
template <typename T>
__device__ void cross_entropy_forward_v1(float* __restrict__ losses, const T* __restrict__ logits,
                                         const int* __restrict__ targets, int n, int v) {
    __shared__ float sm[32], ss[32];
    const int row = blockIdx.x;
    if (row >= n) return;
    const int tgt = targets[row];
    if (tgt == -100) {
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    const long long base = (long long)row * v;
    lse_state st_ = {-ZH_INF, 0.0f};
    for (int j = threadIdx.x; j < v; j += blockDim.x) st_ = lse_push(st_, ld(logits, base + j));
    st_ = block_lse(st_, sm, ss);
    // log Σ − (x_t − m), not (m + log Σ) − x_t: x_t − m is exact, so a confident row (loss ≪ |m|)
    // keeps its digits instead of losing them to the rounding of m + log Σ (the CPU's order too).
    if (threadIdx.x == 0) losses[row] = logf(st_.s) - (ld(logits, base + tgt) - st_.m);
}

// dlogits[n,v] = scale·(softmax(logits) − onehot(target)), 0 on ignored rows.
template <typename TO, typename TI>
__device__ void cross_entropy_backward_v1(TO* __restrict__ dlogits, const TI* __restrict__ logits,
                                          const int* __restrict__ targets, int n, int v, float scale) {
    __shared__ float sm[32], ss[32];
    const int row = blockIdx.x;
    if (row >= n) return;
    const int tgt = targets[row];
    const long long base = (long long)row * v;
    if (tgt == -100) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) st(dlogits, base + j, 0.0f);
        return;
    }
    lse_state st_ = {-ZH_INF, 0.0f};
    for (int j = threadIdx.x; j < v; j += blockDim.x) st_ = lse_push(st_, ld(logits, base + j));
    st_ = block_lse(st_, sm, ss);
    const float lse = st_.m + logf(st_.s);
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = expf(ld(logits, base + j) - lse);
        st(dlogits, base + j, scale * (p - (j == tgt ? 1.0f : 0.0f)));
    }
}

// ---- fused lm_head + CE, one vocabulary chunk [v0, v0 + vc) at a time ----------------------------
// Running statistics per row: stats[i] = (max, sum of exp(x − max)) and tlogit[i] = the target's
// logit once its chunk has been seen. Call ..._chunk_forward for every chunk (stats initialised to
// (−inf, 0) by the first chunk: `first` = 1), then ..._finish.
template <typename T>
__device__ void lmhead_ce_chunk_forward_v1(float2* __restrict__ stats, float* __restrict__ tlogit,
                                           const T* __restrict__ logits, const int* __restrict__ targets,
                                           int n, int vc, int v0, int first) {
    __shared__ float sm[32], ss[32];
    const int row = blockIdx.x;
    if (row >= n) return;
    const long long base = (long long)row * vc;
    lse_state st_ = {-ZH_INF, 0.0f};
    for (int j = threadIdx.x; j < vc; j += blockDim.x) st_ = lse_push(st_, ld(logits, base + j));
    st_ = block_lse(st_, sm, ss);
    const int tgt = targets[row];
    if (threadIdx.x == 0) {
        lse_state prev = {-ZH_INF, 0.0f};
        if (!first) {
            float2 p = stats[row];
            prev.m = p.x;
            prev.s = p.y;
        }
        lse_state r = lse_merge(prev, st_);
        stats[row] = make_float2(r.m, r.s);
        if (first) tlogit[row] = 0.0f;
        if (tgt >= v0 && tgt < v0 + vc) tlogit[row] = ld(logits, base + (tgt - v0));
    }
}

// losses[n] = lse − target logit (0 on ignored rows); lse[n] = saved for the backward.
extern "C" __global__ void lmhead_ce_finish_v1_f32(float* losses, float* lse, const float2* stats,
                                                   const float* tlogit, const int* targets, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float2 s = stats[i];
    lse[i] = s.x + logf(s.y);
    // As cross_entropy_forward: log Σ − (x_t − m) keeps a confident row's digits.
    losses[i] = targets[i] == -100 ? 0.0f : logf(s.y) - (tlogit[i] - s.x);
}

// In place: logits chunk [n, vc] → dlogits chunk = scale·(exp(x − lse) − onehot), 0 on ignored rows.
template <typename T>
__device__ void lmhead_ce_chunk_backward_v1(T* __restrict__ chunk, const float* __restrict__ lse,
                                            const int* __restrict__ targets, int n, int vc, int v0, float scale) {
    const int row = blockIdx.x;
    if (row >= n) return;
    const long long base = (long long)row * vc;
    const int tgt = targets[row];
    const float l = lse[row];
    for (int j = threadIdx.x; j < vc; j += blockDim.x) {
        float g = 0.0f;
        if (tgt != -100) g = scale * (expf(ld(chunk, base + j) - l) - (j + v0 == tgt ? 1.0f : 0.0f));
        st(chunk, base + j, g);
    }
}

#define CE_INSTANCES(T, SUF)                                                                              \
    extern "C" __global__ void __launch_bounds__(CE_THREADS)                                              \
        cross_entropy_forward_v1_##SUF(float* losses, const T* logits, const int* targets, int n, int v) { \
        cross_entropy_forward_v1(losses, logits, targets, n, v);                                          \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(CE_THREADS) cross_entropy_backward_v1_##SUF(             \
        T* dlogits, const T* logits, const int* targets, int n, int v, float scale) {                     \
        cross_entropy_backward_v1(dlogits, logits, targets, n, v, scale);                                 \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(CE_THREADS) lmhead_ce_chunk_forward_v1_##SUF(            \
        float2* stats, float* tlogit, const T* logits, const int* targets, int n, int vc, int v0, int first) { \
        lmhead_ce_chunk_forward_v1(stats, tlogit, logits, targets, n, vc, v0, first);                     \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(CE_THREADS) lmhead_ce_chunk_backward_v1_##SUF(           \
        T* chunk, const float* lse, const int* targets, int n, int vc, int v0, float scale) {             \
        lmhead_ce_chunk_backward_v1(chunk, lse, targets, n, vc, v0, scale);                               \
    }
CE_INSTANCES(bf16, bf16)
CE_INSTANCES(f16, f16)
CE_INSTANCES(float, f32)
