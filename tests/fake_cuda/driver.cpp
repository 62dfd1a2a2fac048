// libcuda.so.1 of the CUDA stand-in (test-only): the driver entry points the CUDA backend uses, with
// device memory in host memory and kernels run by the host-compiled emulation (fiber_emu.h).
//
// - Memory: each allocation sits between two PROT_NONE pages, right-aligned to 256 bytes; the slack
//   between the requested size and the 256-byte boundary, and the gap before it, hold a canary that
//   is checked after every operation touching the allocation and at free. Freed memory is kept
//   PROT_NONE (quarantine), so a use after free faults.
// - Streams: a worker thread per stream runs its queue in order, asynchronously to the host. Every
//   operation declares the ranges it reads and writes (kernels: a `const T*` argument is read, a
//   `T*` argument read and written, each from the pointer to the end of its allocation); at enqueue
//   time each range is checked against the accesses of other streams that are not ordered before it
//   by an event wait or a host synchronisation (vector clocks). An unordered conflict is a race:
//   reported, and the process stops.
// - Modules: cuModuleLoadData takes the cubin (ELF) or PTX that NVRTC produced, lists its kernels,
//   and binds each name to the same kernel compiled by g++ (libfakecuda_kernels.so, built by
//   tools/fake-cuda.sh next to this library).
// - Every other entry point returns CUDA_ERROR_NOT_SUPPORTED and says so (stubs_cuda.c).
#include "fake.h"
#include "kernel_table.h"
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <dlfcn.h>
#include <elf.h>
#include <map>
#include <memory>
#include <mutex>
#include <regex>
#include <set>
#include <signal.h>
#include <sys/mman.h>
#include <thread>
#include <unistd.h>

struct dim3u {
    unsigned x = 0, y = 0, z = 0;
};
// From libfakecuda_kernels.so (fiber_emu.h's emu_run_grid, exported by kernels.cpp's wrapper).
typedef void (*RunGridFn)(const char*, dim3u, dim3u, void*, void (*)(void*), void*);

enum : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NOT_READY = 600,
    LAUNCH_OUT_OF_RESOURCES = 701,
    NOT_SUPPORTED = 801,
};

static const int DEVICES = 8;
static const uint64_t TOTAL_MEM = 80ull << 30;
static const unsigned char CANARY = 0xCD;

void fake_fault(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[2048];
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fake-cuda: FAULT: %s\n", buf);
    fflush(stderr);
    _exit(97);
}

extern "C" int fake_forced_unsupported(const char* name) {
    const char* e = getenv("FAKE_CUDA_UNSUPPORTED");
    if (!e) return 0;
    std::string s = std::string(",") + e + ",";
    return s.find(std::string(",") + name + ",") != std::string::npos;
}
extern "C" void fake_note_unsupported(const char* name) {
    fprintf(stderr, "fake-cuda: %s is not supported by the CUDA stand-in (tests/fake_cuda)\n", name);
    fflush(stderr);
}
#define FORCED(name)                                                                                     \
    do {                                                                                                 \
        if (fake_forced_unsupported(name)) {                                                             \
            fake_note_unsupported(name);                                                                 \
            return NOT_SUPPORTED;                                                                        \
        }                                                                                                \
    } while (0)

// ---- allocations -----------------------------------------------------------------------------------
struct Alloc {
    uint64_t base, size, user_len;
    char* map;
    size_t map_len;
    unsigned id;
    std::map<int, uint64_t> lastw, lastr;  // stream id -> seq of its last write / read
    std::string lastw_op;
};
static std::mutex g;  // allocations, streams' clocks, events, modules
static std::map<uint64_t, Alloc> allocs;  // by base
static std::vector<std::pair<uint64_t, uint64_t>> quarantine;  // freed [lo, hi)
static uint64_t allocated = 0;
static unsigned next_alloc_id = 1;

