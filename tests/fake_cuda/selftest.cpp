// Self-test of the CUDA stand-in: each check runs in a forked child and must end as stated (a clean
// result, or a FAULT line naming the defect and exit 97). Built and run by tests/fake_cuda_e2e.rs:
//   g++ -std=c++20 selftest.cpp -L LIB -l:libcuda.so.1 -l:libcublas.so.13 -o selftest && ./selftest
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

typedef unsigned long long P;
typedef void* S;
extern "C" {
int cuInit(unsigned);
int cuDevicePrimaryCtxRetain(void**, int);
int cuCtxSetCurrent(void*);
int cuMemAlloc_v2(P*, size_t);
int cuMemFree_v2(P);
int cuStreamCreate(S*, unsigned);
int cuStreamSynchronize(S);
int cuEventCreate(void**, unsigned);
int cuEventRecord(void*, S);
int cuStreamWaitEvent(S, void*, unsigned);
int cuMemsetD8Async(P, unsigned char, size_t, S);
int cuMemcpyHtoDAsync_v2(P, const void*, size_t, S);
int cuMemcpyDtoHAsync_v2(void*, P, size_t, S);
int cuMemcpyDtoDAsync_v2(P, P, size_t, S);
int cuModuleLoadData(void**, const void*);
int cuModuleGetFunction(void**, void*, const char*);
int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, S, void**, void**);
int cuMemAllocManaged(P*, size_t, unsigned);
int cublasCreate_v2(void**);
int cublasSetStream_v2(void*, S);
int cublasGemmEx(void*, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int,
                 const void*, void*, int, int, int, int);
int cublasSgemm_v2(void*, int, int, int, int, int, const float*, const float*, int, const float*, int,
                   const float*, float*, int);
}

