// RWKV-7 WKV forward and backward kernels.
//
// Per (batch, head), with state S [N value, N key] and decay d_t = exp(-exp(w_t)):
//
//     sa_t = S_{t-1} a_t                                  (a vector over values)
//     S_t  = S_{t-1} diag(d_t) + sa_t b_t^T + v_t k_t^T
//     y_t  = S_t r_t
//
// Forward: thread i owns row i of S (value i), so sa_i and y_i are sums over the thread's
// own registers, and the per-step vectors r, d, k, a, b (shared by all rows) are read from
// shared memory. The state at the start of every 16-step chunk and every sa_t are saved
// for the backward pass.
//
// Backward, with M = dL/dS_t (the gradient flowing back into the state after step t):
//
//     M      += dy_t r_t^T                       (y_t reads S_t)
//     dr_t[j] = sum_i S_t[i,j] dy_t[i]
//     dd_t[j] = sum_i M[i,j] S_{t-1}[i,j]        (then dw = dd * d * -exp(w))
//     db_t[j] = sum_i M[i,j] sa_t[i]
//     dk_t[j] = sum_i M[i,j] v_t[i]
//     dv_t[i] = sum_j M[i,j] k_t[j]
//     dsa[i]  = sum_j M[i,j] b_t[j]
//     da_t[j] = sum_i dsa[i] S_{t-1}[i,j]
//     dL/dS_{t-1} = M diag(d_t) + dsa a_t^T
//
// The backward block has 2N threads in two roles. Column thread j (threads 0..N-1)
// computes the key-indexed gradients (dr, dd, db, dk, da) from column j of S_{t-1} and of
// M; row thread i (threads N..2N-1) computes the value-indexed ones (dv, dsa) from row i
// of M. M is kept twice, as a column in a column thread and as a row in a row thread, and
// both copies are updated elementwise; only dsa crosses threads (one barrier per step).
// Two roles instead of one thread doing both keep a thread's arrays at 2N floats (the
// column's S_{t-1} and M) instead of 3N: at N = 64 that fits the 255 registers a thread
// can have (one thread with three rows spilled 300-400 bytes on sm_75-sm_89), and twice
// the warps hide more latency.
//
// S_{t-1} is needed in reverse time order. The backward walks the chunks from last to
// first; for each chunk it reloads the checkpoint (the state at the chunk start) and
// replays the chunk forward in column layout with the saved sa_t (no reductions needed),
// writing each S_{t-1} column to a per-block scratch buffer (16 N x N fp32 matrices, read
// back by the same thread, so L2-resident and coalesced), then walks the chunk's steps
// back reading them. The replay uses the forward's own fp32 expression, so the backward
// sees the forward's states up to rounding: no division by the decay ("backstepping"),
// whose error grows as 1/d per step.
//
// T needs no padding: the last chunk is simply shorter.

#include "wkv.h"
#include "wkv_common.cuh"

