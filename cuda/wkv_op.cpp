// torch bindings of the WKV kernels (a pybind11 module built by rwkv_peft/model/wkv_cuda.py).
//
// The functions check shapes, dtypes, devices and contiguity, allocate the outputs and
// the backward's workspaces, and launch on the stream the caller names. Autograd lives in
// Python (rwkv_peft/model/wkv_cuda.py); these are the raw forward and backward passes.
//
// The caller passes the CUDA stream to launch on (torch.cuda.current_stream(device)
// .cuda_stream, a cudaStream_t as an integer; 0 is the legacy default stream), and only
// device-generic c10 headers are used, no c10/cuda ones: this file then compiles against
// any torch build, a CPU-only one included. tests/test_cuda_compile.py builds it so, with
// -DWKV_HOST_EMULATION and the kernels compiled for the CPU behind it
// (cuda/wkv_host_emulation.h), and runs its tests through these very bindings.

#include <c10/core/DeviceGuard.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "wkv.h"

#ifndef _N_
#define _N_ 64
#endif

namespace {

using torch::Tensor;
constexpr int64_t kChunk = wkv::CHUNK;
#ifdef WKV_HOST_EMULATION
constexpr bool kOnCuda = false;  // tests: the kernels run on the CPU and take CPU tensors
#else
constexpr bool kOnCuda = true;
#endif

int dtype_code(const Tensor& x) {
    switch (x.scalar_type()) {
        case torch::kFloat32: return wkv::kFloat32;
        case torch::kBFloat16: return wkv::kBFloat16;
        case torch::kFloat16: return wkv::kFloat16;
        default: TORCH_CHECK(false, "wkv: per-token tensors must be float32, bfloat16 or float16, got ",
                             x.scalar_type());
    }
    return -1;
}

void check_cuda(const Tensor& x, const Tensor& ref, const char* name) {
    TORCH_CHECK(x.is_cuda() == kOnCuda, "wkv: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.device() == ref.device(), "wkv: ", name, " is on ", x.device(), ", expected ", ref.device());
    TORCH_CHECK(x.is_contiguous(), "wkv: ", name, " must be contiguous");
}

// A per-token tensor [B, T, H, N] with the dtype of r (or fp32 for w).
void check_token(const Tensor& x, const Tensor& r, const char* name, bool fp32 = false) {
    check_cuda(x, r, name);
    TORCH_CHECK(x.sizes() == r.sizes(), "wkv: ", name, " has shape ", x.sizes(), ", expected ", r.sizes());
    if (fp32) {
        TORCH_CHECK(x.scalar_type() == torch::kFloat32, "wkv: ", name, " must be float32");
    } else {
        TORCH_CHECK(x.scalar_type() == r.scalar_type(), "wkv: ", name, " has dtype ", x.scalar_type(),
                    ", expected ", r.scalar_type(), " (the dtype of r)");
    }
}

// A fp32 state [B, H, N, N] (optional ones may be None).
const float* state_ptr(const std::optional<Tensor>& s, const Tensor& r, const char* name) {
    if (!s.has_value() || !s->defined()) return nullptr;
    check_cuda(*s, r, name);
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    TORCH_CHECK(s->scalar_type() == torch::kFloat32, "wkv: ", name, " must be float32");
    TORCH_CHECK(s->sizes() == torch::IntArrayRef({B, H, N, N}), "wkv: ", name, " has shape ", s->sizes(),
                ", expected [", B, ", ", H, ", ", N, ", ", N, "]");
    return s->data_ptr<float>();
}

void check_r(const Tensor& r) {
    TORCH_CHECK(r.is_cuda() == kOnCuda, "wkv: inputs must be CUDA tensors");
    TORCH_CHECK(r.dim() == 4, "wkv: inputs must be [B, T, H, N], got ", r.sizes());
    TORCH_CHECK(r.size(3) == _N_, "wkv: head size ", r.size(3), " but this build is compiled for ", _N_);
    TORCH_CHECK(r.size(1) > 0, "wkv: T must be positive");
    TORCH_CHECK(r.is_contiguous(), "wkv: r must be contiguous");
    dtype_code(r);
}

void raise_on_error(const char* err, const char* what) {
    TORCH_CHECK(err == nullptr, "wkv: ", what, " kernel failed: ", err ? err : "");
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

Tensor fp32_like_state(const Tensor& r) {
    return torch::empty({r.size(0), r.size(2), r.size(3), r.size(3)}, r.options().dtype(torch::kFloat32));
}

// ---------------------------------------------------------------------------------------
// RWKV-7
// ---------------------------------------------------------------------------------------

// Returns (y, sT, ckpt, sa); ckpt and sa are empty unless save_for_backward.
std::vector<Tensor> wkv7_forward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                 const Tensor& a, const Tensor& b, const std::optional<Tensor>& s0,
                                 bool save_for_backward, int64_t stream) {
    check_r(r);
    check_token(w, r, "w", true);
    check_token(k, r, "k");
    check_token(v, r, "v");
    check_token(a, r, "a");
    check_token(b, r, "b");
    const c10::DeviceGuard guard(r.device());
    const float* s0p = state_ptr(s0, r, "state");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int64_t n_chunks = (T + kChunk - 1) / kChunk;
    auto f32 = r.options().dtype(torch::kFloat32);
    Tensor y = torch::empty_like(r), sT = fp32_like_state(r);
    Tensor ckpt = save_for_backward ? torch::empty({B, H, n_chunks, N, N}, f32) : torch::empty({0}, f32);
    Tensor sa = save_for_backward ? torch::empty({B, T, H, N}, f32) : torch::empty({0}, f32);
    raise_on_error(
        wkv7_forward_launch(dtype_code(r), B, T, H, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(),
                            v.data_ptr(), a.data_ptr(), b.data_ptr(), s0p, y.data_ptr(), sT.data_ptr<float>(),
                            save_for_backward ? ckpt.data_ptr<float>() : nullptr,
                            save_for_backward ? sa.data_ptr<float>() : nullptr, as_stream(stream)),
        "wkv7 forward");
    return {y, sT, ckpt, sa};
}

// Returns (dr, dw, dk, dv, da, db, ds0); dw and ds0 are fp32.
std::vector<Tensor> wkv7_backward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                  const Tensor& a, const Tensor& b, const Tensor& dy, const Tensor& ckpt,
                                  const Tensor& sa, const std::optional<Tensor>& dsT, int64_t stream) {
    check_r(r);
    check_token(w, r, "w", true);
    check_token(k, r, "k");
    check_token(v, r, "v");
    check_token(a, r, "a");
    check_token(b, r, "b");
    check_token(dy, r, "dy");
    check_token(sa, r, "sa", true);
    const c10::DeviceGuard guard(r.device());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int64_t n_chunks = (T + kChunk - 1) / kChunk;
    check_cuda(ckpt, r, "ckpt");
    TORCH_CHECK(ckpt.scalar_type() == torch::kFloat32 &&
                    ckpt.sizes() == torch::IntArrayRef({B, H, n_chunks, N, N}),
                "wkv7 backward: ckpt has the wrong shape or dtype (was the forward run with save_for_backward?)");
    const float* dsTp = state_ptr(dsT, r, "dsT");
    auto f32 = r.options().dtype(torch::kFloat32);
    Tensor dr = torch::empty_like(r), dk = torch::empty_like(r), dv = torch::empty_like(r);
    Tensor da = torch::empty_like(r), db = torch::empty_like(r), dw = torch::empty_like(w);
    Tensor ds0 = fp32_like_state(r);
    Tensor scratch = torch::empty({B * H, kChunk, N, N}, f32);
    raise_on_error(
        wkv7_backward_launch(dtype_code(r), B, T, H, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(),
                             v.data_ptr(), a.data_ptr(), b.data_ptr(), dy.data_ptr(), ckpt.data_ptr<float>(),
                             sa.data_ptr<float>(), dsTp, scratch.data_ptr<float>(), dr.data_ptr(),
                             dw.data_ptr<float>(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(), db.data_ptr(),
                             ds0.data_ptr<float>(), as_stream(stream)),
        "wkv7 backward");
    return {dr, dw, dk, dv, da, db, ds0};
}

// ---------------------------------------------------------------------------------------
// RWKV-6
// ---------------------------------------------------------------------------------------

void check_u(const Tensor& u, const Tensor& r) {
    check_cuda(u, r, "u");
    TORCH_CHECK(u.scalar_type() == torch::kFloat32, "wkv6: u must be float32");
    TORCH_CHECK(u.sizes() == torch::IntArrayRef({r.size(2), r.size(3)}), "wkv6: u has shape ", u.sizes(),
                ", expected [H, N] = [", r.size(2), ", ", r.size(3), "]");
}

// Returns (y, sT, ckpt); ckpt is empty unless save_for_backward.
std::vector<Tensor> wkv6_forward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                 const Tensor& u, const std::optional<Tensor>& s0, bool save_for_backward,
                                 int64_t stream) {
    check_r(r);
    check_token(w, r, "w", true);
    check_token(k, r, "k");
    check_token(v, r, "v");
    check_u(u, r);
    const c10::DeviceGuard guard(r.device());
    const float* s0p = state_ptr(s0, r, "state");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int64_t n_chunks = (T + kChunk - 1) / kChunk;
    auto f32 = r.options().dtype(torch::kFloat32);
    Tensor y = torch::empty_like(r), sT = fp32_like_state(r);
    Tensor ckpt = save_for_backward ? torch::empty({B, H, n_chunks, N, N}, f32) : torch::empty({0}, f32);
    raise_on_error(wkv6_forward_launch(dtype_code(r), B, T, H, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(),
                                       v.data_ptr(), u.data_ptr<float>(), s0p, y.data_ptr(), sT.data_ptr<float>(),
                                       save_for_backward ? ckpt.data_ptr<float>() : nullptr, as_stream(stream)),
                   "wkv6 forward");
    return {y, sT, ckpt};
}

// Returns (dr, dw, dk, dv, du, ds0); dw, du and ds0 are fp32.
std::vector<Tensor> wkv6_backward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                  const Tensor& u, const Tensor& dy, const Tensor& ckpt,
                                  const std::optional<Tensor>& dsT, int64_t stream) {
    check_r(r);
    check_token(w, r, "w", true);
    check_token(k, r, "k");
    check_token(v, r, "v");
    check_token(dy, r, "dy");
    check_u(u, r);
    const c10::DeviceGuard guard(r.device());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int64_t n_chunks = (T + kChunk - 1) / kChunk;
    check_cuda(ckpt, r, "ckpt");
    TORCH_CHECK(ckpt.scalar_type() == torch::kFloat32 &&
                    ckpt.sizes() == torch::IntArrayRef({B, H, n_chunks, N, N}),
                "wkv6 backward: ckpt has the wrong shape or dtype (was the forward run with save_for_backward?)");
    const float* dsTp = state_ptr(dsT, r, "dsT");
    auto f32 = r.options().dtype(torch::kFloat32);
    Tensor dr = torch::empty_like(r), dk = torch::empty_like(r), dv = torch::empty_like(r);
    Tensor dw = torch::empty_like(w), ds0 = fp32_like_state(r);
    Tensor du_part = torch::empty({B, H, N}, f32);
    Tensor scratch = torch::empty({B * H, kChunk, N, N}, f32);
    raise_on_error(wkv6_backward_launch(dtype_code(r), B, T, H, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(),
                                        v.data_ptr(), u.data_ptr<float>(), dy.data_ptr(), ckpt.data_ptr<float>(),
                                        dsTp, scratch.data_ptr<float>(), dr.data_ptr(), dw.data_ptr<float>(),
                                        dk.data_ptr(), dv.data_ptr(), du_part.data_ptr<float>(),
                                        ds0.data_ptr<float>(), as_stream(stream)),
                   "wkv6 backward");
    return {dr, dw, dk, dv, du_part.sum(0), ds0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV-7 / RWKV-6 WKV CUDA kernels of rwkv-peft";
    m.attr("head_size") = _N_;
    m.attr("chunk_len") = kChunk;
    m.def("wkv7_forward", &wkv7_forward, "RWKV-7 WKV forward -> (y, sT, ckpt, sa)", py::arg("r"), py::arg("w"),
          py::arg("k"), py::arg("v"), py::arg("a"), py::arg("b"), py::arg("s0") = py::none(),
          py::arg("save_for_backward") = false, py::arg("stream") = 0);
    m.def("wkv7_backward", &wkv7_backward, "RWKV-7 WKV backward -> (dr, dw, dk, dv, da, db, ds0)", py::arg("r"),
          py::arg("w"), py::arg("k"), py::arg("v"), py::arg("a"), py::arg("b"), py::arg("dy"), py::arg("ckpt"),
          py::arg("sa"), py::arg("dsT") = py::none(), py::arg("stream") = 0);
    m.def("wkv6_forward", &wkv6_forward, "RWKV-6 WKV forward -> (y, sT, ckpt)", py::arg("r"), py::arg("w"),
          py::arg("k"), py::arg("v"), py::arg("u"), py::arg("s0") = py::none(),
          py::arg("save_for_backward") = false, py::arg("stream") = 0);
    m.def("wkv6_backward", &wkv6_backward, "RWKV-6 WKV backward -> (dr, dw, dk, dv, du, ds0)", py::arg("r"),
          py::arg("w"), py::arg("k"), py::arg("v"), py::arg("u"), py::arg("dy"), py::arg("ckpt"),
          py::arg("dsT") = py::none(), py::arg("stream") = 0);
}
