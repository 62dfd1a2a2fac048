// Host driver for the emulated kernels (tests/cuda_emulated.rs). Reads a script on stdin:
//   b ID LEN   fp32 buffer (from DIR/inID.bin if present, else zeros)      B: bf16, H: f16 (file f32)
//   i ID LEN   int32 buffer (from DIR/inID.bin if present, else zeros)      D: fp64 zeros
//   L NAME GX GY GZ THREADS ARG...   launch; ARG = pID | n0 (null pointer) | iV | lV | uV | qV | fV
//   d ID       write the buffer as f32 (bf16/f16 widened, f64 narrowed) to DIR/outID.bin
// DIR is argv[1]. Every kernels/*.cu is compiled into this one file against emu.h.
#include "emu.h"
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <utility>

#include "../../kernels/adamw.cu"
#include "../../kernels/attention.cu"
#include "../../kernels/cross_entropy.cu"
#include "../../kernels/dropout.cu"
#include "../../kernels/elementwise.cu"
#include "../../kernels/embedding.cu"
#include "../../kernels/fill.cu"
#include "../../kernels/rmsnorm.cu"
#include "../../kernels/rope.cu"
#include "../../kernels/swiglu.cu"

struct Buf {
    char kind;
    std::vector<unsigned char> bytes;
};
static std::map<int, Buf> bufs;

struct Arg {
    char kind;
    long long i;
    unsigned long long u;
    float f;
    int id;
};

template <typename T>
T conv(const Arg& a) {
    if constexpr (std::is_pointer_v<T>) {
        if (a.kind == 'n') return nullptr;
        if (a.kind != 'p') { std::fprintf(stderr, "expected a buffer argument\n"); std::exit(3); }
        return reinterpret_cast<T>(bufs.at(a.id).bytes.data());
    } else if constexpr (std::is_same_v<T, float>) {
        return a.f;
    } else if constexpr (std::is_same_v<T, unsigned long long>) {
        return (T)a.u;
    } else {
        return (T)a.i;
    }
}

using Launcher = std::function<void(dim3u, unsigned, const std::vector<Arg>&)>;
template <typename... A, size_t... I>
void call(void (*f)(A...), const std::vector<Arg>& v, std::index_sequence<I...>) {
    f(conv<A>(v[I])...);
}
template <typename... A>
Launcher make(void (*f)(A...)) {
    return [f](dim3u g, unsigned t, const std::vector<Arg>& v) {
        if (v.size() != sizeof...(A)) { std::fprintf(stderr, "wrong argument count\n"); std::exit(3); }
        emu_launch(g, t, [&] { call(f, v, std::index_sequence_for<A...>{}); });
    };
}
#define REG(k) {#k, make(&k)}
static std::map<std::string, Launcher> table = {
    REG(rmsnorm_forward_v1_f32), REG(rmsnorm_forward_v1_bf16), REG(rmsnorm_backward_v1_f32),
    REG(rmsnorm_backward_v1_bf16), REG(rmsnorm_dw_reduce_v1_f32),
    REG(attention_forward_v1_d64_f32), REG(attention_forward_v1_d128_f32),
    REG(attention_forward_v1_d64_bf16),
    REG(attention_backward_delta_v1_f32), REG(attention_backward_dkdv_v1_d64_f32),
    REG(attention_backward_dkdv_v1_d128_f32), REG(attention_backward_dq_v1_d64_f32),
    REG(attention_backward_dq_v1_d128_f32), REG(rope_forward_v1_f32), REG(rope_backward_v1_f32),
    REG(swiglu_forward_v1_f32), REG(swiglu_backward_v1_f32), REG(swiglu_forward_x1_f32),
    REG(swiglu_backward_x1_f32), REG(swiglu_forward_v1_bf16),
    REG(embedding_forward_v1_f32), REG(embedding_backward_v1_f32), REG(embedding_backward_v1_bf16),
    REG(cross_entropy_forward_v1_f32), REG(cross_entropy_backward_v1_f32),
    REG(lmhead_ce_chunk_forward_v1_f32), REG(lmhead_ce_finish_v1_f32), REG(lmhead_ce_chunk_backward_v1_f32),
    REG(adamw_step_v1_f32_f32), REG(adamw_step_v1_f32_bf16),
    REG(sum_squares_partial_v1_f32), REG(sum_squares_finish_v1_f64), REG(sum_partial_v1_f32), REG(axpy_v1_f32_bf16),
    REG(copy_v1_bf16_f32), REG(scale_v1_f32), REG(dropout_v1_f32), REG(dropout_v1_bf16),
    // fp16 storage (the recipe's fp16 mode)
    REG(rmsnorm_forward_v1_f16), REG(rmsnorm_backward_v1_f16), REG(swiglu_forward_v1_f16),
    REG(swiglu_backward_v1_f16), REG(attention_forward_v1_d64_f16), REG(attention_backward_delta_v1_f16),
    REG(attention_backward_dkdv_v1_d64_f16), REG(attention_backward_dq_v1_d64_f16),
    REG(cross_entropy_forward_v1_f16), REG(cross_entropy_backward_v1_f16), REG(adamw_step_v1_f32_f16_cf16),
    REG(adamw_step_v1_f32_f32_cf16), REG(dropout_v1_f16), REG(copy_v1_f16_f32), REG(embedding_backward_v1_f16),
    REG(fill_uniform_v1_f32), REG(fill_uniform_v1_bf16),
    REG(copy_v1_bf16_f16), REG(copy_v1_f16_bf16), REG(axpy_v1_bf16_f16), REG(axpy_v1_f16_bf16),
};

