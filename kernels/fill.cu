// On-device weight initialisation: fill_uniform (out = uniform values in [lo, hi) from a counter-based
// hash of the element index). CPU reference: crate::ops::fill::fill_uniform (bit-identical in fp32:
// the same 64-bit hash, the same exact u, one correctly rounded fmaf). Grid-stride loop, one element
// per thread-iteration; a 7B model's 6.7e9 values take milliseconds, so it is never worth more.
#include "common.cuh"

// out[i] = fma(u_i, hi - lo, lo) with u_i = (mix64(key ^ i) >> 40)·2⁻²⁴; key = mix64(seed) (host).
template <typename T>
__device__ void fill_uniform_v1(T* __restrict__ out, unsigned long long key, float lo, float hi, long long len) {
    const float span = hi - lo;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        const unsigned long long bits = zh_mix64(key ^ (unsigned long long)i) >> 40;
        const float u = (float)bits * 5.9604644775390625e-8f;  // 2^-24
        float v = fmaf(u, span, lo);
        if (hi > lo && v >= hi) v = nextafterf(hi, lo);
        st(out, i, v);
    }
}

extern "C" __global__ void fill_uniform_v1_f32(float* out, unsigned long long key, float lo, float hi, long long len) {
    fill_uniform_v1(out, key, lo, hi, len);
}
extern "C" __global__ void fill_uniform_v1_bf16(bf16* out, unsigned long long key, float lo, float hi, long long len) {
    fill_uniform_v1(out, key, lo, hi, len);
}
extern "C" __global__ void fill_uniform_v1_f16(f16* out, unsigned long long key, float lo, float hi, long long len) {
    fill_uniform_v1(out, key, lo, hi, len);
}
