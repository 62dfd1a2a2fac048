// SwiGLU: out = silu(gate) · up, silu(g) = g·σ(g); forward and backward fused, elementwise.
// CPU reference: crate::ops::swiglu_forward / swiglu_backward. fp32 math, 4 elements per thread
// (the launcher asserts len % 4 == 0 and 16-byte aligned views; otherwise it uses the _x1 kernels).
#include "common.cuh"

__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

// out[len] =.
template <typename T>
__device__ void swiglu_forward_v1(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up,
                                  long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x * 4;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < len; i += stride) {
        f4 g = ld4(gate, i), u = ld4(up, i);
        f4 o = {g.x * sigmoidf_(g.x) * u.x, g.y * sigmoidf_(g.y) * u.y, g.z * sigmoidf_(g.z) * u.z,
                g.w * sigmoidf_(g.w) * u.w};
        st4(out, i, o);
    }
}

__device__ __forceinline__ void swiglu_grad1(float d, float g, float u, float& dg, float& du) {
    const float s = sigmoidf_(g);
    du = d * g * s;
    dg = d * u * s * (1.0f + g * (1.0f - s));
}

// dgate =, dup =.
template <typename T>
__device__ void swiglu_backward_v1(T* __restrict__ dgate, T* __restrict__ dup, const T* __restrict__ dout,
                                   const T* __restrict__ gate, const T* __restrict__ up, long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x * 4;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < len; i += stride) {
        f4 d = ld4(dout, i), g = ld4(gate, i), u = ld4(up, i);
        f4 dg, du;
        swiglu_grad1(d.x, g.x, u.x, dg.x, du.x);
        swiglu_grad1(d.y, g.y, u.y, dg.y, du.y);
        swiglu_grad1(d.z, g.z, u.z, dg.z, du.z);
        swiglu_grad1(d.w, g.w, u.w, dg.w, du.w);
        st4(dgate, i, dg);
        st4(dup, i, du);
    }
}

// Scalar versions for lengths that are not a multiple of 4.
template <typename T>
__device__ void swiglu_forward_x1(T* out, const T* gate, const T* up, long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const float g = ld(gate, i);
        st(out, i, g * sigmoidf_(g) * ld(up, i));
    }
}
template <typename T>
__device__ void swiglu_backward_x1(T* dgate, T* dup, const T* dout, const T* gate, const T* up, long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        float dg, du;
        swiglu_grad1(ld(dout, i), ld(gate, i), ld(up, i), dg, du);
        st(dgate, i, dg);
        st(dup, i, du);
    }
}

#define SWIGLU_INSTANCES(T, SUF)                                                                          \
    extern "C" __global__ void swiglu_forward_v1_##SUF(T* out, const T* gate, const T* up, long long len) { \
        swiglu_forward_v1<T>(out, gate, up, len);                                                         \
    }                                                                                                     \
    extern "C" __global__ void swiglu_backward_v1_##SUF(T* dgate, T* dup, const T* dout, const T* gate,   \
                                                        const T* up, long long len) {                     \
        swiglu_backward_v1<T>(dgate, dup, dout, gate, up, len);                                           \
    }                                                                                                     \
    extern "C" __global__ void swiglu_forward_x1_##SUF(T* out, const T* gate, const T* up, long long len) { \
        swiglu_forward_x1<T>(out, gate, up, len);                                                         \
    }                                                                                                     \
    extern "C" __global__ void swiglu_backward_x1_##SUF(T* dgate, T* dup, const T* dout, const T* gate,   \
                                                        const T* up, long long len) {                     \
        swiglu_backward_x1<T>(dgate, dup, dout, gate, up, len);                                           \
    }
SWIGLU_INSTANCES(bf16, bf16)
SWIGLU_INSTANCES(f16, f16)
SWIGLU_INSTANCES(float, f32)