static Alloc* find_alloc(uint64_t p) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return nullptr;
    --it;
    Alloc& a = it->second;
    return p < a.base + a.user_len ? &a : nullptr;
}
static void check_canary(const Alloc& a, const char* op) {
    const unsigned char* lo = (const unsigned char*)a.map + 4096;
    for (const unsigned char* q = lo; q < (const unsigned char*)a.base; q++)
        if (*q != CANARY)
            fake_fault("%s wrote %lld bytes before the start of allocation #%u (%llu bytes)", op,
                       (long long)((const unsigned char*)a.base - q), a.id, (unsigned long long)a.size);
    for (uint64_t o = a.size; o < a.user_len; o++)
        if (((const unsigned char*)a.base)[o] != CANARY)
            fake_fault("%s wrote past the end of allocation #%u (%llu bytes): byte %llu", op, a.id,
                       (unsigned long long)a.size, (unsigned long long)o);
}

// ---- streams and the race check --------------------------------------------------------------------
struct FakeEvent {
    int stream = -1;
    uint64_t seq = 0;
    std::map<int, uint64_t> vc;
    std::atomic<bool> done{false};
    double t_ms = 0;
};
struct Op {
    std::function<void()> fn;
    uint64_t seq;
    bool wait_only = false;  // a cross-stream wait: runs without holding `exec`
};
struct FakeStream {
    int id;
    std::mutex m;
    std::condition_variable cv;
    std::deque<Op> q;
    uint64_t enq = 0;                 // under g
    std::atomic<uint64_t> done{0};
    std::map<int, uint64_t> vc;       // under g: seqs of other streams ordered before new work
    bool stop = false;
    std::thread th;
};
static std::map<int, uint64_t> host_clock;  // under g: seqs known complete by the host
static std::vector<FakeStream*> streams;    // under g
static std::mutex exec;                     // one operation runs at a time
static FakeStream* default_stream = nullptr;

static double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

static void worker(FakeStream* s) {
    for (;;) {
        Op op;
        {
            std::unique_lock<std::mutex> l(s->m);
            s->cv.wait(l, [&] { return s->stop || !s->q.empty(); });
            if (s->q.empty()) return;
            op = std::move(s->q.front());
        }
        if (op.wait_only) {
            op.fn();
        } else {
            std::lock_guard<std::mutex> l(exec);
            op.fn();
        }
        {
            std::lock_guard<std::mutex> l(s->m);
            s->q.pop_front();
            s->done = op.seq;
        }
        s->cv.notify_all();
    }
}
static FakeStream* new_stream() {
    FakeStream* s = new FakeStream;
    std::lock_guard<std::mutex> l(g);
    s->id = (int)streams.size();
    streams.push_back(s);
    s->th = std::thread(worker, s);
    return s;
}
static FakeStream* resolve(CUstream s) {
    if (s) return s;
    if (!default_stream) default_stream = new_stream();
    return default_stream;
}
static uint64_t known(FakeStream* t, int s) {
    uint64_t a = 0, b = 0;
    auto i = t->vc.find(s);
    if (i != t->vc.end()) a = i->second;
    auto j = host_clock.find(s);
    if (j != host_clock.end()) b = j->second;
    return std::max(a, b);
}

static void wait_stream(FakeStream* s, uint64_t upto) {
    std::unique_lock<std::mutex> l(s->m);
    s->cv.wait(l, [&] { return s->done >= upto; });
}
extern "C" void fake_stream_sync(CUstream cs) {
    std::vector<std::pair<FakeStream*, uint64_t>> todo;
    {
        std::lock_guard<std::mutex> l(g);
        if (cs) {
            todo.push_back({cs, cs->enq});
        } else {
            for (FakeStream* s : streams) todo.push_back({s, s->enq});
        }
    }
    for (auto& [s, upto] : todo) wait_stream(s, upto);
    std::lock_guard<std::mutex> l(g);
    for (auto& [s, upto] : todo) host_clock[s->id] = std::max(host_clock[s->id], upto);
}

static thread_local const char* current_op = nullptr;

