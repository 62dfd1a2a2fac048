// libcublas.so.13 of the CUDA stand-in (test-only): cublasGemmEx computed on the CPU, queued on the
// handle's stream like any device work, with cuBLAS's column-major layout, leading dimensions and
// operand types (CUDA_R_16BF / CUDA_R_16F / CUDA_R_32F storage, CUBLAS_COMPUTE_32F: products summed
// in fp32, one rounding to the output type). Every operand's extent (from m, n, k, the ops and the
// leading dimensions) must lie inside its allocation, so a wrong stride or a swapped operand gives a
// fault or wrong numbers, never a silent pass. Other entry points: "not supported" (stubs_cublas.c).
#include "fake.h"
#include "half_conv.h"
#include <cstdio>
#include <memory>
#include <vector>

#define API extern "C" __attribute__((visibility("default")))
enum { OK = 0, NOT_INIT = 1, INVALID = 7, UNSUPPORTED = 15 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14, COMPUTE_32F = 68 };

struct Handle {
    CUstream stream = nullptr;
};
#define FORCED(name)                                                                                     \
    do {                                                                                                 \
        if (fake_forced_unsupported(name)) {                                                             \
            fake_note_unsupported(name);                                                                 \
            return UNSUPPORTED;                                                                          \
        }                                                                                                \
    } while (0)

API int cublasCreate_v2(Handle** h) {
    FORCED("cublasCreate_v2");
    *h = new Handle;
    return OK;
}
API int cublasDestroy_v2(Handle* h) {
    delete h;
    return OK;
}
API int cublasSetStream_v2(Handle* h, CUstream s) {
    FORCED("cublasSetStream_v2");
    h->stream = s;
    return OK;
}
API int cublasGetStream_v2(Handle* h, CUstream* s) {
    *s = h->stream;
    return OK;
}
API int cublasSetMathMode(Handle*, int) { return OK; }
API int cublasSetWorkspace_v2(Handle*, void*, size_t) { return OK; }

static size_t esize(int t) { return t == R_32F ? 4 : 2; }
static float load(const void* p, int t, size_t i) {
    if (t == R_32F) return ((const float*)p)[i];
    uint16_t h = ((const uint16_t*)p)[i];
    return t == R_16BF ? fk_bf16_to_f32(h) : fk_f16_to_f32(h);
}
static void store(void* p, int t, size_t i, float v) {
    if (t == R_32F) ((float*)p)[i] = v;
    else ((uint16_t*)p)[i] = t == R_16BF ? fk_f32_to_bf16(v) : fk_f32_to_f16(v);
}

API int cublasGemmEx(Handle* h, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                     int atype, int lda, const void* B, int btype, int ldb, const void* beta, void* C, int ctype,
                     int ldc, int compute, int algo) {
    FORCED("cublasGemmEx");
    (void)algo;
    if (!h) return NOT_INIT;
    auto bad = [&](const char* why) {
        fprintf(stderr, "fake-cuda: cublasGemmEx(m=%d n=%d k=%d lda=%d ldb=%d ldc=%d): %s\n", m, n, k, lda, ldb,
                ldc, why);
        return INVALID;
    };
    if (compute != COMPUTE_32F) {
        fake_note_unsupported("cublasGemmEx with a compute type other than CUBLAS_COMPUTE_32F");
        return UNSUPPORTED;
    }
    for (int t : {atype, btype, ctype})
        if (t != R_32F && t != R_16F && t != R_16BF) {
            fake_note_unsupported("cublasGemmEx with a data type other than 32F/16F/16BF");
            return UNSUPPORTED;
        }
    if (atype != btype || (ctype != R_32F && ctype != atype)) return bad("unsupported type combination");
    if (transa > 1 || transb > 1 || transa < 0 || transb < 0) return bad("op must be N or T");
    if (m < 0 || n < 0 || k < 0) return bad("negative size");
    const int ra = transa ? k : m, ca = transa ? m : k;  // A as stored: ra rows, ca columns
    const int rb = transb ? n : k, cb = transb ? k : n;
    if (lda < (ra > 1 ? ra : 1)) return bad("lda < rows of A");
    if (ldb < (rb > 1 ? rb : 1)) return bad("ldb < rows of B");
    if (ldc < (m > 1 ? m : 1)) return bad("ldc < m");
    if (m == 0 || n == 0) return OK;
    const float al = *(const float*)alpha, be = *(const float*)beta;
    std::vector<FakeAccess> acc;
    if (k > 0 && al != 0.0f) {
        acc.push_back({(uint64_t)A, ((size_t)(ca - 1) * lda + ra) * esize(atype), 'r', "A"});
        acc.push_back({(uint64_t)B, ((size_t)(cb - 1) * ldb + rb) * esize(btype), 'r', "B"});
    }
    acc.push_back({(uint64_t)C, ((size_t)(n - 1) * ldc + m) * esize(ctype), 'w', "C"});
    std::function<void()> fn = [=] {
        std::vector<float> a((size_t)m * k), b((size_t)k * n);  // a[i*k+p] = op(A)(i,p), b[j*k+p] = op(B)(p,j)
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++)
                a[(size_t)i * k + p] = load(A, atype, transa ? (size_t)p + (size_t)i * lda : (size_t)i + (size_t)p * lda);
        for (int j = 0; j < n; j++)
            for (int p = 0; p < k; p++)
                b[(size_t)j * k + p] = load(B, btype, transb ? (size_t)j + (size_t)p * ldb : (size_t)p + (size_t)j * ldb);
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                float s = 0.0f;
                const float* x = &a[(size_t)i * k];
                const float* y = &b[(size_t)j * k];
                for (int p = 0; p < k; p++) s += x[p] * y[p];
                const size_t ci = (size_t)i + (size_t)j * ldc;
                // beta == 0: C is not read (cuBLAS semantics: NaN in C does not propagate)
                const float v = be == 0.0f ? al * s : al * s + be * load(C, ctype, ci);
                store(C, ctype, ci, v);
            }
    };
    fake_enqueue(h->stream, "cublasGemmEx", &acc, &fn);
    return OK;
}
