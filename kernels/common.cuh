// Shared device helpers for every zhllama kernel (compiled by NVRTC; no host code, no std headers).
//
// Storage types: `bf16` (__nv_bfloat16) or `f16` (__half, the fp16 mode) for weights and
// activations, `float` for statistics, master weights, moments and gradient accumulators. Every
// kernel loads through `ld()` and stores through `st()`, so one template body serves every storage
// type; arithmetic is always fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

#define ZH_WARP 32
#define ZH_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ float ld(const f16* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(f16* p, long long i, float v) { p[i] = __float2half_rn(v); }

// Four consecutive elements starting at `i` (i must be a multiple of 4 and the row 8/16-byte
// aligned; launchers assert the channel count is a multiple of 4).
struct f4 {
    float x, y, z, w;
};
__device__ __forceinline__ f4 ld4(const float* p, long long i) {
    float4 v = *reinterpret_cast<const float4*>(p + i);
    f4 r = {v.x, v.y, v.z, v.w};
    return r;
}
__device__ __forceinline__ f4 ld4(const bf16* p, long long i) {
    uint2 raw = *reinterpret_cast<const uint2*>(p + i);
    __nv_bfloat162 a = *reinterpret_cast<__nv_bfloat162*>(&raw.x);
    __nv_bfloat162 b = *reinterpret_cast<__nv_bfloat162*>(&raw.y);
    float2 fa = __bfloat1622float2(a);
    float2 fb = __bfloat1622float2(b);
    f4 r = {fa.x, fa.y, fb.x, fb.y};
    return r;
}
__device__ __forceinline__ f4 ld4(const f16* p, long long i) {
    uint2 raw = *reinterpret_cast<const uint2*>(p + i);
    __half2 a = *reinterpret_cast<__half2*>(&raw.x);
    __half2 b = *reinterpret_cast<__half2*>(&raw.y);
    float2 fa = __half22float2(a);
    float2 fb = __half22float2(b);
    f4 r = {fa.x, fa.y, fb.x, fb.y};
    return r;
}
__device__ __forceinline__ void st4(float* p, long long i, f4 v) {
    *reinterpret_cast<float4*>(p + i) = make_float4(v.x, v.y, v.z, v.w);
}
__device__ __forceinline__ void st4(bf16* p, long long i, f4 v) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y);
    __nv_bfloat162 b = __floats2bfloat162_rn(v.z, v.w);
    uint2 raw;
    raw.x = *reinterpret_cast<unsigned int*>(&a);
    raw.y = *reinterpret_cast<unsigned int*>(&b);
    *reinterpret_cast<uint2*>(p + i) = raw;
}
__device__ __forceinline__ void st4(f16* p, long long i, f4 v) {
    __half2 a = __floats2half2_rn(v.x, v.y);
    __half2 b = __floats2half2_rn(v.z, v.w);
    uint2 raw;
    raw.x = *reinterpret_cast<unsigned int*>(&a);
    raw.y = *reinterpret_cast<unsigned int*>(&b);
    *reinterpret_cast<uint2*>(p + i) = raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = ZH_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = ZH_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = ZH_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the function syncs before returning, so the same
// scratch can be reused by the next call.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % ZH_WARP, warp = threadIdx.x / ZH_WARP;
    const int nwarps = blockDim.x / ZH_WARP;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? scratch[lane] : 0.0f;
    r = warp_sum(r);
    __syncthreads();
    return r;
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % ZH_WARP, warp = threadIdx.x / ZH_WARP;
    const int nwarps = blockDim.x / ZH_WARP;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? scratch[lane] : -ZH_INF;
    r = warp_max(r);
    __syncthreads();
    return r;
}

// Online log-sum-exp state: running max `m` and sum `s` of exp(x - m).
struct lse_state {
    float m, s;
};
__device__ __forceinline__ lse_state lse_push(lse_state a, float x) {
    if (x > a.m) {
        a.s = a.s * expf(a.m - x) + 1.0f;
        a.m = x;
    } else {
        a.s += expf(x - a.m);
    }
    return a;
}
__device__ __forceinline__ lse_state lse_merge(lse_state a, lse_state b) {
    if (b.m == -ZH_INF) return a;
    if (a.m == -ZH_INF) return b;
    float m = fmaxf(a.m, b.m);
    lse_state r = {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
    return r;
}
__device__ __forceinline__ lse_state block_lse(lse_state v, float* scratch_m, float* scratch_s) {
    const int lane = threadIdx.x % ZH_WARP, warp = threadIdx.x / ZH_WARP;
    const int nwarps = blockDim.x / ZH_WARP;
#pragma unroll
    for (int o = ZH_WARP / 2; o > 0; o >>= 1) {
        lse_state other = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = lse_merge(v, other);
    }
    if (lane == 0) {
        scratch_m[warp] = v.m;
        scratch_s[warp] = v.s;
    }
    __syncthreads();
    lse_state r = {-ZH_INF, 0.0f};
    if (lane < nwarps) {
        r.m = scratch_m[lane];
        r.s = scratch_s[lane];
    }
#pragma unroll
    for (int o = ZH_WARP / 2; o > 0; o >>= 1) {
        lse_state other = {__shfl_xor_sync(0xffffffffu, r.m, o), __shfl_xor_sync(0xffffffffu, r.s, o)};
        r = lse_merge(r, other);
    }
    __syncthreads();
    return r;
}

// SplitMix64's finaliser (crate::ops::dropout::mix64): the counter-based hash behind the dropout
// masks (dropout.cu) and the on-device initialisation (fill.cu), bit-identical to the CPU's.
__device__ __forceinline__ unsigned long long zh_mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// cos/sin of position `pos` for frequency index i in [0, d/2): angle = pos·inv_freq[i] in fp32, as HF
// computes the angle table. `inv_freq[i] = theta^(−2i/d)` is computed once on the host (correctly
// rounded, `ops::rope::inv_freq`) and passed in: CUDA's powf is not correctly rounded, and its error
// grows with the position into the angle.
__device__ __forceinline__ void rope_cs(int pos, int i, const float* __restrict__ inv_freq, float& c, float& s) {
    sincosf((float)pos * inv_freq[i], &s, &c);
}