extern "C" void fake_enqueue(CUstream cs, const char* op, const std::vector<FakeAccess>* acc,
                             std::function<void()>* fn) {
    const bool legacy = cs == nullptr;
    if (legacy) fake_stream_sync(nullptr);  // the legacy default stream waits for every stream
    FakeStream* s = resolve(cs);
    std::vector<uint64_t> touched;
    uint64_t seq;
    std::unique_lock<std::mutex> lg(g);
    {
        seq = s->enq + 1;
        for (const FakeAccess& a : acc ? *acc : std::vector<FakeAccess>{}) {
            if (a.bytes == 0) continue;
            Alloc* al = find_alloc(a.ptr);
            if (!al)
                fake_fault("%s: %s = 0x%llx is not device memory (or was freed)", op, a.what.c_str(),
                           (unsigned long long)a.ptr);
            if (a.ptr + a.bytes > al->base + al->size)
                fake_fault("%s: %s [0x%llx, +%llu) runs past the end of allocation #%u (%llu bytes) by %llu "
                           "bytes",
                           op, a.what.c_str(), (unsigned long long)a.ptr, (unsigned long long)a.bytes, al->id,
                           (unsigned long long)al->size,
                           (unsigned long long)(a.ptr + a.bytes - al->base - al->size));
            for (auto& [sid, w] : al->lastw)
                if (sid != s->id && w > known(s, sid))
                    fake_fault("race: %s on stream %d %s allocation #%u (%s) while %s queued on stream %d "
                               "writes it, with no event wait or synchronisation in between",
                               op, s->id, a.mode == 'w' ? "writes" : "reads", al->id, a.what.c_str(),
                               al->lastw_op.c_str(), sid);
            if (a.mode == 'w')
                for (auto& [sid, r] : al->lastr)
                    if (sid != s->id && r > known(s, sid))
                        fake_fault("race: %s on stream %d writes allocation #%u (%s) that stream %d still "
                                   "reads, with no event wait or synchronisation in between",
                                   op, s->id, al->id, a.what.c_str(), sid);
            (a.mode == 'w' ? al->lastw : al->lastr)[s->id] = seq;
            if (a.mode == 'w') al->lastw_op = op;
            touched.push_back(al->base);
        }
        s->enq = seq;
    }
    std::string name = op;
    auto body = std::move(*fn);
    Op o{[body, touched, name] {
             current_op = name.c_str();
             body();
             current_op = nullptr;
             std::lock_guard<std::mutex> l(g);
             for (uint64_t b : touched) {
                 auto it = allocs.find(b);
                 if (it != allocs.end()) check_canary(it->second, name.c_str());
             }
         },
         seq};
    {
        std::lock_guard<std::mutex> l(s->m);
        s->q.push_back(std::move(o));
    }
    lg.unlock();
    s->cv.notify_all();
    if (legacy) fake_stream_sync(s);
}

static void enqueue(CUstream s, const char* op, std::vector<FakeAccess> acc, std::function<void()> fn) {
    fake_enqueue(s, op, &acc, &fn);
}

// ---- segfaults: name the operation -----------------------------------------------------------------
static struct sigaction prev_segv;
static void on_segv(int sig, siginfo_t* si, void* uc) {
    const char* op = current_op;
    if (op) {
        char buf[512];
        int n = snprintf(buf, sizeof buf,
                         "fake-cuda: FAULT: %s: invalid device memory access at %p (out of bounds, freed "
                         "memory, or a host pointer)\n",
                         op, si->si_addr);
        if (write(2, buf, n) < 0) {
        }
        _exit(97);
    }
    sigaction(sig, &prev_segv, nullptr);
    (void)uc;
}

// ---- kernels ----------------------------------------------------------------------------------------
static std::map<std::string, const FakeKernel*> kernel_by_name;
static RunGridFn run_grid = nullptr;
static bool initialized = false;

static int load_kernels() {
    if (run_grid) return SUCCESS;
    std::string path;
    if (const char* e = getenv("FAKE_CUDA_KERNELS")) {
        path = e;
    } else {
        Dl_info info;
        dladdr((void*)&load_kernels, &info);
        path = info.dli_fname;
        path = path.substr(0, path.rfind('/') + 1) + "libfakecuda_kernels.so";
    }
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "fake-cuda: cannot load the emulated kernels %s: %s\n", path.c_str(), dlerror());
        return NOT_INITIALIZED;
    }
    auto table = (const FakeKernel* (*)(unsigned*))dlsym(h, "fake_kernel_table");
    run_grid = (RunGridFn)dlsym(h, "fake_run_grid");
    if (!table || !run_grid) {
        fprintf(stderr, "fake-cuda: %s lacks fake_kernel_table/fake_run_grid\n", path.c_str());
        return NOT_INITIALIZED;
    }
    unsigned n = 0;
    const FakeKernel* t = table(&n);
    for (unsigned i = 0; i < n; i++) kernel_by_name[t[i].name] = &t[i];
    return SUCCESS;
}

