// Fused AdamW over a flat range (torch.optim.AdamW semantics: decoupled weight decay, bias
// correction), optionally writing a 16-bit copy (bf16, or f16 in the `_cf16` instances) of the updated
// fp32 master weights in the same pass.
// CPU reference: crate::ops::adamw_step, whose f32 arithmetic this mirrors step by step (the launcher
// computes the scalar coefficients in f64 on the host exactly as that function does):
//   p *= decay (= 1 − lr·wd);  m = lerp(m, g, 1−β1);  v = v·β2 + (1−β2)·g·g;
//   p += neg_step_size · m / (sqrt(v) / sqrt(bc2) + eps),   neg_step_size = −lr / (1 − β1^step).
#include "common.cuh"

template <typename TP, typename TG, typename TC>
__device__ void adamw_step_v1(TP* __restrict__ param, float* __restrict__ m, float* __restrict__ v,
                              const TG* __restrict__ grad, TC* __restrict__ param_copy, long long len,
                              float decay, float w1, float beta2, float w2, float eps, float neg_step_size,
                              float bc2_sqrt) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = ld(grad, i);
        float p = ld(param, i);
        p *= decay;
        float mi = m[i];
        // torch's lerp: two formulas chosen by |w| < 0.5, for accuracy.
        mi = fabsf(w1) < 0.5f ? mi + w1 * (g - mi) : g - (g - mi) * (1.0f - w1);
        const float vi = v[i] * beta2 + w2 * g * g;
        m[i] = mi;
        v[i] = vi;
        p += neg_step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        st(param, i, p);
        if (param_copy) st(param_copy, i, p);
    }
}

// Names: adamw_step_v1_<param>_<grad> with a bf16 copy; `_cf16` suffix: the copy is f16.
#define ADAMW_INSTANCE(TP, TG, TC, SUF)                                                                  \
    extern "C" __global__ void adamw_step_v1_##SUF(TP* param, float* m, float* v, const TG* grad,      \
                                                   TC* param_copy, long long len, float decay, float w1, \
                                                   float beta2, float w2, float eps, float neg_step_size, \
                                                   float bc2_sqrt) {                                   \
        adamw_step_v1(param, m, v, grad, param_copy, len, decay, w1, beta2, w2, eps, neg_step_size, bc2_sqrt); \
    }
ADAMW_INSTANCE(float, float, bf16, f32_f32)
ADAMW_INSTANCE(float, bf16, bf16, f32_bf16)
ADAMW_INSTANCE(bf16, float, bf16, bf16_f32)
ADAMW_INSTANCE(bf16, bf16, bf16, bf16_bf16)
ADAMW_INSTANCE(float, float, f16, f32_f32_cf16)
ADAMW_INSTANCE(float, f16, f16, f32_f16_cf16)
ADAMW_INSTANCE(f16, float, f16, f16_f32_cf16)
ADAMW_INSTANCE(f16, f16, f16, f16_f16_cf16)