namespace wkv {
namespace {

// Sum of four partial accumulators (the loops below keep 2-4 independent partial sums
// so the dependent FMA chains are shorter: these kernels run few warps per SM and are
// latency bound).
__device__ __forceinline__ float total(const float (&acc)[4]) {
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <typename F, int N>
__global__ void __launch_bounds__(N)
wkv7_forward_kernel(const int T, const int H, const F* __restrict__ r_, const float* __restrict__ w_,
                    const F* __restrict__ k_, const F* __restrict__ v_, const F* __restrict__ a_,
                    const F* __restrict__ b_, const float* __restrict__ s0_, F* __restrict__ y_,
                    float* __restrict__ sT_, float* __restrict__ ckpt_, float* __restrict__ sa_) {
    const int bh = blockIdx.x, bb = bh / H, hh = bh % H, n = threadIdx.x;
    const int n_chunks = (T + CHUNK - 1) / CHUNK;

    // The chunk's per-step vectors: [CHUNK][N] each.
    WKV_SHARED_FLOATS(smem);
    float(*r)[N] = reinterpret_cast<float(*)[N]>(smem);
    float(*d)[N] = r + CHUNK;
    float(*k)[N] = d + CHUNK;
    float(*v)[N] = k + CHUNK;
    float(*a)[N] = v + CHUNK;
    float(*b)[N] = a + CHUNK;

    // Row n of the state (value n), in registers.
    float state[N];
    const int64_t state_row = (static_cast<int64_t>(bh) * N + n) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) state[j] = s0_ ? s0_[state_row + j] : 0.f;

    for (int c = 0; c < n_chunks; ++c) {
        const int t0 = c * CHUNK, len = min(CHUNK, T - t0);
        if (ckpt_) {  // the state at the chunk start, [B, H, n_chunks, N, N]
            float4* dst = reinterpret_cast<float4*>(ckpt_ + ((static_cast<int64_t>(bh) * n_chunks + c) * N + n) * N);
#pragma unroll
            for (int j = 0; j < N / 4; ++j)
                dst[j] = make_float4(state[4 * j], state[4 * j + 1], state[4 * j + 2], state[4 * j + 3]);
        }
        __syncthreads();  // every thread is done with the previous chunk's vectors
        for (int s = 0; s < len; ++s) {
            const int64_t idx = token_index<N>(bb, t0 + s, hh, T, H, n);
            r[s][n] = to_float(r_[idx]);
            d[s][n] = expf(-expf(w_[idx]));
            k[s][n] = to_float(k_[idx]);
            v[s][n] = to_float(v_[idx]);
            a[s][n] = to_float(a_[idx]);
            b[s][n] = to_float(b_[idx]);
        }
        __syncthreads();

        for (int s = 0; s < len; ++s) {
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < N; ++j) acc[j & 3] += state[j] * a[s][j];
            const float sa = total(acc);
            const float vn = v[s][n];
            float yacc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < N; ++j) {
                // Same expression as the backward's replay, so both see the same states.
                const float x = state[j] * d[s][j] + (sa * b[s][j] + vn * k[s][j]);
                state[j] = x;
                yacc[j & 3] += x * r[s][j];
            }
            const int64_t idx = token_index<N>(bb, t0 + s, hh, T, H, n);
            y_[idx] = from_float<F>(total(yacc));
            if (sa_) sa_[idx] = sa;
        }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) sT_[state_row + j] = state[j];
}