struct FakeModule {
    std::set<std::string> names;
};
struct FakeFunction {
    const FakeKernel* k;
    int max_dyn_smem = 48 * 1024;
};

static bool elf_kernels(const unsigned char* img, std::set<std::string>& out) {
    const Elf64_Ehdr* eh = (const Elf64_Ehdr*)img;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) return false;
    const Elf64_Shdr* sh = (const Elf64_Shdr*)(img + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; i++) {
        if (sh[i].sh_type != SHT_SYMTAB) continue;
        const Elf64_Sym* sym = (const Elf64_Sym*)(img + sh[i].sh_offset);
        const char* str = (const char*)(img + sh[sh[i].sh_link].sh_offset);
        for (size_t j = 0; j < sh[i].sh_size / sizeof(Elf64_Sym); j++)
            if (ELF64_ST_TYPE(sym[j].st_info) == STT_FUNC && ELF64_ST_BIND(sym[j].st_info) == STB_GLOBAL)
                out.insert(str + sym[j].st_name);
    }
    return true;
}

// ---- the entry points --------------------------------------------------------------------------------
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
typedef void* CUcontext;
typedef FakeModule* CUmodule;
typedef FakeFunction* CUfunction;
typedef FakeEvent* CUevent;
static int primary_ctx_dummy[DEVICES];
static thread_local CUcontext current_ctx = nullptr;

#define API extern "C" __attribute__((visibility("default")))

API CUresult cuInit(unsigned) {
    FORCED("cuInit");
    std::lock_guard<std::mutex> l(g);
    if (!initialized) {
        struct sigaction sa{};
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, &prev_segv);
        initialized = true;
    }
    return SUCCESS;
}
API CUresult cuDriverGetVersion(int* v) {
    FORCED("cuDriverGetVersion");
    *v = 13000;
    return SUCCESS;
}
API CUresult cuDeviceGetCount(int* n) {
    FORCED("cuDeviceGetCount");
    *n = DEVICES;
    return SUCCESS;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    FORCED("cuDeviceGet");
    if (ordinal < 0 || ordinal >= DEVICES) return INVALID_DEVICE;
    *d = ordinal;
    return SUCCESS;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    FORCED("cuDeviceGetName");
    snprintf(name, len, "CUDA stand-in %d (host emulation, sm_90)", d);
    return SUCCESS;
}
API CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) {
    *b = TOTAL_MEM;
    return SUCCESS;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    FORCED("cuDeviceGetAttribute");
    switch (attr) {
        case 1: *v = 1024; break;          // max threads per block
        case 2: *v = 1024; break;          // max block dim x
        case 3: case 4: *v = 1024; break;
        case 5: *v = 2147483647; break;    // max grid x
        case 6: case 7: *v = 65535; break;
        case 8: *v = 48 * 1024; break;     // shared memory per block
        case 10: *v = 32; break;           // warp size
        case 16: *v = 132; break;          // multiprocessors
        case 75: *v = 9; break;            // compute capability major
        case 76: *v = 0; break;            // minor
        case 97: *v = 227 * 1024; break;   // max shared memory per block (opt-in)
        default: *v = 0;                   // memory pools, unified addressing, ...: not offered
    }
    return SUCCESS;
}
// The default memory pool: one per device. Allocation does not go through it here (cuMemAlloc is
// the backend's path); what the backend sets is its release threshold (attribute 4,
// CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, a u64), which is stored and read back.
static unsigned long long pool_release_threshold[DEVICES];
static int pool_dummy[DEVICES];
API CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice d) {
    FORCED("cuDeviceGetDefaultMemPool");
    if (d < 0 || d >= DEVICES) return INVALID_DEVICE;
    *pool = &pool_dummy[d];
    return SUCCESS;
}
static int pool_device(void* pool) {
    for (int d = 0; d < DEVICES; d++)
        if (pool == &pool_dummy[d]) return d;
    return -1;
}
API CUresult cuMemPoolSetAttribute(void* pool, int attr, void* v) {
    FORCED("cuMemPoolSetAttribute");
    const int d = pool_device(pool);
    if (d < 0 || v == nullptr) return INVALID_VALUE;
    if (attr != 4) return NOT_SUPPORTED;
    pool_release_threshold[d] = *static_cast<unsigned long long*>(v);
    return SUCCESS;
}
API CUresult cuMemPoolGetAttribute(void* pool, int attr, void* v) {
    FORCED("cuMemPoolGetAttribute");
    const int d = pool_device(pool);
    if (d < 0 || v == nullptr) return INVALID_VALUE;
    if (attr != 4) return NOT_SUPPORTED;
    *static_cast<unsigned long long*>(v) = pool_release_threshold[d];
    return SUCCESS;
}
API CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    FORCED("cuDevicePrimaryCtxRetain");
    if (d < 0 || d >= DEVICES) return INVALID_DEVICE;
    *c = &primary_ctx_dummy[d];
    return SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
