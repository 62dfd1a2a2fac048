// Attention of new queries over a key/value cache (generation). CPU reference:
// crate::ops::attention_cached_forward. Inference only.
//
// q[b,tq,h,d], kcache/vcache[b,tmax,hkv,d] (positions 0..past+tq valid), out[b,tq,h,d] =.
// One block per output row (b, i, head); the row's scores live in dynamic shared memory
// ((past+tq) floats, asserted ≤ 48 KiB by the launcher). Three passes: scores + block max,
// exp + block sum, then one thread per channel sums p_j · v_j. fp32 arithmetic.
#include "common.cuh"

template <typename T>
__device__ void attention_cached_forward_v1(T* __restrict__ out, const T* __restrict__ q,
                                            const T* __restrict__ kcache, const T* __restrict__ vcache, int tq,
                                            int past, int tmax, int h, int hkv, int d, float scale) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    const long long row = blockIdx.x;  // ((bi * tq) + i) * h + hi
    const int hi = (int)(row % h);
    const int i = (int)(row / h % tq);
    const int bi = (int)(row / ((long long)h * tq));
    const int kh = hi / (h / hkv);
    const int keys = past + i + 1;
    float* s = smem;
    float m = -ZH_INF;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        const long long kb = (((long long)bi * tmax + j) * hkv + kh) * d;
        float acc = 0.0f;
        for (int c = 0; c < d; ++c) acc += ld(q, row * d + c) * ld(kcache, kb + c);
        s[j] = acc * scale;
        m = fmaxf(m, s[j]);
    }
    m = block_max(m, scratch);
    float l = 0.0f;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        s[j] = expf(s[j] - m);
        l += s[j];
    }
    l = block_sum(l, scratch);  // syncs, so every score is visible below
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < keys; ++j) acc += s[j] * ld(vcache, (((long long)bi * tmax + j) * hkv + kh) * d + c);
        st(out, row * d + c, acc / l);
    }
}

#define ATTN_CACHED_INSTANCES(T, SUF)                                                                     \
    extern "C" __global__ void attention_cached_forward_v1_##SUF(T* out, const T* q, const T* kcache,       \
                                                                 const T* vcache, int tq, int past,        \
                                                                 int tmax, int h, int hkv, int d,          \
                                                                 float scale) {                            \
        attention_cached_forward_v1<T>(out, q, kcache, vcache, tq, past, tmax, h, hkv, d, scale);         \
    }
ATTN_CACHED_INSTANCES(bf16, bf16)
ATTN_CACHED_INSTANCES(f16, f16)
ATTN_CACHED_INSTANCES(float, f32)
