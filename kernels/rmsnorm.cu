// RMSNorm (HF LlamaRMSNorm: y = x / sqrt(mean(x²) + eps) * w), forward and backward.
// CPU reference: crate::ops::rmsnorm_forward / rmsnorm_backward. fp32 accumulation throughout.
//
// Layout: one block of RMS_THREADS threads per row; each thread owns the float4 chunks
// tid, tid + RMS_THREADS, ... of the row, kept in registers (RMS_MAXV chunks → c ≤ 8192), so x is
// read from memory once. The launcher asserts c % 4 == 0 and c ≤ 4·RMS_THREADS·RMS_MAXV.
#include "common.cuh"

#define RMS_THREADS 256
#define RMS_MAXV 8

// out[n,c] =, rstd[n] =.
template <typename T>
__device__ void rmsnorm_forward_v1(T* __restrict__ out, float* __restrict__ rstd, const T* __restrict__ x,
                                   const T* __restrict__ w, int n, int c, float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= n) return;
    const long long base = (long long)row * c;
    f4 xv[RMS_MAXV];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < RMS_MAXV; k++) {
        const int i = (threadIdx.x + k * RMS_THREADS) * 4;
        if (i < c) {
            xv[k] = ld4(x, base + i);
            ss += xv[k].x * xv[k].x + xv[k].y * xv[k].y + xv[k].z * xv[k].z + xv[k].w * xv[k].w;
        }
    }
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)c + eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int k = 0; k < RMS_MAXV; k++) {
        const int i = (threadIdx.x + k * RMS_THREADS) * 4;
        if (i < c) {
            f4 wv = ld4(w, i);
            f4 y = {xv[k].x * r * wv.x, xv[k].y * r * wv.y, xv[k].z * r * wv.z, xv[k].w * r * wv.w};
            st4(out, base + i, y);
        }
    }
}

// dx[n,c] += (accumulates into the residual stream's gradient), dw_partial[gridDim.x, c] = (the
// per-block partial sums of dw; rmsnorm_dw_reduce adds them into dw in a fixed order).
//   dx_i += r·w_i·g_i − x_i·r³/c · Σ_j g_j·w_j·x_j,   dw_j += Σ_rows g_j·x_j·r.
// Each block walks rows blockIdx.x, blockIdx.x + gridDim.x, ... (deterministic per grid size).
template <typename T>
__device__ void rmsnorm_backward_v1(T* __restrict__ dx, float* __restrict__ dw_partial, const T* __restrict__ dout,
                                    const T* __restrict__ x, const T* __restrict__ w,
                                    const float* __restrict__ rstd, int n, int c) {
    __shared__ float scratch[32];
    f4 dwv[RMS_MAXV];
#pragma unroll
    for (int k = 0; k < RMS_MAXV; k++) dwv[k] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const long long base = (long long)row * c;
        const float r = rstd[row];
        f4 xv[RMS_MAXV], gw[RMS_MAXV];
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < RMS_MAXV; k++) {
            const int i = (threadIdx.x + k * RMS_THREADS) * 4;
            if (i < c) {
                xv[k] = ld4(x, base + i);
                f4 g = ld4(dout, base + i);
                f4 wv = ld4(w, i);
                gw[k] = {g.x * wv.x, g.y * wv.y, g.z * wv.z, g.w * wv.w};
                dot += gw[k].x * xv[k].x + gw[k].y * xv[k].y + gw[k].z * xv[k].z + gw[k].w * xv[k].w;
                dwv[k].x += g.x * xv[k].x * r;
                dwv[k].y += g.y * xv[k].y * r;
                dwv[k].z += g.z * xv[k].z * r;
                dwv[k].w += g.w * xv[k].w * r;
            }
        }
        dot = block_sum(dot, scratch);
        const float coef = dot * r * r * r / (float)c;
#pragma unroll
        for (int k = 0; k < RMS_MAXV; k++) {
            const int i = (threadIdx.x + k * RMS_THREADS) * 4;
            if (i < c) {
                f4 d = ld4(dx, base + i);
                d.x += r * gw[k].x - xv[k].x * coef;
                d.y += r * gw[k].y - xv[k].y * coef;
                d.z += r * gw[k].z - xv[k].z * coef;
                d.w += r * gw[k].w - xv[k].w * coef;
                st4(dx, base + i, d);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < RMS_MAXV; k++) {
        const int i = (threadIdx.x + k * RMS_THREADS) * 4;
        if (i < c) st4(dw_partial, (long long)blockIdx.x * c + i, dwv[k]);
    }
}

// dw[c] += Σ_b partial[b, c] over b = 0..nparts in order (deterministic).
extern "C" __global__ void rmsnorm_dw_reduce_v1_f32(float* __restrict__ dw, const float* __restrict__ partial,
                                                    int nparts, int c) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c) return;
    float s = 0.0f;
    for (int b = 0; b < nparts; b++) s += partial[(long long)b * c + i];
    dw[i] += s;
}

#define RMSNORM_INSTANCES(T, SUF)                                                                         \
    extern "C" __global__ void __launch_bounds__(RMS_THREADS)                                             \
        rmsnorm_forward_v1_##SUF(T* out, float* rstd, const T* x, const T* w, int n, int c, float eps) {  \
        rmsnorm_forward_v1<T>(out, rstd, x, w, n, c, eps);                                                \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(RMS_THREADS)                                             \
        rmsnorm_backward_v1_##SUF(T* dx, float* dw_partial, const T* dout, const T* x, const T* w,         \
                                  const float* rstd, int n, int c) {                                      \
        rmsnorm_backward_v1<T>(dx, dw_partial, dout, x, w, rstd, n, c);                                   \
    }
RMSNORM_INSTANCES(bf16, bf16)
RMSNORM_INSTANCES(f16, f16)
RMSNORM_INSTANCES(float, f32)