static int failures = 0;
// Run `f` in a child; expect exit code `code` and, if given, `needle` in its stderr.
static void expect(const char* what, int code, const char* needle, std::function<void()> f) {
    int pipefd[2];
    if (pipe(pipefd) != 0) abort();
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], 2);
        close(pipefd[0]);
        cuInit(0);
        void* ctx;
        cuDevicePrimaryCtxRetain(&ctx, 0);
        cuCtxSetCurrent(ctx);
        f();
        fflush(stderr);
        _exit(0);
    }
    close(pipefd[1]);
    std::string err;
    char buf[4096];
    ssize_t n;
    while ((n = read(pipefd[0], buf, sizeof buf)) > 0) err.append(buf, n);
    close(pipefd[0]);
    int st;
    waitpid(pid, &st, 0);
    const int got = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    const bool ok = got == code && (!needle || err.find(needle) != std::string::npos);
    printf("%-60s %s (exit %d)\n", what, ok ? "ok" : "FAIL", got);
    if (!ok) {
        printf("  stderr: %s\n", err.c_str());
        failures++;
    }
}
#define CHECK(x)                                                                                         \
    do {                                                                                                 \
        if (!(x)) {                                                                                      \
            fprintf(stderr, "check failed: %s\n", #x);                                                   \
            _exit(1);                                                                                    \
        }                                                                                                \
    } while (0)

static const char* PTX = ".version 8.0\n.target sm_90\n.visible .entry scale_v1_f32(\n)\n";

static void launch_scale(P buf, float alpha, long long len, S s) {
    void* mod;
    void* fn;
    CHECK(cuModuleLoadData(&mod, PTX) == 0);
    CHECK(cuModuleGetFunction(&fn, mod, "scale_v1_f32") == 0);
    void* args[] = {&buf, &alpha, &len};
    CHECK(cuLaunchKernel(fn, 1, 1, 1, 128, 1, 1, 0, s, args, nullptr) == 0);
}

int main() {
    expect("ordered streams (event wait): copy sees the memset", 0, nullptr, [] {
        S a, b;
        P x, y;
        CHECK(cuStreamCreate(&a, 0) == 0 && cuStreamCreate(&b, 0) == 0);
        CHECK(cuMemAlloc_v2(&x, 1000) == 0 && cuMemAlloc_v2(&y, 1000) == 0);
        cuMemsetD8Async(x, 7, 1000, a);
        void* e;
        cuEventCreate(&e, 0);
        cuEventRecord(e, a);
        cuStreamWaitEvent(b, e, 0);
        cuMemcpyDtoDAsync_v2(y, x, 1000, b);
        unsigned char h[1000];
        cuMemcpyDtoHAsync_v2(h, y, 1000, b);
        for (int i = 0; i < 1000; i++) CHECK(h[i] == 7);
    });
    expect("missing event wait: read of a pending write is a race", 97, "race: cuMemcpyDtoDAsync", [] {
        S a, b;
        P x, y;
        cuStreamCreate(&a, 0);
        cuStreamCreate(&b, 0);
        cuMemAlloc_v2(&x, 1000);
        cuMemAlloc_v2(&y, 1000);
        cuMemsetD8Async(x, 7, 1000, a);
        cuMemcpyDtoDAsync_v2(y, x, 1000, b);
    });
    expect("host synchronisation orders the streams", 0, nullptr, [] {
        S a, b;
        P x, y;
        cuStreamCreate(&a, 0);
        cuStreamCreate(&b, 0);
        cuMemAlloc_v2(&x, 1000);
        cuMemAlloc_v2(&y, 1000);
        cuMemsetD8Async(x, 7, 1000, a);
        cuStreamSynchronize(a);
        cuMemcpyDtoDAsync_v2(y, x, 1000, b);
        cuStreamSynchronize(b);
    });
    expect("write while another stream still reads is a race", 97, "still reads", [] {
        S a, b;
        P x, y;
        cuStreamCreate(&a, 0);
        cuStreamCreate(&b, 0);
        cuMemAlloc_v2(&x, 1000);
        cuMemAlloc_v2(&y, 1000);
        cuStreamSynchronize(nullptr);
        cuMemcpyDtoDAsync_v2(y, x, 1000, a);
        cuMemsetD8Async(x, 0, 1000, b);
    });
    expect("copy past the end of an allocation", 97, "runs past the end of allocation", [] {
        P x;
        cuMemAlloc_v2(&x, 1000);
        std::vector<char> h(1001);
        cuMemcpyHtoDAsync_v2(x, h.data(), 1001, nullptr);
    });
    expect("kernel: in bounds, right values", 0, nullptr, [] {
        P x;
        cuMemAlloc_v2(&x, 400);
        std::vector<float> h(100);
        for (int i = 0; i < 100; i++) h[i] = (float)i;
        cuMemcpyHtoDAsync_v2(x, h.data(), 400, nullptr);
        launch_scale(x, 2.0f, 100, nullptr);
        cuMemcpyDtoHAsync_v2(h.data(), x, 400, nullptr);
        for (int i = 0; i < 100; i++) CHECK(h[i] == 2.0f * (float)i);
    });
    expect("kernel writing one element past the end (canary)", 97, "scale_v1_f32 wrote past the end", [] {
        P x;
        cuMemAlloc_v2(&x, 400);
        cuMemsetD8Async(x, 0, 400, nullptr);
        launch_scale(x, 2.0f, 101, nullptr);
        cuStreamSynchronize(nullptr);
    });
    expect("kernel writing far past the end (guard page)", 97, "scale_v1_f32: invalid device memory", [] {
        P x;
        cuMemAlloc_v2(&x, 4096);
        cuMemsetD8Async(x, 0, 4096, nullptr);
        launch_scale(x, 2.0f, 4096, nullptr);
        cuStreamSynchronize(nullptr);
    });
    expect("kernel on freed memory", 97, "not device memory (or was freed)", [] {
        P x;
        cuMemAlloc_v2(&x, 400);
        cuMemFree_v2(x);
        launch_scale(x, 2.0f, 100, nullptr);
    });
    expect("unused entry point: not supported, named", 0, "cuMemAllocManaged is not supported", [] {
        P x;
        CHECK(cuMemAllocManaged(&x, 16, 1) == 801);
    });
    expect("unused cuBLAS entry point: not supported, named", 0, "cublasSgemm_v2 is not supported", [] {
        void* h;
        cublasCreate_v2(&h);
        float a = 1;
        CHECK(cublasSgemm_v2(h, 0, 0, 1, 1, 1, &a, &a, 1, &a, 1, &a, &a, 1) == 15);
    });
    // C(2x3) = op(A)·op(B), column-major, A = [[1,2],[3,4]] stored transposed, B(2x3) as stored.
    expect("cublasGemmEx: column-major with op(A) = T, fp32", 0, nullptr, [] {
        void* h;
        cublasCreate_v2(&h);
        P a, b, c;
        cuMemAlloc_v2(&a, 16);
        cuMemAlloc_v2(&b, 24);
        cuMemAlloc_v2(&c, 24);
        const float ha[4] = {1, 2, 3, 4};  // column-major 2x2 [[1,3],[2,4]]; op T gives [[1,2],[3,4]]
        const float hb[6] = {1, 0, 0, 1, 1, 1};  // [[1,0,1],[0,1,1]]
        cuMemcpyHtoDAsync_v2(a, ha, 16, nullptr);
        cuMemcpyHtoDAsync_v2(b, hb, 24, nullptr);
        const float one = 1, zero = 0;
        CHECK(cublasGemmEx(h, 1, 0, 2, 3, 2, &one, (void*)a, 0, 2, (void*)b, 0, 2, &zero, (void*)c, 0, 2, 68, -1) == 0);
        float hc[6];
        cuMemcpyDtoHAsync_v2(hc, c, 24, nullptr);
        const float want[6] = {1, 3, 2, 4, 3, 7};  // [[1,2,3],[3,4,7]] column-major
        for (int i = 0; i < 6; i++) CHECK(hc[i] == want[i]);
    });
    expect("cublasGemmEx: lda too small for op(A) is rejected", 0, "lda < rows of A", [] {
        void* h;
        cublasCreate_v2(&h);
        P a;
        cuMemAlloc_v2(&a, 64);
        const float one = 1, zero = 0;
        CHECK(cublasGemmEx(h, 0, 0, 4, 1, 1, &one, (void*)a, 0, 2, (void*)a, 0, 1, &zero, (void*)a, 0, 4, 68, -1) == 7);
    });
    expect("cublasGemmEx: operand extent past its allocation", 97, "B [", [] {
        void* h;
        cublasCreate_v2(&h);
        P a, b, c;
        cuMemAlloc_v2(&a, 16);
        cuMemAlloc_v2(&b, 16);  // needs 2x3 floats = 24 bytes
        cuMemAlloc_v2(&c, 24);
        const float one = 1, zero = 0;
        cublasGemmEx(h, 0, 0, 2, 3, 2, &one, (void*)a, 0, 2, (void*)b, 0, 2, &zero, (void*)c, 0, 2, 68, -1);
    });
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
