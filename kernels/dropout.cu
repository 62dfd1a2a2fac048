// Dropout in place by a stateless mask: out[i] = u(key, i) >= p ? out[i]·keep_scale : 0, with
// u(key, i) = top 24 bits of mix64(key ^ i) / 2^24 (SplitMix64's finaliser, 64-bit integer math on
// the device) and keep_scale = 1/(1−p) computed on the host in fp32. CPU reference:
// crate::ops::dropout (the mask is integer logic, so f32 results are bit-identical; bf16 rounds the
// same fp32 product once, as the host round-trip did). The per-tensor key (step key mixed with layer
// and projection) is made on the host by crate::model::lora::dropout_key.
#include "common.cuh"

// out[len] *= mask·keep_scale (in place). Grid-stride, one element per thread-iteration: the hash
// (three 64-bit multiplies) costs about as much as the 4–8 bytes of traffic per element.
template <typename T>
__device__ void dropout_v1(T* out, long long len, unsigned long long key, float p, float keep_scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const float u = (float)(zh_mix64(key ^ (unsigned long long)i) >> 40) * (1.0f / 16777216.0f);
        st(out, i, u >= p ? ld(out, i) * keep_scale : 0.0f);
    }
}

#define DROPOUT_INSTANCE(T, SUF)                                                                          \
    extern "C" __global__ void dropout_v1_##SUF(T* out, long long len, unsigned long long key, float p,  \
                                                float keep_scale) {                                      \
        dropout_v1<T>(out, len, key, p, keep_scale);                                                      \
    }
DROPOUT_INSTANCE(bf16, bf16)
DROPOUT_INSTANCE(f16, f16)
DROPOUT_INSTANCE(float, f32)
