// Shared pieces of the WKV kernels (wkv7.cu, wkv6.cu): element type conversions and
// dispatch, indexing, and the launch helper for dynamic shared memory. The chunk length
// and the dtype codes are in wkv.h, which the torch bindings share.
//
// Layout conventions (the same as rwkv_peft/model/wkv.py):
//   per-token vectors r, w, k, v, a, b, y and their gradients: [B, T, H, N], contiguous;
//   states (initial, final, checkpoints, their gradients): [.., N, N] fp32, row-major.
// One thread block per (batch, head) pair, N threads; fp32 state and accumulation.
//
// The kernels depend on CUDA only (no torch headers), so tests/test_cuda_compile.py can
// compile them with plain `nvcc -c` on a machine without a GPU.
#pragma once

#include <stdint.h>
#include <stdio.h>

#include "wkv.h"

#ifdef WKV_HOST_EMULATION
// Tests only: CPU stand-ins for the CUDA built-ins, so that a host compiler can build and
// run these kernels on the CPU (see wkv_host_emulation.h).
#include "wkv_host_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// The block's dynamic shared memory as a float array (a macro, so the emulation can
// supply its own).
#define WKV_SHARED_FLOATS(name) extern __shared__ float name[]
#endif

#ifndef _N_
#define _N_ 64  // head size compiled into this build (rwkv_peft/model/wkv_cuda.py passes -D_N_)
#endif

namespace wkv {

// The per-step input vectors of one CHUNK (wkv.h) are staged in shared memory at once, so
// the step loops need few block-wide barriers.

template <typename F>
struct ElementType {
    using type = F;
};

// Calls fn(ElementType<F>{}) with F the element type that `dtype` (a Dtype) names; returns
// fn's result, or an error string for an unknown code.
template <typename Fn>
const char* with_element_type(int dtype, Fn&& fn) {
    switch (dtype) {
        case kFloat32: return fn(ElementType<float>{});
        case kBFloat16: return fn(ElementType<__nv_bfloat16>{});
        case kFloat16: return fn(ElementType<__half>{});
    }
    return "wkv: unsupported dtype";
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename F> __device__ __forceinline__ F from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Offset of element n of token t of head h in batch b, for [B, T, H, N] tensors.
template <int N>
__device__ __forceinline__ int64_t token_index(int b, int t, int h, int T, int H, int n) {
    return ((static_cast<int64_t>(b) * T + t) * H + h) * N + n;
}

// nullptr when a block's `smem` bytes of dynamic shared memory fit `optin`, the device's
// opt-in limit per block; else one line naming both and the head size. (sm_75, RTX 20xx
// and T4: 64 KiB, less than the RWKV-7 backward needs at head size 128.)
inline const char* shared_memory_error(size_t smem, int optin, const char* device) {
    if (smem <= static_cast<size_t>(optin)) return nullptr;
    thread_local char message[256];
    snprintf(message, sizeof message,
             "head size %d needs %zu B of shared memory per block, more than the %d B that %s allows "
             "(use --op torch)", _N_, smem, optin, device);
    return message;
}

#ifndef WKV_HOST_EMULATION
// Launches kernel<<<blocks, threads, smem, stream>>>(args...), raising the dynamic shared
// memory limit first when a configuration needs more than the default 48 KiB.
// Returns nullptr on success, else one line saying what failed. A failed launch leaves no
// error pending for the next, unrelated CUDA call to report.
template <typename Kernel, typename... Args>
const char* launch(Kernel kernel, int blocks, int threads, size_t smem, void* stream, Args... args) {
    if (blocks == 0) return nullptr;
    if (smem > 48 * 1024) {
        int device = 0, optin = 0, major = 0, minor = 0;
        if (cudaGetDevice(&device) != cudaSuccess ||
            cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
            cudaGetLastError();  // clear it; cudaFuncSetAttribute below then says what is wrong
            optin = static_cast<int>(smem);
        }
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
        char name[64];
        snprintf(name, sizeof name, "cuda:%d (sm_%d%d)", device, major, minor);
        if (const char* error = shared_memory_error(smem, optin, name)) return error;
        cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
        if (e != cudaSuccess) {
            cudaGetLastError();  // clear it
            return cudaGetErrorString(e);
        }
    }
    kernel<<<blocks, threads, smem, static_cast<cudaStream_t>(stream)>>>(args...);
    cudaError_t e = cudaGetLastError();  // also clears a launch error (a sticky fault stays)
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
#endif

}  // namespace wkv
