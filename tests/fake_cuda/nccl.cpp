// libnccl.so.2 of the CUDA stand-in (test-only): AllReduce, ReduceScatter and AllGather queued on the
// caller's stream like device work. World 1 is a copy; a larger world (the processes of one mpirun on
// one machine) exchanges through a POSIX shared-memory segment named by the unique id, in fixed-size
// chunks between two barriers. Sums are taken in fp32 (fp64 for ncclFloat64) in rank order, rounded
// once to the buffer's type, so every rank gets the same bits. ncclCommGetAsyncError reports a peer
// whose process is gone (ncclRemoteError); ncclCommAbort ends this rank's waits at once.
// Other entry points: "not supported".
#include "fake.h"
#include "half_conv.h"
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <random>
#include <cerrno>
#include <csignal>
#include <sched.h>
#include <sys/mman.h>
#include <thread>
#include <unistd.h>

#define API extern "C" __attribute__((visibility("default")))
enum { OK = 0, SYSTEM_ERROR = 2, INTERNAL = 3, INVALID_ARG = 4, INVALID_USAGE = 5, REMOTE_ERROR = 6 };
enum { I8 = 0, U8 = 1, I32 = 2, U32 = 3, I64 = 4, U64 = 5, F16 = 6, F32 = 7, F64 = 8, BF16 = 9 };
enum { SUM = 0, AVG = 4 };
static const size_t CHUNK = 1 << 20;  // bytes per rank per round

struct UniqueId {
    char internal[128];
};
static const int MAX_RANKS = 256;
struct Shm {  // fits the 4096-byte header page
    std::atomic<uint32_t> arrive, gen;
    std::atomic<int32_t> pid[MAX_RANKS];  // each rank's process, for the async-error check
};
static_assert(sizeof(Shm) <= 4096, "the header page holds Shm");
struct Comm {
    int rank, n;
    std::string name;
    Shm* hdr = nullptr;
    char* slots = nullptr;
    size_t bytes = 0;
    std::atomic<bool> aborted{false};
};
#define FORCED(name)                                                                                     \
    do {                                                                                                 \
        if (fake_forced_unsupported(name)) {                                                             \
            fake_note_unsupported(name);                                                                 \
            return INVALID_USAGE;                                                                        \
        }                                                                                                \
    } while (0)