API CUresult cuCtxSetCurrent(CUcontext c) {
    FORCED("cuCtxSetCurrent");
    current_ctx = c;
    return SUCCESS;
}
API CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = current_ctx;
    return SUCCESS;
}
API CUresult cuCtxPushCurrent_v2(CUcontext c) {
    current_ctx = c;
    return SUCCESS;
}
API CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = current_ctx;
    return SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    *d = current_ctx ? (int)((int*)current_ctx - primary_ctx_dummy) : 0;
    return SUCCESS;
}
API CUresult cuCtxSynchronize() {
    FORCED("cuCtxSynchronize");
    fake_stream_sync(nullptr);
    return SUCCESS;
}
API CUresult cuMemGetInfo_v2(size_t* free_, size_t* total) {
    FORCED("cuMemGetInfo_v2");
    std::lock_guard<std::mutex> l(g);
    *total = TOTAL_MEM;
    *free_ = TOTAL_MEM - std::min<uint64_t>(TOTAL_MEM, allocated);
    return SUCCESS;
}

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t size) {
    FORCED("cuMemAlloc_v2");
    if (!initialized) return NOT_INITIALIZED;
    const uint64_t user_len = (std::max<uint64_t>(size, 1) + 255) / 256 * 256;
    const uint64_t data = (user_len + 4095) / 4096 * 4096;
    const size_t map_len = data + 2 * 4096;
    void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return OUT_OF_MEMORY;
    char* map = (char*)m;
    mprotect(map, 4096, PROT_NONE);
    mprotect(map + 4096 + data, 4096, PROT_NONE);
    const uint64_t base = (uint64_t)(map + 4096 + data - user_len);
    memset(map + 4096, CANARY, data);
    // Fresh device memory is not zeroed on a GPU: fill it with a NaN pattern, so a read before the
    // first write shows up as NaN rather than a lucky zero.
    memset((void*)base, 0xFF, size);
    std::lock_guard<std::mutex> l(g);
    Alloc a{base, size, user_len, map, map_len, next_alloc_id++, {}, {}, {}};
    allocs.emplace(base, std::move(a));
    allocated += size;
    *p = base;
    return SUCCESS;
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    FORCED("cuMemFree_v2");
    fake_stream_sync(nullptr);  // cuMemFree waits for work that may still use the memory
    std::lock_guard<std::mutex> l(g);
    auto it = allocs.find(p);
    if (it == allocs.end()) return INVALID_VALUE;
    check_canary(it->second, "cuMemFree (an earlier operation)");
    mprotect(it->second.map, it->second.map_len, PROT_NONE);
    quarantine.push_back({(uint64_t)it->second.map, (uint64_t)it->second.map + it->second.map_len});
    allocated -= it->second.size;
    allocs.erase(it);
    return SUCCESS;
}

