// CPU stand-ins for the CUDA features the WKV kernels use. Tests only.
//
// With -DWKV_HOST_EMULATION a host C++20 compiler builds wkv7.cu / wkv6.cu unchanged (as
// C++, `g++ -x c++`) and runs them on the CPU: every block runs as N std::threads, one per
// CUDA thread, with a std::barrier for __syncthreads() and a NaN-filled buffer as the
// dynamic shared memory (a read of a slot nobody wrote shows up as NaN); blocks run two at
// a time, in a shuffled order, as a GPU promises neither an order nor a separation. This
// checks the kernels' indexing, chunking, barriers and arithmetic against the float64
// PyTorch reference on machines without a GPU (tests/test_cuda_compile.py, which also runs
// them under ThreadSanitizer); it says nothing about speed, and bf16/fp16 conversions are
// the round-to-nearest-even ones of the CUDA intrinsics. The environment variable
// WKV_EMULATED_SHARED_MEMORY_OPTIN sets the emulated device's opt-in limit of shared
// memory per block in bytes (default: none), for the tests of that check.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

namespace wkv_emu {
struct Index3 {
    int x = 0, y = 0, z = 0;
};
inline thread_local Index3 thread_index, block_index;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local float* block_shared = nullptr;
}  // namespace wkv_emu

#define threadIdx (::wkv_emu::thread_index)
#define blockIdx (::wkv_emu::block_index)
#define __syncthreads() (::wkv_emu::block_barrier->arrive_and_wait())
#define WKV_SHARED_FLOATS(name) float* name = ::wkv_emu::block_shared

using std::max;
using std::min;

struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// bf16 and fp16 storage types with the CUDA conversion intrinsics' rounding (to nearest even).
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
    const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}
struct __half {
    uint16_t bits;
};
inline float __half2float(__half x) {
    const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
    const int exponent = (x.bits >> 10) & 0x1f;
    const uint32_t mantissa = x.bits & 0x3ffu;
    uint32_t u;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
        const float f = std::ldexp(static_cast<float>(mantissa), -24);
        std::memcpy(&u, &f, sizeof u);
        u |= sign;
    } else if (exponent == 31) {
        u = sign | 0x7f800000u | (mantissa << 13);
    } else {
        u = sign | (static_cast<uint32_t>(exponent - 15 + 127) << 23) | (mantissa << 13);
    }
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline __half __float2half_rn(float f) {
    const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
    const float a = std::fabs(f);
    if (std::isnan(f)) return {static_cast<uint16_t>(sign | 0x7e00u)};
    if (a < 0x1p-14f)  // subnormal range: units of 2^-24, rounded to nearest even
        return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 0x1p24f)))};
    int e;
    std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    e -= 1;             // a = 1.x * 2^e
    float m = std::nearbyint(std::ldexp(a, 10 - e));  // in [1024, 2048]
    if (m == 2048.f) m = 1024.f, e += 1;
    if (e > 15 || !std::isfinite(a)) return {static_cast<uint16_t>(sign | 0x7c00u)};
    return {static_cast<uint16_t>(sign | ((e + 15) << 10) | (static_cast<int>(m) - 1024))};
}

namespace wkv {
inline const char* shared_memory_error(size_t smem, int optin, const char* device);  // wkv_common.cuh

// kernel<<<blocks, threads, smem>>>(args...), emulated: `threads` threads per block, blocks
// two at a time in a shuffled order, each with its own barrier and shared memory.
template <typename Kernel, typename... Args>
const char* launch(Kernel kernel, int blocks, int threads, size_t smem, void* /*stream*/, Args... args) {
    if (const char* optin = std::getenv("WKV_EMULATED_SHARED_MEMORY_OPTIN"))
        if (const char* error = shared_memory_error(smem, std::atoi(optin), "the emulated device")) return error;
    constexpr int kConcurrent = 2;
    static std::atomic<unsigned> launches{0};
    std::vector<int> order(blocks);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(launches++));
    for (int first = 0; first < blocks; first += kConcurrent) {
        const int n = std::min(kConcurrent, blocks - first);
        std::vector<std::vector<float>> shared(
            n, std::vector<float>(smem / sizeof(float) + 1, std::numeric_limits<float>::quiet_NaN()));
        std::vector<std::unique_ptr<std::barrier<>>> barriers;
        for (int i = 0; i < n; ++i) barriers.push_back(std::make_unique<std::barrier<>>(threads));
        std::vector<std::thread> pool;
        pool.reserve(n * threads);
        for (int i = 0; i < n; ++i) {
            for (int t = 0; t < threads; ++t) {
                pool.emplace_back([&, i, t] {
                    wkv_emu::thread_index.x = t;
                    wkv_emu::block_index.x = order[first + i];
                    wkv_emu::block_barrier = barriers[i].get();
                    wkv_emu::block_shared = shared[i].data();
                    kernel(args...);
                });
            }
        }
        for (auto& th : pool) th.join();
    }
    return nullptr;
}
}  // namespace wkv
