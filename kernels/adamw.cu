// Fused AdamW over a flat range (torch.optim.AdamW semantics: decoupled weight decay, bias
// correction), optionally writing a bf16 copy of the updated fp32 master weights in the same pass.
// CPU reference: crate::ops::adamw_step. The launcher computes the bias corrections on the host.
//   p -= lr·wd·p;  m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;
//   p -= (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 − β_i^step.
#include "common.cuh"

template <typename TP, typename TG>
__device__ void adamw_step_v1(TP* __restrict__ param, float* __restrict__ m, float* __restrict__ v,
                              const TG* __restrict__ grad, bf16* __restrict__ param_bf16, long long len,
                              float lr, float beta1, float beta2, float eps, float weight_decay,
                              float step_size, float inv_sqrt_bc2) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = ld(grad, i);
        float p = ld(param, i);
        p -= lr * weight_decay * p;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        p -= step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
        st(param, i, p);
        if (param_bf16) param_bf16[i] = __float2bfloat16_rn(p);
    }
}

#define ADAMW_INSTANCE(TP, TG, SUF)                                                                      \
    extern "C" __global__ void adamw_step_v1_##SUF(TP* param, float* m, float* v, const TG* grad,      \
                                                   bf16* param_bf16, long long len, float lr, float beta1, \
                                                   float beta2, float eps, float weight_decay,         \
                                                   float step_size, float inv_sqrt_bc2) {              \
        adamw_step_v1(param, m, v, grad, param_bf16, len, lr, beta1, beta2, eps, weight_decay, step_size, \
                      inv_sqrt_bc2);                                                                   \
    }
ADAMW_INSTANCE(float, float, f32_f32)
ADAMW_INSTANCE(float, bf16, f32_bf16)
ADAMW_INSTANCE(bf16, float, bf16_f32)
ADAMW_INSTANCE(bf16, bf16, bf16_bf16)
