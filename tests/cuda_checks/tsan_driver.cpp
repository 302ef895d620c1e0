// Runs every WKV kernel once per element type (fp32, bf16) on random inputs, for
// ThreadSanitizer: TSan reports the races; this program only drives the kernels. With a
// file name as argument it also writes every output there (raw bytes), to compare builds
// of two versions of the kernels bit for bit.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "wkv.h"

namespace {

uint32_t seed = 12345;

float uniform(float lo, float hi) {
    seed = seed * 1664525u + 1013904223u;
    return lo + (hi - lo) * static_cast<float>(seed >> 8) / static_cast<float>(1u << 24);
}

// Per-token values in [lo, hi], stored as fp32 or as bf16 (the top half of the fp32 bits).
struct Tokens {
    std::vector<float> f;
    std::vector<uint16_t> h;
    Tokens(size_t n, float lo, float hi) : f(n), h(n) {
        for (size_t i = 0; i < n; ++i) {
            f[i] = uniform(lo, hi);
            uint32_t u;
            std::memcpy(&u, &f[i], sizeof u);
            h[i] = static_cast<uint16_t>(u >> 16);
        }
    }
    void* ptr(int dtype) { return dtype == wkv::kFloat32 ? static_cast<void*>(f.data()) : h.data(); }
};

template <typename T>
void dump(FILE* out, const std::vector<T>& x) {
    if (out) std::fwrite(x.data(), sizeof(T), x.size(), out);
}

bool ok(const char* err, const char* what) {
    if (err) std::fprintf(stderr, "%s: %s\n", what, err);
    return err == nullptr;
}

}  // namespace

int main(int argc, char** argv) {
    FILE* out = argc > 1 ? std::fopen(argv[1], "wb") : nullptr;
    const int B = 2, T = 20, H = 1, N = _N_;  // 2 blocks at once; T: a whole chunk and a partial one
    const size_t tok = static_cast<size_t>(B) * T * H * N, mat = static_cast<size_t>(B) * H * N * N;
    const size_t ckpt = mat * ((T + wkv::CHUNK - 1) / wkv::CHUNK), scratch = mat * wkv::CHUNK;
    for (int dtype : {wkv::kFloat32, wkv::kBFloat16}) {
        Tokens r(tok, -.5f, .5f), k(tok, -.5f, .5f), v(tok, -1, 1), a(tok, -.2f, 0), b(tok, 0, .2f), dy(tok, -1, 1);
        Tokens y(tok, 0, 0), dr(tok, 0, 0), dk(tok, 0, 0), dv(tok, 0, 0), da(tok, 0, 0), db(tok, 0, 0);
        Tokens w7(tok, -3, -.6f), w6(tok, -6, 1), s0(mat, -.3f, .3f), dsT(mat, -1, 1), u(H * N, -.5f, .5f);
        std::vector<float> sT(mat), ck(ckpt), sa(tok), work(scratch), dw(tok), ds0(mat), du(B * H * N);
        if (!ok(wkv7_forward_launch(dtype, B, T, H, r.ptr(dtype), w7.f.data(), k.ptr(dtype), v.ptr(dtype),
                                    a.ptr(dtype), b.ptr(dtype), s0.f.data(), y.ptr(dtype), sT.data(), ck.data(),
                                    sa.data(), nullptr), "wkv7 forward") ||
            !ok(wkv7_backward_launch(dtype, B, T, H, r.ptr(dtype), w7.f.data(), k.ptr(dtype), v.ptr(dtype),
                                     a.ptr(dtype), b.ptr(dtype), dy.ptr(dtype), ck.data(), sa.data(), dsT.f.data(),
                                     work.data(), dr.ptr(dtype), dw.data(), dk.ptr(dtype), dv.ptr(dtype),
                                     da.ptr(dtype), db.ptr(dtype), ds0.data(), nullptr), "wkv7 backward") ||
            !ok(wkv6_forward_launch(dtype, B, T, H, r.ptr(dtype), w6.f.data(), k.ptr(dtype), v.ptr(dtype),
                                    u.f.data(), s0.f.data(), y.ptr(dtype), sT.data(), ck.data(), nullptr),
                "wkv6 forward") ||
            !ok(wkv6_backward_launch(dtype, B, T, H, r.ptr(dtype), w6.f.data(), k.ptr(dtype), v.ptr(dtype),
                                     u.f.data(), dy.ptr(dtype), ck.data(), dsT.f.data(), work.data(),
                                     dr.ptr(dtype), dw.data(), dk.ptr(dtype), dv.ptr(dtype), du.data(),
                                     ds0.data(), nullptr), "wkv6 backward"))
            return 1;
        for (Tokens* x : {&y, &dr, &dk, &dv, &da, &db}) dump(out, x->f), dump(out, x->h);
        for (auto* x : {&sT, &ck, &sa, &dw, &ds0, &du}) dump(out, *x);
    }
    if (out) std::fclose(out);
    std::puts("ran every kernel in fp32 and bf16");
    return 0;
}
