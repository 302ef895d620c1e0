// Host entry points of the WKV kernels, shared by wkv_op.cpp (torch bindings) and the .cu
// files. Plain C++ (no CUDA or torch types), so each side compiles without the other's
// headers. Every function launches on `stream` (a cudaStream_t) and returns nullptr on
// success or CUDA's error string. `dtype` is a wkv::Dtype and gives the element type of
// the void* per-token tensors; every float* tensor is fp32. The head size N is the
// compile-time _N_.
#pragma once

namespace wkv {

// Steps between state checkpoints. The forward pass saves the state at the start of every
// chunk of CHUNK steps; the backward pass walks the chunks from last to first, replays each
// one forward from its checkpoint (exactly the forward's fp32 arithmetic) and then walks
// its steps back. rwkv_peft/model/wkv_cuda.py's CHUNK_LEN must equal it (a test checks).
constexpr int CHUNK = 16;

// Element types of the per-token vectors, as the bindings pass them.
enum Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace wkv

// RWKV-7, state [N value, N key]. Inputs [B, T, H, N]; s0, sT [B, H, N, N] (s0 may be null:
// zeros). ckpt [B, H, ceil(T/CHUNK), N, N] and sa [B, T, H, N] are written for the backward
// pass, or skipped when null (inference).
const char* wkv7_forward_launch(int dtype, int B, int T, int H, const void* r, const float* w,
                                const void* k, const void* v, const void* a, const void* b,
                                const float* s0, void* y, float* sT, float* ckpt, float* sa,
                                void* stream);

// Gradients of every input. dsT (the incoming gradient of sT) may be null: zeros.
// scratch: [B * H, CHUNK, N, N] fp32 workspace. ds0 [B, H, N, N] is always written.
const char* wkv7_backward_launch(int dtype, int B, int T, int H, const void* r, const float* w,
                                 const void* k, const void* v, const void* a, const void* b,
                                 const void* dy, const float* ckpt, const float* sa,
                                 const float* dsT, float* scratch, void* dr, float* dw, void* dk,
                                 void* dv, void* da, void* db, float* ds0, void* stream);

// RWKV-6, state [N key, N value]. u [H, N] fp32. ckpt as for RWKV-7 (null: skipped).
const char* wkv6_forward_launch(int dtype, int B, int T, int H, const void* r, const float* w,
                                const void* k, const void* v, const float* u, const float* s0,
                                void* y, float* sT, float* ckpt, void* stream);

// du_part [B, H, N]: per-sequence parts of du (the caller sums over B, which keeps the
// result deterministic).
const char* wkv6_backward_launch(int dtype, int B, int T, int H, const void* r, const float* w,
                                 const void* k, const void* v, const float* u, const void* dy,
                                 const float* ckpt, const float* dsT, float* scratch, void* dr,
                                 float* dw, void* dk, void* dv, float* du_part, float* ds0,
                                 void* stream);
