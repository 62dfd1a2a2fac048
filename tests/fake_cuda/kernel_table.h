// Binds an `extern "C"` kernel compiled against fiber_emu.h to the driver stand-in: its parameter
// count, sizes and read/write use (a `const T*` is read, a `T*` read and written), and a runner that
// unpacks cuLaunchKernel's `kernelParams` into a call with the kernel's own C++ signature.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

struct FakeKernel {
    const char* name;
    void* fn;
    void (*run)(void* fn, void* const* params);
    unsigned nargs;
    const unsigned* sizes;
    const char* kinds;  // per argument: 'r' const pointer, 'w' pointer, 'v' value
};

template <typename T>
constexpr char fake_arg_kind() {
    if constexpr (std::is_pointer_v<T>)
        return std::is_const_v<std::remove_pointer_t<T>> ? 'r' : 'w';
    else
        return 'v';
}

template <typename... A>
struct FakeInvoke {
    static constexpr unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0u};
    static constexpr char kinds[sizeof...(A) + 1] = {fake_arg_kind<A>()..., 0};
    template <size_t... I>
    static void run_i(void* fn, void* const* p, std::index_sequence<I...>) {
        reinterpret_cast<void (*)(A...)>(fn)(*reinterpret_cast<std::remove_cv_t<A>*>(p[I])...);
    }
    static void run(void* fn, void* const* p) { run_i(fn, p, std::index_sequence_for<A...>{}); }
};

template <typename... A>
FakeKernel fake_kernel(const char* name, void (*f)(A...)) {
    return FakeKernel{name, reinterpret_cast<void*>(f), &FakeInvoke<A...>::run, (unsigned)sizeof...(A),
                      FakeInvoke<A...>::sizes, FakeInvoke<A...>::kinds};
}
#define FAKE_KERNEL(k) fake_kernel(#k, &k)