template <typename F, int N>
__global__ void __launch_bounds__(2 * N)
wkv7_backward_kernel(const int T, const int H, const F* __restrict__ r_, const float* __restrict__ w_,
                     const F* __restrict__ k_, const F* __restrict__ v_, const F* __restrict__ a_,
                     const F* __restrict__ b_, const F* __restrict__ dy_, const float* __restrict__ ckpt_,
                     const float* __restrict__ sa_, const float* __restrict__ dsT_,
                     float* __restrict__ scratch_, F* __restrict__ dr_, float* __restrict__ dw_,
                     F* __restrict__ dk_, F* __restrict__ dv_, F* __restrict__ da_, F* __restrict__ db_,
                     float* __restrict__ ds0_) {
    const int bh = blockIdx.x, bb = bh / H, hh = bh % H;
    const bool column_role = threadIdx.x < N;
    const int n = column_role ? threadIdx.x : threadIdx.x - N;  // key index j, or value index i
    const int n_chunks = (T + CHUNK - 1) / CHUNK;

    WKV_SHARED_FLOATS(smem);
    float(*r)[N] = reinterpret_cast<float(*)[N]>(smem);
    float(*d)[N] = r + CHUNK;      // decay
    float(*nw)[N] = d + CHUNK;     // -exp(w) = log(d), for dw
    float(*k)[N] = nw + CHUNK;
    float(*v)[N] = k + CHUNK;
    float(*a)[N] = v + CHUNK;
    float(*b)[N] = a + CHUNK;
    float(*dy)[N] = b + CHUNK;
    float(*sa)[N] = dy + CHUNK;
    float(*dsa)[N] = sa + CHUNK;   // [2][N], double-buffered by step parity
    const int64_t mat = static_cast<int64_t>(bh) * N * N;

    if (column_role) {
        // This block's S_{t-1} columns of the current chunk: [CHUNK][N i][N j], thread j
        // writes and reads element [s][i][j] (coalesced, and only ever its own).
        float* hist = scratch_ + static_cast<int64_t>(bh) * CHUNK * N * N;
        float scol[N];   // S_{t-1}[:, n]
        float dscol[N];  // M[:, n]
#pragma unroll
        for (int i = 0; i < N; ++i) dscol[i] = dsT_ ? dsT_[mat + i * N + n] : 0.f;

        for (int c = n_chunks - 1; c >= 0; --c) {
            const int t0 = c * CHUNK, len = min(CHUNK, T - t0);
            __syncthreads();  // every thread is done with the previous chunk's vectors
            for (int s = 0; s < len; ++s) {  // this role stages r, d, nw, k, v; the other the rest
                const int64_t idx = token_index<N>(bb, t0 + s, hh, T, H, n);
                const float ew = expf(w_[idx]);
                r[s][n] = to_float(r_[idx]);
                d[s][n] = expf(-ew);
                nw[s][n] = -ew;
                k[s][n] = to_float(k_[idx]);
                v[s][n] = to_float(v_[idx]);
            }
            __syncthreads();

            // Replay the chunk from its checkpoint: column n of S_{t-1} for every step.
            const float* ck = ckpt_ + (static_cast<int64_t>(bh) * n_chunks + c) * N * N;
#pragma unroll
            for (int i = 0; i < N; ++i) scol[i] = ck[i * N + n];
            for (int s = 0; s < len; ++s) {
                float* h = hist + s * N * N;
                const float dn = d[s][n], bn = b[s][n], kn = k[s][n];
#pragma unroll
                for (int i = 0; i < N; ++i) {
                    h[i * N + n] = scol[i];
                    scol[i] = scol[i] * dn + (sa[s][i] * bn + v[s][i] * kn);
                }
            }

            // Walk the chunk back.
            for (int s = len - 1; s >= 0; --s) {
                const float* h = hist + s * N * N;
#pragma unroll
                for (int i = 0; i < N; ++i) scol[i] = h[i * N + n];
                const float rn = r[s][n], dn = d[s][n], kn = k[s][n], an = a[s][n], bn = b[s][n];

                // M += dy_t r_t^T (the row threads do the same to their copy).
#pragma unroll
                for (int i = 0; i < N; ++i) dscol[i] += dy[s][i] * rn;

                // Column reductions over i (six independent chains).
                float sdy = 0.f, sady = 0.f, vdy = 0.f, dd = 0.f, db = 0.f, dk = 0.f;
#pragma unroll
                for (int i = 0; i < N; ++i) {
                    const float dyi = dy[s][i], sai = sa[s][i], vi = v[s][i];
                    sdy += scol[i] * dyi;
                    sady += sai * dyi;
                    vdy += vi * dyi;
                    dd += dscol[i] * scol[i];
                    db += dscol[i] * sai;
                    dk += dscol[i] * vi;
                }
                __syncthreads();  // dsa complete (the other buffer is free for the next step)

                // da, and M <- dL/dS_{t-1} = M diag(d_t) + dsa a_t^T.
                float da = 0.f;
#pragma unroll
                for (int i = 0; i < N; ++i) {
                    const float q = dsa[s & 1][i];
                    da += q * scol[i];
                    dscol[i] = dscol[i] * dn + q * an;
                }

                // dr_t[n] = sum_i S_t[i,n] dy_t[i], with S_t[:,n] = S_{t-1}[:,n] d_n + sa b_n + v k_n.
                const int64_t idx = token_index<N>(bb, t0 + s, hh, T, H, n);
                dr_[idx] = from_float<F>(dn * sdy + bn * sady + kn * vdy);
                dw_[idx] = dd * dn * nw[s][n];
                dk_[idx] = from_float<F>(dk);
                da_[idx] = from_float<F>(da);
                db_[idx] = from_float<F>(db);
            }
        }
#pragma unroll
        for (int i = 0; i < N; ++i) ds0_[mat + i * N + n] = dscol[i];
    } else {
        float dsrow[N];  // M[n, :]
#pragma unroll
        for (int j = 0; j < N; ++j) dsrow[j] = dsT_ ? dsT_[mat + n * N + j] : 0.f;

        // The same barriers as the column role, in the same order.
        for (int c = n_chunks - 1; c >= 0; --c) {
            const int t0 = c * CHUNK, len = min(CHUNK, T - t0);
            __syncthreads();
            for (int s = 0; s < len; ++s) {
                const int64_t idx = token_index<N>(bb, t0 + s, hh, T, H, n);
                a[s][n] = to_float(a_[idx]);
                b[s][n] = to_float(b_[idx]);
                dy[s][n] = to_float(dy_[idx]);
                sa[s][n] = sa_[idx];
            }
            __syncthreads();

            for (int s = len - 1; s >= 0; --s) {
                const float dyn = dy[s][n];
#pragma unroll
                for (int j = 0; j < N; ++j) dsrow[j] += dyn * r[s][j];

                // Row reductions over j.
                float dvacc[2] = {0.f, 0.f}, dsacc[2] = {0.f, 0.f};
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    dvacc[j & 1] += dsrow[j] * k[s][j];
                    dsacc[j & 1] += dsrow[j] * b[s][j];
                }
                const float dsan = dsacc[0] + dsacc[1];
                dsa[s & 1][n] = dsan;
                __syncthreads();  // dsa complete (the other buffer is free for the next step)

#pragma unroll
                for (int j = 0; j < N; ++j) dsrow[j] = dsrow[j] * d[s][j] + dsan * a[s][j];
                dv_[token_index<N>(bb, t0 + s, hh, T, H, n)] = from_float<F>(dvacc[0] + dvacc[1]);
            }
        }
    }
}