static std::vector<FakeAccess> one(uint64_t p, uint64_t n, char mode, const char* what) {
    return {FakeAccess{p, n, mode, what}};
}
API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    FORCED("cuMemsetD8Async");
    enqueue(s, "cuMemsetD8Async", one(p, n, 'w', "dst"), [=] { memset((void*)p, v, n); });
    return SUCCESS;
}
API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    FORCED("cuMemsetD8_v2");
    enqueue(nullptr, "cuMemsetD8", one(p, n, 'w', "dst"), [=] { memset((void*)p, v, n); });
    return SUCCESS;
}
API CUresult cuMemsetD32Async(CUdeviceptr p, unsigned v, size_t n, CUstream s) {
    FORCED("cuMemsetD32Async");
    enqueue(s, "cuMemsetD32Async", one(p, n * 4, 'w', "dst"), [=] {
        for (size_t i = 0; i < n; i++) memcpy((char*)p + 4 * i, &v, 4);
    });
    return SUCCESS;
}
// Host -> device from pageable memory: the source is consumed at the call, as CUDA stages it.
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    FORCED("cuMemcpyHtoDAsync_v2");
    auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
    enqueue(s, "cuMemcpyHtoDAsync", one(dst, n, 'w', "dst"), [=] { memcpy((void*)dst, staged->data(), n); });
    return SUCCESS;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    FORCED("cuMemcpyHtoD_v2");
    auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
    enqueue(nullptr, "cuMemcpyHtoD", one(dst, n, 'w', "dst"), [=] { memcpy((void*)dst, staged->data(), n); });
    return SUCCESS;
}
// Device -> pageable host memory returns once the data is there (stream order first).
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    FORCED("cuMemcpyDtoHAsync_v2");
    enqueue(s, "cuMemcpyDtoHAsync", one(src, n, 'r', "src"), [=] { memcpy(dst, (const void*)src, n); });
    fake_stream_sync(s);
    return SUCCESS;
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    FORCED("cuMemcpyDtoH_v2");
    enqueue(nullptr, "cuMemcpyDtoH", one(src, n, 'r', "src"), [=] { memcpy(dst, (const void*)src, n); });
    return SUCCESS;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    FORCED("cuMemcpyDtoDAsync_v2");
    std::vector<FakeAccess> acc{{src, n, 'r', "src"}, {dst, n, 'w', "dst"}};
    if (n && src < dst + n && dst < src + n) fake_fault("cuMemcpyDtoDAsync: overlapping ranges");
    enqueue(s, "cuMemcpyDtoDAsync", acc, [=] { memcpy((void*)dst, (const void*)src, n); });
    return SUCCESS;
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
}

