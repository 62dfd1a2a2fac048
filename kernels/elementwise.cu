// Casts, copies, scaling and the two-stage sum of squares (global gradient norm, NaN/Inf check).
// CPU reference: crate::ops::elementwise (copy, axpy, scale, sum_squares).
// Grid-stride loops; one scalar per thread-iteration (these are never the hot path of a step: the
// hot casts are fused into the kernels that produce or consume the data).
#include "common.cuh"

#define GRID_LOOP(i, len)                                                                       \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (len);            \
         i += (long long)gridDim.x * blockDim.x)

// out = x (with conversion).
template <typename TO, typename TI>
__device__ void copy_v1(TO* __restrict__ out, const TI* __restrict__ x, long long len) {
    GRID_LOOP(i, len) st(out, i, ld(x, i));
}
// out += alpha·x.
template <typename TO, typename TI>
__device__ void axpy_v1(TO* __restrict__ out, const TI* __restrict__ x, float alpha, long long len) {
    GRID_LOOP(i, len) st(out, i, ld(out, i) + alpha * ld(x, i));
}
// out *= alpha.
template <typename T>
__device__ void scale_v1(T* out, float alpha, long long len) {
    GRID_LOOP(i, len) st(out, i, ld(out, i) * alpha);
}

// partial[blockIdx.x] = Σ x² (SQ) or Σ x over this block's grid-stride elements (summed in fp32
// per thread, fp64 across threads). Stage 2 (sum_squares_finish) sums the partials in a fixed order,
// so the result is deterministic for a given grid size. CPU reference: ops::sum_squares / ops::sum.
template <bool SQ, typename T>
__device__ void reduce_partial_v1(double* __restrict__ partial, const T* __restrict__ x, long long len) {
    __shared__ double scratch[32];
    float acc = 0.0f;
    GRID_LOOP(i, len) {
        const float v = ld(x, i);
        acc += SQ ? v * v : v;
    }
    double d = warp_sum_d((double)acc);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) scratch[warp] = d;
    __syncthreads();
    if (warp == 0) {
        d = lane < (int)(blockDim.x / 32) ? scratch[lane] : 0.0;
        d = warp_sum_d(d);
        if (lane == 0) partial[blockIdx.x] = d;
    }
}

// out[0] = Σ partial[0..nparts] (one block of 32 threads; fixed order).
extern "C" __global__ void sum_squares_finish_v1_f64(double* out, const double* partial, int nparts) {
    double d = 0.0;
    for (int i = threadIdx.x; i < nparts; i += 32) d += partial[i];
    d = warp_sum_d(d);
    if (threadIdx.x == 0) out[0] = d;
}

#define CAST_INSTANCES(TO, TI, SUF)                                                                       \
    extern "C" __global__ void copy_v1_##SUF(TO* out, const TI* x, long long len) { copy_v1(out, x, len); } \
    extern "C" __global__ void axpy_v1_##SUF(TO* out, const TI* x, float alpha, long long len) {          \
        axpy_v1(out, x, alpha, len);                                                                      \
    }
CAST_INSTANCES(bf16, bf16, bf16_bf16)
CAST_INSTANCES(bf16, float, bf16_f32)
CAST_INSTANCES(float, bf16, f32_bf16)
CAST_INSTANCES(float, float, f32_f32)
CAST_INSTANCES(f16, f16, f16_f16)
CAST_INSTANCES(f16, float, f16_f32)
CAST_INSTANCES(float, f16, f32_f16)
// Between the two 16-bit formats (through fp32: bf16 → f32 is exact, so one rounding to the target).
CAST_INSTANCES(bf16, f16, bf16_f16)
CAST_INSTANCES(f16, bf16, f16_bf16)

extern "C" __global__ void scale_v1_bf16(bf16* out, float alpha, long long len) { scale_v1(out, alpha, len); }
extern "C" __global__ void scale_v1_f32(float* out, float alpha, long long len) { scale_v1(out, alpha, len); }
extern "C" __global__ void scale_v1_f16(f16* out, float alpha, long long len) { scale_v1(out, alpha, len); }
extern "C" __global__ void sum_squares_partial_v1_f16(double* partial, const f16* x, long long len) {
    reduce_partial_v1<true>(partial, x, len);
}
extern "C" __global__ void sum_squares_partial_v1_bf16(double* partial, const bf16* x, long long len) {
    reduce_partial_v1<true>(partial, x, len);
}
extern "C" __global__ void sum_squares_partial_v1_f32(double* partial, const float* x, long long len) {
    reduce_partial_v1<true>(partial, x, len);
}
extern "C" __global__ void sum_partial_v1_f32(double* partial, const float* x, long long len) {
    reduce_partial_v1<false>(partial, x, len);
}
extern "C" __global__ void sum_partial_v1_bf16(double* partial, const bf16* x, long long len) {
    reduce_partial_v1<false>(partial, x, len);
}
extern "C" __global__ void sum_partial_v1_f16(double* partial, const f16* x, long long len) {
    reduce_partial_v1<false>(partial, x, len);
}
