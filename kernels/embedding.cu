// Embedding lookup and its deterministic backward. CPU reference: crate::ops::embedding_forward /
// embedding_backward.
//
// The backward never uses atomics: when ids are uploaded, the host builds a CSR grouping of the
// positions by token id (unique ids ascending; per id its positions in ascending order). One block
// per unique id then sums its dout rows in that fixed order and adds the sum into the table row, so
// the result is bit-identical run to run and independent of the launch configuration.
#include "common.cuh"

// out[n,c] = table[ids[i], :]. One block per row; ids were range-checked by the caller.
template <typename T>
__device__ void embedding_forward_v1(T* __restrict__ out, const int* __restrict__ ids, const T* __restrict__ table,
                                     int n, int c) {
    const int row = blockIdx.x;
    if (row >= n) return;
    const long long src = (long long)ids[row] * c, dst = (long long)row * c;
    if ((c & 3) == 0) {
        for (int i = threadIdx.x * 4; i < c; i += blockDim.x * 4) st4(out, dst + i, ld4(table, src + i));
    } else {
        for (int i = threadIdx.x; i < c; i += blockDim.x) st(out, dst + i, ld(table, src + i));
    }
}

// dtable[v,c] += Σ_{i: ids[i] = u} dout[i, :], summed in ascending i.
// uniq[nu]: distinct ids; offsets[nu+1]: CSR row starts into positions[n].
template <typename TT, typename TD>
__device__ void embedding_backward_v1(TT* __restrict__ dtable, const TD* __restrict__ dout,
                                      const int* __restrict__ uniq, const int* __restrict__ offsets,
                                      const int* __restrict__ positions, int c) {
    const int u = blockIdx.x;
    const long long dst = (long long)uniq[u] * c;
    const int begin = offsets[u], end = offsets[u + 1];
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        float s = 0.0f;
        for (int k = begin; k < end; k++) s += ld(dout, (long long)positions[k] * c + ch);
        st(dtable, dst + ch, ld(dtable, dst + ch) + s);
    }
}

// Backward: dtable fp32 (the gradient accumulator), dout of the storage type (bf16/f16: the
// mixed-precision paths).
#define EMBEDDING_INSTANCES(T, SUF)                                                                       \
    extern "C" __global__ void embedding_forward_v1_##SUF(T* out, const int* ids, const T* table, int n,    \
                                                          int c) {                                         \
        embedding_forward_v1(out, ids, table, n, c);                                                      \
    }                                                                                                     \
    extern "C" __global__ void embedding_backward_v1_##SUF(float* dtable, const T* dout, const int* uniq,   \
                                                           const int* offsets, const int* positions, int c) { \
        embedding_backward_v1(dtable, dout, uniq, offsets, positions, c);                                 \
    }
EMBEDDING_INSTANCES(bf16, bf16)
EMBEDDING_INSTANCES(f16, f16)
EMBEDDING_INSTANCES(float, f32)