API CUresult cuStreamCreate(CUstream* s, unsigned) {
    FORCED("cuStreamCreate");
    *s = new_stream();
    return SUCCESS;
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) {
    FORCED("cuStreamCreateWithPriority");
    *s = new_stream();
    return SUCCESS;
}
API CUresult cuStreamDestroy_v2(CUstream s) {
    FORCED("cuStreamDestroy_v2");
    if (!s) return INVALID_HANDLE;
    fake_stream_sync(s);  // work already queued still completes, as on a device
    return SUCCESS;       // the worker stays (idle): its id keeps naming it in race reports
}
API CUresult cuStreamSynchronize(CUstream s) {
    FORCED("cuStreamSynchronize");
    fake_stream_sync(s ? s : resolve(nullptr));
    if (!s) fake_stream_sync(nullptr);
    return SUCCESS;
}
API CUresult cuStreamQuery(CUstream s) {
    FakeStream* f = resolve(s);
    std::lock_guard<std::mutex> l(g);
    return f->done >= f->enq ? SUCCESS : NOT_READY;
}
API CUresult cuEventCreate(CUevent* e, unsigned) {
    FORCED("cuEventCreate");
    *e = new FakeEvent;
    return SUCCESS;
}
API CUresult cuEventDestroy_v2(CUevent e) {
    (void)e;  // kept: a queued record may still refer to it
    return SUCCESS;
}
API CUresult cuEventRecord(CUevent e, CUstream cs) {
    FORCED("cuEventRecord");
    FakeStream* s = resolve(cs);
    {
        std::lock_guard<std::mutex> l(g);
        e->stream = s->id;
        e->seq = s->enq + 1;
        e->vc = s->vc;
        e->done = false;
    }
    enqueue(s, "cuEventRecord", {}, [e] {
        e->t_ms = now_ms();
        e->done = true;
    });
    return SUCCESS;
}
API CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
API CUresult cuStreamWaitEvent(CUstream cs, CUevent e, unsigned) {
    FORCED("cuStreamWaitEvent");
    FakeStream* s = resolve(cs);
    if (e->stream < 0) return SUCCESS;  // never recorded: no-op, as CUDA
    FakeStream* src;
    uint64_t seq;
    {
        std::lock_guard<std::mutex> l(g);
        src = streams[e->stream];
        seq = e->seq;
        for (auto& [k, v] : e->vc) s->vc[k] = std::max(s->vc[k], v);
        s->vc[e->stream] = std::max(s->vc[e->stream], e->seq);
    }
    if (src != s) {
        {
            std::lock_guard<std::mutex> l(g);
            const uint64_t my = ++s->enq;
            std::lock_guard<std::mutex> l2(s->m);
            s->q.push_back(Op{[src, seq] { wait_stream(src, seq); }, my, true});
        }
        s->cv.notify_all();
    }
    return SUCCESS;
}
API CUresult cuEventSynchronize(CUevent e) {
    FORCED("cuEventSynchronize");
    if (e->stream < 0) return SUCCESS;
    FakeStream* s;
    uint64_t seq;
    {
        std::lock_guard<std::mutex> l(g);
        s = streams[e->stream];
        seq = e->seq;
    }
    wait_stream(s, seq);
    std::lock_guard<std::mutex> l(g);
    host_clock[s->id] = std::max(host_clock[s->id], seq);
    return SUCCESS;
}
API CUresult cuEventQuery(CUevent e) { return e->stream < 0 || e->done ? SUCCESS : NOT_READY; }
API CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    FORCED("cuEventElapsedTime");
    if (!a->done || !b->done) return NOT_READY;
    *ms = (float)(b->t_ms - a->t_ms);
    return SUCCESS;
}
API CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }
API CUresult cuLaunchHostFunc(CUstream s, void (*fn)(void*), void* data) {
    FORCED("cuLaunchHostFunc");
    enqueue(s, "cuLaunchHostFunc", {}, [fn, data] { fn(data); });
    return SUCCESS;
}

API CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    FORCED("cuModuleLoadData");
    if (int r = load_kernels()) return r;
    auto mod = new FakeModule;
    const unsigned char* img = (const unsigned char*)image;
    if (!elf_kernels(img, mod->names)) {
        // PTX text: `.entry name(`
        std::string text((const char*)image);
        std::regex re(R"(\.entry\s+([A-Za-z_$][\w$]*))");
        for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it)
            mod->names.insert((*it)[1]);
        if (mod->names.empty()) {
            fprintf(stderr, "fake-cuda: cuModuleLoadData: neither a cubin nor PTX with kernels\n");
            delete mod;
            return INVALID_IMAGE;
        }
    }
    *m = mod;
    return SUCCESS;
}
API CUresult cuModuleLoadDataEx(CUmodule* m, const void* image, unsigned, void*, void**) {
    return cuModuleLoadData(m, image);
}
API CUresult cuModuleUnload(CUmodule) { return SUCCESS; }
API CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    FORCED("cuModuleGetFunction");
    if (!m->names.count(name)) return NOT_FOUND;
    auto it = kernel_by_name.find(name);
    if (it == kernel_by_name.end()) {
        fprintf(stderr, "fake-cuda: kernel %s is in the module but has no host build (rebuild the stand-in)\n",
                name);
        return NOT_FOUND;
    }
    *f = new FakeFunction{it->second};
    return SUCCESS;
}
API CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    FORCED("cuFuncGetAttribute");
    switch (attr) {
        case 0: *v = 1024; break;                 // max threads per block
        case 4: *v = 32; break;                   // registers
        case 8: *v = f->max_dyn_smem; break;      // max dynamic shared memory
        default: *v = 0;
    }
    return SUCCESS;
}
API CUresult cuFuncSetAttribute(CUfunction f, int attr, int v) {
    FORCED("cuFuncSetAttribute");
    if (attr == 8) {
        if (v > 227 * 1024) return INVALID_VALUE;
        f->max_dyn_smem = v;
    }
    return SUCCESS;
}

