// Rotary embedding (HF rotate_half layout) in place on x[b,t,h,d], forward and backward (the
// transpose rotation). CPU reference: crate::ops::rope_forward / rope_backward. The attention
// kernels (attention.cu) apply the same rotation to q and k as they load them; both read the
// frequency table through `rope_cs` (common.cuh).
#include "common.cuh"

// sign = +1: rotate by +angle (forward); −1: by −angle (backward, the transpose).
template <typename T>
__device__ void rope_apply_v1(T* __restrict__ x, int b, int t, int h, int d, const float* inv_freq, int pos_offset,
                              float sign) {
    const int half = d / 2;
    const long long pairs = (long long)b * t * h * half;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pairs;
         p += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(p % half);
        const long long head = p / half;  // (bi·t + ti)·h + hi
        const int ti = (int)((head / h) % t);
        float c, s;
        rope_cs(pos_offset + ti, i, inv_freq, c, s);
        s *= sign;
        const long long o = head * d + i;
        const float x1 = ld(x, o), x2 = ld(x, o + half);
        st(x, o, x1 * c - x2 * s);
        st(x, o + half, x2 * c + x1 * s);
    }
}

#define ROPE_INSTANCES(T, SUF)                                                                            \
    extern "C" __global__ void rope_forward_v1_##SUF(T* x, int b, int t, int h, int d, const float* inv_freq,         \
                                                     int pos_offset) {                                     \
        rope_apply_v1(x, b, t, h, d, inv_freq, pos_offset, 1.0f);                                            \
    }                                                                                                     \
    extern "C" __global__ void rope_backward_v1_##SUF(T* x, int b, int t, int h, int d, const float* inv_freq,        \
                                                      int pos_offset) {                                    \
        rope_apply_v1(x, b, t, h, d, inv_freq, pos_offset, -1.0f);                                           \
    }
ROPE_INSTANCES(bf16, bf16)
ROPE_INSTANCES(f16, f16)
ROPE_INSTANCES(float, f32)