template <typename F>
const char* forward(int B, int T, int H, const void* r, const float* w, const void* k, const void* v,
                    const void* a, const void* b, const float* s0, void* y, float* sT, float* ckpt,
                    float* sa, void* stream) {
    constexpr int N = _N_;
    const size_t smem = 6 * CHUNK * N * sizeof(float);
    return launch(wkv7_forward_kernel<F, N>, B * H, N, smem, stream, T, H, static_cast<const F*>(r), w,
                  static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(a),
                  static_cast<const F*>(b), s0, static_cast<F*>(y), sT, ckpt, sa);
}

template <typename F>
const char* backward(int B, int T, int H, const void* r, const float* w, const void* k, const void* v,
                     const void* a, const void* b, const void* dy, const float* ckpt, const float* sa,
                     const float* dsT, float* scratch, void* dr, float* dw, void* dk, void* dv, void* da,
                     void* db, float* ds0, void* stream) {
    constexpr int N = _N_;
    const size_t smem = (9 * CHUNK + 2) * N * sizeof(float);
    return launch(wkv7_backward_kernel<F, N>, B * H, 2 * N, smem, stream, T, H, static_cast<const F*>(r), w,
                  static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(a),
                  static_cast<const F*>(b), static_cast<const F*>(dy), ckpt, sa, dsT, scratch,
                  static_cast<F*>(dr), dw, static_cast<F*>(dk), static_cast<F*>(dv), static_cast<F*>(da),
                  static_cast<F*>(db), ds0);
}

}  // namespace
}  // namespace wkv

const char* wkv7_forward_launch(int dtype, int B, int T, int H, const void* r, const float* w,
                                const void* k, const void* v, const void* a, const void* b,
                                const float* s0, void* y, float* sT, float* ckpt, float* sa,
                                void* stream) {
    return wkv::with_element_type(dtype, [&](auto type) {
        using F = typename decltype(type)::type;
        return wkv::forward<F>(B, T, H, r, w, k, v, a, b, s0, y, sT, ckpt, sa, stream);
    });
}

const char* wkv7_backward_launch(int dtype, int B, int T, int H, const void* r, const float* w,
                                 const void* k, const void* v, const void* a, const void* b,
                                 const void* dy, const float* ckpt, const float* sa,
                                 const float* dsT, float* scratch, void* dr, float* dw, void* dk,
                                 void* dv, void* da, void* db, float* ds0, void* stream) {
    return wkv::with_element_type(dtype, [&](auto type) {
        using F = typename decltype(type)::type;
        return wkv::backward<F>(B, T, H, r, w, k, v, a, b, dy, ckpt, sa, dsT, scratch, dr, dw, dk, dv, da,
                                db, ds0, stream);
    });
}