struct LaunchArgs {
    const FakeKernel* k;
    std::vector<std::vector<char>> storage;
    std::vector<void*> ptrs;
};
static void run_body(void* a) {
    LaunchArgs* la = (LaunchArgs*)a;
    la->k->run(la->k->fn, la->ptrs.data());
}

API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned smem, CUstream s, void** params, void** extra) {
    FORCED("cuLaunchKernel");
    const FakeKernel* k = f->k;
    if (extra) {
        fake_note_unsupported("cuLaunchKernel with `extra`");
        return NOT_SUPPORTED;
    }
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || threads == 0 || gy > 65535 || gz > 65535 || bz > 64) {
        fprintf(stderr, "fake-cuda: %s: invalid launch grid (%u,%u,%u) block (%u,%u,%u)\n", k->name, gx, gy, gz,
                bx, by, bz);
        return INVALID_VALUE;
    }
    if (threads > 1024) {
        fprintf(stderr, "fake-cuda: %s: %llu threads per block > 1024\n", k->name, threads);
        return INVALID_VALUE;
    }
    if ((int)smem > f->max_dyn_smem) {
        fprintf(stderr, "fake-cuda: %s: %u bytes of dynamic shared memory > the %d allowed\n", k->name, smem,
                f->max_dyn_smem);
        return INVALID_VALUE;
    }
    if (k->nargs && !params) return INVALID_VALUE;
    auto la = std::make_shared<LaunchArgs>();
    la->k = k;
    std::vector<FakeAccess> acc;
    {
        std::lock_guard<std::mutex> l(g);
        for (unsigned i = 0; i < k->nargs; i++) {
            la->storage.emplace_back((const char*)params[i], (const char*)params[i] + k->sizes[i]);
            if (k->kinds[i] == 'v') continue;
            uint64_t p;
            memcpy(&p, params[i], 8);
            if (!p) continue;
            Alloc* a = find_alloc(p);
            if (!a)
                fake_fault("%s: argument %u = 0x%llx is not device memory (or was freed)", k->name, i,
                           (unsigned long long)p);
            acc.push_back(FakeAccess{p, a->base + a->size - p, k->kinds[i], "argument " + std::to_string(i)});
        }
    }
    for (auto& st : la->storage) la->ptrs.push_back(st.data());
    const dim3u grid{gx, gy, gz}, block{bx, by, bz};
    enqueue(s, k->name, acc, [la, grid, block, smem] {
        std::vector<unsigned char> dyn(smem + 64, CANARY);
        run_grid(la->k->name, grid, block, dyn.data(), run_body, la.get());
        for (size_t i = smem; i < dyn.size(); i++)
            if (dyn[i] != CANARY)
                fake_fault("%s wrote past its %u bytes of dynamic shared memory", la->k->name, smem);
    });
    return SUCCESS;
}

API CUresult cuGetErrorString(int e, const char** s) {
    switch (e) {
        case SUCCESS: *s = "no error"; break;
        case INVALID_VALUE: *s = "invalid argument"; break;
        case OUT_OF_MEMORY: *s = "out of memory"; break;
        case NOT_INITIALIZED: *s = "initialization error"; break;
        case INVALID_DEVICE: *s = "invalid device ordinal"; break;
        case INVALID_IMAGE: *s = "device kernel image is invalid"; break;
        case INVALID_HANDLE: *s = "invalid resource handle"; break;
        case NOT_FOUND: *s = "named symbol not found"; break;
        case NOT_READY: *s = "device not ready"; break;
        case NOT_SUPPORTED: *s = "operation not supported"; break;
        default: *s = "unknown error";
    }
    return SUCCESS;
}
API CUresult cuGetErrorName(int e, const char** s) {
    switch (e) {
        case SUCCESS: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return SUCCESS;
}
