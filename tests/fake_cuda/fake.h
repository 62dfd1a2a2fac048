// Internal interface of the CUDA stand-in, shared by libcuda.so.1 (driver.cpp), libcublas.so.13
// (cublas.cpp) and libnccl.so.2 (nccl.cpp). Test-only; never linked into the product.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

typedef int CUresult;
typedef struct FakeStream* CUstream;

// One device-memory range an operation reads ('r') or writes ('w').
struct FakeAccess {
    uint64_t ptr;
    uint64_t bytes;
    char mode;
    std::string what;  // e.g. "A", "param 3"
};

// Check `acc` (every range inside one live allocation; no unordered access from another stream),
// then queue `fn` on `s` (nullptr: the legacy default stream). A violation prints a FAULT line naming
// `op` and stops the process (exit 97), as a sticky device error would end a real run.
extern "C" void fake_enqueue(CUstream s, const char* op, const std::vector<FakeAccess>* acc,
                             std::function<void()>* fn);
// Wait until every operation queued on `s` has run (nullptr: every stream).
extern "C" void fake_stream_sync(CUstream s);
// Print the "not supported" line for entry point `name` (also honours FAKE_CUDA_UNSUPPORTED).
extern "C" void fake_note_unsupported(const char* name);
// True when FAKE_CUDA_UNSUPPORTED (comma-separated names) lists `name`: the entry point then
// behaves as an unsupported one, so tests can check that the backend fails cleanly.
extern "C" int fake_forced_unsupported(const char* name);
[[noreturn]] void fake_fault(const char* fmt, ...);