API int ncclGetVersion(int* v) {
    FORCED("ncclGetVersion");
    *v = 22800;
    return OK;
}
API const char* ncclGetErrorString(int r) {
    switch (r) {
        case OK: return "no error";
        case SYSTEM_ERROR: return "unhandled system error (CUDA stand-in)";
        case INVALID_ARG: return "invalid argument (CUDA stand-in)";
        case INVALID_USAGE: return "invalid usage (CUDA stand-in: see the message above)";
        default: return "internal error (CUDA stand-in)";
    }
}
API int ncclGetUniqueId(UniqueId* id) {
    FORCED("ncclGetUniqueId");
    memset(id, 0, sizeof *id);
    std::random_device rd;
    snprintf(id->internal, sizeof id->internal, "/zhllama-fake-nccl-%d-%08x%08x", (int)getpid(), rd(), rd());
    return OK;
}
API int ncclCommInitRank(Comm** out, int n, UniqueId id, int rank) {
    FORCED("ncclCommInitRank");
    if (n < 1 || rank < 0 || rank >= n || n > MAX_RANKS) return INVALID_ARG;
    Comm* c = new Comm{rank, n, std::string(id.internal, strnlen(id.internal, sizeof id.internal))};
    if (n > 1) {
        if (c->name.rfind("/zhllama-fake-nccl-", 0) != 0) {
            fprintf(stderr, "fake-cuda: ncclCommInitRank: unique id not from this stand-in\n");
            return INVALID_ARG;
        }
        c->bytes = 4096 + CHUNK * n;
        int fd = shm_open(c->name.c_str(), O_CREAT | O_RDWR, 0600);
        if (fd < 0 || ftruncate(fd, (off_t)c->bytes) != 0) {
            perror("fake-cuda: ncclCommInitRank: shm");
            return SYSTEM_ERROR;
        }
        void* p = mmap(nullptr, c->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (p == MAP_FAILED) return SYSTEM_ERROR;
        c->hdr = (Shm*)p;
        c->slots = (char*)p + 4096;
        c->hdr->pid[rank].store((int32_t)getpid());
    }
    *out = c;
    return OK;
}

static void barrier(Comm* c, const char* op) {
    const uint32_t g = c->hdr->gen.load();
    if (c->hdr->arrive.fetch_add(1) + 1 == (uint32_t)c->n) {
        c->hdr->arrive.store(0);
        c->hdr->gen.fetch_add(1);
        return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    while (c->hdr->gen.load() == g) {
        if (c->aborted.load()) return;  // ncclCommAbort: the caller has given up on this collective
        std::this_thread::sleep_for(std::chrono::microseconds(20));
        if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(600))
            fake_fault("%s: rank %d waited 600 s for its peers (mismatched collectives?)", op, c->rank);
    }
}
// A peer whose process no longer exists is a remote error (what NCCL reports for a dead peer).
API int ncclCommGetAsyncError(Comm* c, int* err) {
    FORCED("ncclCommGetAsyncError");
    *err = OK;
    for (int r = 0; c->hdr && r < c->n; r++) {
        const int32_t pid = c->hdr->pid[r].load();
        if (r != c->rank && pid > 0 && kill(pid, 0) != 0 && errno == ESRCH) {
            fprintf(stderr, "fake-cuda: nccl rank %d: peer rank %d (pid %d) is gone\n", c->rank, r, pid);
            *err = REMOTE_ERROR;
        }
    }
    return OK;
}
// Ends this rank's waits; the communicator (and its mapping, which a stream worker may still be
// reading) is left for process exit, as a real abort's caller must not use it again either.
API int ncclCommAbort(Comm* c) {
    FORCED("ncclCommAbort");
    c->aborted.store(true);
    return OK;
}
API int ncclCommDestroy(Comm* c) {
    if (c->hdr) {
        munmap(c->hdr, c->bytes);
        if (c->rank == 0) shm_unlink(c->name.c_str());
    }
    delete c;
    return OK;
}

static size_t esize(int t) {
    switch (t) {
        case I8: case U8: return 1;
        case F16: case BF16: return 2;
        case I32: case U32: case F32: return 4;
        default: return 8;
    }
}
static double ld(const char* p, int t, size_t i) {
    switch (t) {
        case F32: return ((const float*)p)[i];
        case F64: return ((const double*)p)[i];
        case BF16: return fk_bf16_to_f32(((const uint16_t*)p)[i]);
        case F16: return fk_f16_to_f32(((const uint16_t*)p)[i]);
        case I32: return ((const int32_t*)p)[i];
        default: return (double)((const int64_t*)p)[i];
    }
}
static void stv(char* p, int t, size_t i, double v) {
    switch (t) {
        case F32: ((float*)p)[i] = (float)v; break;
        case F64: ((double*)p)[i] = v; break;
        case BF16: ((uint16_t*)p)[i] = fk_f32_to_bf16((float)v); break;
        case F16: ((uint16_t*)p)[i] = fk_f32_to_f16((float)v); break;
        case I32: ((int32_t*)p)[i] = (int32_t)v; break;
        default: ((int64_t*)p)[i] = (int64_t)v;
    }
}
// Sum of `cnt` elements over the ranks' slots (fp32 for 16/32-bit floats, fp64 for f64), to `out`.
static void reduce_slots(Comm* c, int t, int op, size_t cnt, char* out) {
    for (size_t i = 0; i < cnt; i++) {
        double s;
        if (t == F64) {
            s = 0;
            for (int r = 0; r < c->n; r++) s += ld(c->slots + r * CHUNK, t, i);
        } else {
            float f = 0;
            for (int r = 0; r < c->n; r++) f += (float)ld(c->slots + r * CHUNK, t, i);
            s = f;
        }
        if (op == AVG) s = t == F64 ? s / c->n : (double)((float)s / (float)c->n);
        stv(out, t, i, s);
    }
}
static int check(int t, int op, const char* name) {
    if (t != F32 && t != F64 && t != F16 && t != BF16) {
        fprintf(stderr, "fake-cuda: %s: data type %d is not supported by the stand-in\n", name, t);
        return INVALID_USAGE;
    }
    if (op != SUM && op != AVG) {
        fprintf(stderr, "fake-cuda: %s: reduction %d is not supported by the stand-in\n", name, op);
        return INVALID_USAGE;
    }
    return OK;
}

API int ncclAllReduce(const void* send, void* recv, size_t count, int t, int op, Comm* c, CUstream s) {
    FORCED("ncclAllReduce");
    if (int r = check(t, op, "ncclAllReduce")) return r;
    const size_t es = esize(t);
    std::vector<FakeAccess> acc{{(uint64_t)send, count * es, 'r', "sendbuff"}, {(uint64_t)recv, count * es, 'w', "recvbuff"}};
    if (send == recv) acc.erase(acc.begin());
    std::function<void()> fn = [=] {
        if (c->n == 1) {
            if (op == AVG || send != recv) memmove(recv, send, count * es);
            return;
        }
        const size_t per = CHUNK / es;
        for (size_t off = 0; off < count; off += per) {
            const size_t cnt = std::min(per, count - off);
            memcpy(c->slots + c->rank * CHUNK, (const char*)send + off * es, cnt * es);
            barrier(c, "ncclAllReduce");
            reduce_slots(c, t, op, cnt, (char*)recv + off * es);
            barrier(c, "ncclAllReduce");
        }
    };
    fake_enqueue(s, "ncclAllReduce", &acc, &fn);
    return OK;
}
API int ncclReduceScatter(const void* send, void* recv, size_t rc, int t, int op, Comm* c, CUstream s) {
    FORCED("ncclReduceScatter");
    if (int r = check(t, op, "ncclReduceScatter")) return r;
    const size_t es = esize(t);
    std::vector<FakeAccess> acc{{(uint64_t)send, rc * c->n * es, 'r', "sendbuff"}, {(uint64_t)recv, rc * es, 'w', "recvbuff"}};
    std::function<void()> fn = [=] {
        if (c->n == 1) {
            memmove(recv, send, rc * es);
            return;
        }
        const size_t per = CHUNK / es;
        for (int d = 0; d < c->n; d++)
            for (size_t off = 0; off < rc; off += per) {
                const size_t cnt = std::min(per, rc - off);
                memcpy(c->slots + c->rank * CHUNK, (const char*)send + (d * rc + off) * es, cnt * es);
                barrier(c, "ncclReduceScatter");
                if (d == c->rank) reduce_slots(c, t, op, cnt, (char*)recv + off * es);
                barrier(c, "ncclReduceScatter");
            }
    };
    fake_enqueue(s, "ncclReduceScatter", &acc, &fn);
    return OK;
}
API int ncclAllGather(const void* send, void* recv, size_t sc, int t, Comm* c, CUstream s) {
    FORCED("ncclAllGather");
    const size_t es = esize(t);
    std::vector<FakeAccess> acc{{(uint64_t)send, sc * es, 'r', "sendbuff"}, {(uint64_t)recv, sc * c->n * es, 'w', "recvbuff"}};
    if ((const char*)send == (const char*)recv + c->rank * sc * es) acc.erase(acc.begin());
    std::function<void()> fn = [=] {
        if (c->n == 1) {
            memmove(recv, send, sc * es);
            return;
        }
        const size_t per = CHUNK / es;
        for (int d = 0; d < c->n; d++)
            for (size_t off = 0; off < sc; off += per) {
                const size_t cnt = std::min(per, sc - off);
                if (d == c->rank) memcpy(c->slots, (const char*)send + off * es, cnt * es);
                barrier(c, "ncclAllGather");
                memcpy((char*)recv + (d * sc + off) * es, c->slots, cnt * es);
                barrier(c, "ncclAllGather");
            }
    };
    fake_enqueue(s, "ncclAllGather", &acc, &fn);
    return OK;
}
