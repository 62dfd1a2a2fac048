// LoRA low-rank path (PEFT layout: A = lora_A.weight [r, in], B = lora_B.weight [out, r]):
//   y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ.
// The base GEMM x·Wᵀ and the rank-r up-projection (u·Bᵀ, added with beta = 1 in cuBLAS's epilogue)
// run on cuBLAS; these kernels are the parts cuBLAS cannot fuse: the down-projection reads x once,
// applying the dropout mask on the fly (never materialised), and the backward's dA and dx terms
// recompute the same mask. Mask: `dropout_keep(seed, row·in + col)` (common.cuh), kept values
// scaled by 1/(1−p). CPU reference: crate::kernels::dropout_keep + matmul (tests/cuda_parity.rs).
#include "common.cuh"

#define LORA_WARPS 8

// u[n,R] = dropout(x)[n,in]·Aᵀ. One warp per row; each lane owns in/32 columns; R dot products in
// registers, reduced across the warp at the end.
template <typename T, int R>
__device__ void lora_down_forward_v1(T* __restrict__ u, const T* __restrict__ x, const T* __restrict__ a, int n,
                                     int in, unsigned long long seed, unsigned int threshold, float inv_keep) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * LORA_WARPS + threadIdx.x / 32;
    if (row >= n) return;
    const long long base = (long long)row * in;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int col = lane; col < in; col += 32) {
        float xv = ld(x, base + col);
        xv = dropout_keep(seed, (unsigned long long)(base + col), threshold) ? xv * inv_keep : 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] += xv * ld(a, (long long)r * in + col);
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float s = warp_sum(acc[r]);
        if (lane == 0) st(u, (long long)row * R + r, s);
    }
}

// partial[split, R, in] = Σ_{rows of this split} du[row, r]·dropout(x)[row, col]; one thread per
// column, rows split over gridDim.y; lora_grad_a_reduce adds the partials into dA in a fixed order.
template <typename T, int R>
__device__ void lora_grad_a_partial_v1(float* __restrict__ partial, const T* __restrict__ du,
                                       const T* __restrict__ x, int n, int in, unsigned long long seed,
                                       unsigned int threshold, float inv_keep) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= in) return;
    const int rows_per = (n + gridDim.y - 1) / gridDim.y;
    const int r0 = blockIdx.y * rows_per, r1 = min(n, r0 + rows_per);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int row = r0; row < r1; row++) {
        const long long idx = (long long)row * in + col;
        float xv = ld(x, idx);
        xv = dropout_keep(seed, (unsigned long long)idx, threshold) ? xv * inv_keep : 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] += ld(du, (long long)row * R + r) * xv;
    }
#pragma unroll
    for (int r = 0; r < R; r++) partial[((long long)blockIdx.y * R + r) * in + col] = acc[r];
}

// da[R, in] += Σ_split partial[split, R, in], in split order.
extern "C" __global__ void lora_grad_a_reduce_v1_f32(float* da, const float* partial, int nsplit, long long len) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float s = 0.0f;
    for (int k = 0; k < nsplit; k++) s += partial[(long long)k * len + i];
    da[i] += s;
}

// dx[n,in] += mask ⊙ (du·A)/(1−p): the low-rank path's input gradient.
template <typename T, int R>
__device__ void lora_dx_v1(T* __restrict__ dx, const T* __restrict__ du, const T* __restrict__ a, int n, int in,
                           unsigned long long seed, unsigned int threshold, float inv_keep) {
    const long long len = (long long)n * in;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < len;
         idx += (long long)gridDim.x * blockDim.x) {
        if (!dropout_keep(seed, (unsigned long long)idx, threshold)) continue;
        const long long row = idx / in, col = idx - row * in;
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) s += ld(du, row * R + r) * ld(a, (long long)r * in + col);
        st(dx, idx, ld(dx, idx) + s * inv_keep);
    }
}

#define LORA_INSTANCES(T, SUF, R)                                                                          \
    extern "C" __global__ void __launch_bounds__(LORA_WARPS * 32) lora_down_forward_v1_r##R##_##SUF(      \
        T* u, const T* x, const T* a, int n, int in, unsigned long long seed, unsigned int threshold,        \
        float inv_keep) {                                                                                  \
        lora_down_forward_v1<T, R>(u, x, a, n, in, seed, threshold, inv_keep);                             \
    }                                                                                                      \
    extern "C" __global__ void lora_grad_a_partial_v1_r##R##_##SUF(float* partial, const T* du, const T* x, \
                                                                   int n, int in, unsigned long long seed, \
                                                                   unsigned int threshold, float inv_keep) { \
        lora_grad_a_partial_v1<T, R>(partial, du, x, n, in, seed, threshold, inv_keep);                    \
    }                                                                                                      \
    extern "C" __global__ void lora_dx_v1_r##R##_##SUF(T* dx, const T* du, const T* a, int n, int in,       \
                                                       unsigned long long seed, unsigned int threshold,     \
                                                       float inv_keep) {                                   \
        lora_dx_v1<T, R>(dx, du, a, n, in, seed, threshold, inv_keep);                                     \
    }
LORA_INSTANCES(bf16, bf16, 8)
LORA_INSTANCES(bf16, bf16, 16)
LORA_INSTANCES(bf16, bf16, 64)
LORA_INSTANCES(f16, f16, 8)
LORA_INSTANCES(f16, f16, 16)
LORA_INSTANCES(f16, f16, 64)
LORA_INSTANCES(float, f32, 8)
LORA_INSTANCES(float, f32, 16)
LORA_INSTANCES(float, f32, 64)