static std::vector<unsigned char> read_file(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    const std::string dir = argv[1];
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream s(line);
        std::string op;
        s >> op;
        if (op == "b" || op == "B" || op == "H" || op == "i" || op == "D") {
            int id;
            size_t len;
            s >> id >> len;
            const size_t es = op == "B" || op == "H" ? 2 : op == "D" ? 8 : 4;
            Buf b{op[0], std::vector<unsigned char>(len * es + 16, 0)};
            auto in = read_file(dir + "/in" + std::to_string(id) + ".bin");
            if (!in.empty()) {
                if (op == "B" || op == "H") {
                    for (size_t k = 0; k < len; k++) {
                        float f;
                        std::memcpy(&f, in.data() + 4 * k, 4);
                        if (op == "B") {
                            __nv_bfloat16 h = __float2bfloat16_rn(f);
                            std::memcpy(b.bytes.data() + 2 * k, &h, 2);
                        } else {
                            __half h = __float2half_rn(f);
                            std::memcpy(b.bytes.data() + 2 * k, &h, 2);
                        }
                    }
                } else {
                    std::memcpy(b.bytes.data(), in.data(), std::min(in.size(), len * es));
                }
            }
            bufs[id] = std::move(b);
        } else if (op == "L") {
            std::string name;
            dim3u g;
            unsigned t;
            s >> name >> g.x >> g.y >> g.z >> t;
            std::vector<Arg> args;
            std::string a;
            while (s >> a) {
                Arg x{a[0], 0, 0, 0.0f, 0};
                const std::string v = a.substr(1);
                if (x.kind == 'p' || x.kind == 'n') x.id = std::stoi(v);
                else if (x.kind == 'f') x.f = std::stof(v);
                else if (x.kind == 'q') x.u = std::stoull(v);
                else x.i = std::stoll(v);
                args.push_back(x);
            }
            auto it = table.find(name);
            if (it == table.end()) { std::fprintf(stderr, "unknown kernel %s\n", name.c_str()); return 3; }
            it->second(g, t, args);
        } else if (op == "d") {
            int id;
            s >> id;
            const Buf& b = bufs.at(id);
            const size_t es = b.kind == 'B' || b.kind == 'H' ? 2 : b.kind == 'D' ? 8 : 4;
            const size_t len = (b.bytes.size() - 16) / es;
            std::vector<float> out(len);
            for (size_t k = 0; k < len; k++) {
                if (b.kind == 'B') {
                    __nv_bfloat16 h;
                    std::memcpy(&h, b.bytes.data() + 2 * k, 2);
                    out[k] = __bfloat162float(h);
                } else if (b.kind == 'H') {
                    __half h;
                    std::memcpy(&h, b.bytes.data() + 2 * k, 2);
                    out[k] = __half2float(h);
                } else if (b.kind == 'D') {
                    double d;
                    std::memcpy(&d, b.bytes.data() + 8 * k, 8);
                    out[k] = (float)d;
                } else if (b.kind == 'i') {
                    int v;
                    std::memcpy(&v, b.bytes.data() + 4 * k, 4);
                    out[k] = (float)v;
                } else {
                    std::memcpy(&out[k], b.bytes.data() + 4 * k, 4);
                }
            }
            std::ofstream f(dir + "/out" + std::to_string(id) + ".bin", std::ios::binary);
            f.write(reinterpret_cast<const char*>(out.data()), out.size() * 4);
        }
    }
    return 0;
}
