"""WKV recurrences of RWKV-7 and RWKV-6 in pure PyTorch.

Two forms of each recurrence:

* ``wkv*_sequential``: the plain per-token loop.  It is the reference for the tests
  (works in float64) and the baseline of ``bench/bench_wkv.py``.
* ``wkv*_chunked``: the same maths in chunked matrix form, used by default.  All
  intra-chunk work is done at once for every chunk with a few batched matmuls; only a
  short scan over chunks (one batched op per chunk) carries the state.  It is
  differentiable through ordinary autograd.

Conventions (batch first, heads split):

* ``r, w, k, v, a, b``: ``[B, T, H, N]``; ``u``: ``[H, N]``; ``state``: ``[B, H, N, N]``.
* ``w`` is the log of minus the log decay, as the official kernels take it: the
  per-step, per-channel decay is ``d = exp(-exp(w))``.
* RWKV-7 state is ``[N value, N key]``; RWKV-6 state is ``[N key, N value]`` (the
  layouts of the official ``rwkv`` package).
* Returns ``(y, new_state)``: ``y`` in the dtype of ``r``; ``new_state`` in the
  compute dtype (float64 for float64 inputs, float32 otherwise).  All internal state
  and accumulation is fp32 (or float64), whatever the input dtype (e.g. bf16).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "wkv7_sequential",
    "wkv7_chunked",
    "wkv7",
    "wkv6_sequential",
    "wkv6_chunked",
    "wkv6",
]

# Chunk lengths chosen by measurement with bench/bench_wkv.py on a 2-core CPU
# (N=64, T in 512..2048, B*H in 4..64, forward and forward+backward).
# RWKV-7: 16 and 32 are within a few per cent of each other; 64 is slower (the
# triangular solve and the [2L, 2L] score blocks grow as L^2 per token) and costs a
# larger exponent range in the factored decays (see _wkv7_intra).  32 halves the
# number of sequential scan steps against 16, which matters most for small B*H where
# per-op overhead dominates, so 32.
# RWKV-6: the diagonal block needs pairwise decay factors (an [L, L, N] tensor per
# chunk; memory and time grow linearly in L), while the scan cost falls as 1/L.
# 16 measured best (8: too many scan steps; 32: twice the pairwise work).
WKV7_CHUNK_LEN = 32
WKV6_CHUNK_LEN = 16


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(r: Tensor, *others: Tensor) -> None:
    if r.dim() != 4:
        raise ValueError(f"expected [B, T, H, N] inputs, got shape {tuple(r.shape)}")
    for x in others:
        if x.shape != r.shape:
            raise ValueError(f"input shapes differ: {tuple(r.shape)} vs {tuple(x.shape)}")


def _init_state(state: Tensor | None, B: int, H: int, N: int, dtype, device) -> Tensor:
    if state is None:
        return torch.zeros(B, H, N, N, dtype=dtype, device=device)
    if state.shape != (B, H, N, N):
        raise ValueError(f"state must be [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")
    return state.to(dtype)


def _pack(xs: list[Tensor], L: int, dt: torch.dtype) -> Tensor:
    """Stack [B, T, H, N] inputs into one chunked tensor [nc, B, H, G, L, N].

    One copy per input (casting to the compute dtype on the way); the time axis is
    zero padded to a multiple of L.  Chunks lead so that ``X[c]`` is contiguous for
    the scan over chunks.  The slice assignments are differentiable (CopySlices).
    """
    B, T, H, N = xs[0].shape
    full, rem = divmod(T, L)
    nc = full + (rem > 0)
    X = torch.empty(nc, B, H, len(xs), L, N, dtype=dt, device=xs[0].device)
    if rem:
        X[full].zero_()
    for g, x in enumerate(xs):
        if full:
            X[:full, :, :, g] = x[:, : full * L].reshape(B, full, L, H, N).permute(1, 0, 3, 2, 4)
        if rem:
            X[full, :, :, g, :rem] = x[:, full * L :].permute(0, 2, 1, 3)
    return X


def _unpack(y: Tensor, T: int) -> Tensor:
    """[nc, B, H, L, N] -> [B, T, H, N], dropping the padding."""
    nc, B, H, L, N = y.shape
    return y.permute(1, 0, 3, 2, 4).reshape(B, nc * L, H, N)[:, :T]


@functools.lru_cache(maxsize=32)
def _wkv7_mask(L: int, dt: torch.dtype, device: torch.device) -> Tensor:
    """Causal mask of the [2L, 2L] RWKV-7 score blocks [[ab, ak], [rb, rk]]."""
    strict = torch.ones(L, L, dtype=dt, device=device).tril(-1)
    incl = torch.ones(L, L, dtype=dt, device=device).tril(0)
    return torch.cat([torch.cat([strict, strict], 1), torch.cat([incl, incl], 1)], 0)


# ----------------------------------------------------------------------------------
# RWKV-7
# ----------------------------------------------------------------------------------


def wkv7_sequential(r, w, k, v, a, b, state=None) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV, one token at a time (reference form).

    Per head, with state S [N value, N key] and decay d_t = exp(-exp(w_t)):

        S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
        y_t = S_t r_t
    """
    _check_shapes(r, w, k, v, a, b)
    B, T, H, N = r.shape
    out_dtype = r.dtype
    dt = _compute_dtype(r)
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    d = torch.exp(-torch.exp(w))
    S = _init_state(state, B, H, N, dt, r.device)
    ys = []
    for t in range(T):
        Sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (
            S * d[:, t, :, None, :]
            + Sa[..., :, None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    y = torch.stack(ys, dim=1)
    return y.to(out_dtype), S


def wkv7_chunked(r, w, k, v, a, b, state=None, chunk_len=WKV7_CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV in chunked matrix form (same maths as :func:`wkv7_sequential`).

    Inside a chunk of length L (local times t = 1..L, state S_0 at its start), let
    c_t = sum_{i<=t} log d_i (per key channel, c_0 = 0), G_t = diag(e^{c_t}) and
    z_t = S_{t-1} a_t.  The recurrence unrolls to decayed linear attention over the
    two "values" z and v:

        S_t = S_0 G_t + sum_{s<=t} (z_s b_s^T + v_s k_s^T) G_t G_s^-1
        z_t = S_0 G_{t-1} a_t + sum_{s<t} (z_s b_s^T + v_s k_s^T) G_{t-1} G_s^-1 a_t

    With rows indexed by time, the second line is the unit lower-triangular system
    (I - M_ab) Z = A0 S_0^T + M_ak V, where M_xy[t, s] = x_t^T G_{t-1} G_s^-1 y_s
    (s < t) and A0[t] = G_{t-1} a_t.  So Z = W S_0^T + U with W = T A0 and
    U = T M_ak V, T = (I - M_ab)^-1 (one batched triangular solve): a WY/UT-style form
    of the product of the chunk's L diag-plus-rank-one transitions.  Then

        Z^T = S_0 W^T + U^T
        S_L = S_0 G_L + Z^T B_L + V^T K_L            (B_L[s] = G_L G_s^-1 b_s, same K_L)
        Y   = R0 S_0^T + M_rb Z + M_rk V             (R0[t] = G_t r_t, M_r* inclusive)

    Everything except the first two lines is computed for all chunks at once with
    batched matmuls; the scan over chunks is two batched matmuls per chunk.

    Numerics: relies on the RWKV-7 bound w <= -0.5 (the model computes
    w = -softplus(-x) - 0.5), i.e. log d >= -exp(-0.5) ~ -0.61 per step.  The decay
    factors of the scores M are split as e^{c_t - m} e^{m - c_s} around the middle
    m = c_L / 2 of the chunk, so each factor lies within e^{+-0.61 L / 2} (e^{+-9.7}
    for L = 32): no overflow in fp32 and no loss of relative precision.  The bound is
    not checked at run time (that would cost a pass over w); much larger decays
    (w >> 0) with long chunks would overflow.
    """
    _check_shapes(r, w, k, v, a, b)
    B, T, H, N = r.shape
    L = int(chunk_len)
    if L < 1:
        raise ValueError("chunk_len must be >= 1")
    out_dtype = r.dtype
    dt = _compute_dtype(r)
    S = _init_state(state, B, H, N, dt, r.device)

    # One packed tensor [nc, B, H, 6, L, N] (a single copy of each input); the slot
    # order keeps (a, r) and (b, k) adjacent so both score operands come from one
    # broadcast multiply.  Slot 0 holds -log d = exp(w); padded steps are zeros, i.e.
    # d = 1 and a = b = k = v = 0: they leave the state unchanged.
    X = _pack([torch.exp(w.to(dt)), a, r, b, k, v], L, dt)
    nc = X.shape[0]
    BH = B * H
    ew = X[:, :, :, 0]  # -log d_t > 0
    csum = torch.cumsum(ew, dim=-2)  # -c_t
    h = 0.5 * csum[..., -1:, :]  # -m, m = c_L / 2
    lr = h - csum  # c_t - m, within [-h, h]
    # Query-side factors e^{c_{t-1} - m} (for a) and e^{c_t - m} (for r).
    q = X[:, :, :, 1:3] * torch.exp(torch.stack([lr + ew, lr], dim=3))  # [a~; r~]
    kb = X[:, :, :, 3:5] * torch.exp(-lr).unsqueeze(3)  # [b~; k~]  (e^{m - c_s})
    q2 = q.view(nc, B, H, 2 * L, N)
    kb2 = kb.view(nc, B, H, 2 * L, N)
    # All four score blocks in one matmul, masked causally: strictly lower for the
    # a-rows (z_t only sees s < t), inclusive for the r-rows (y_t sees s <= t).
    P = (q2 @ kb2.transpose(-1, -2)) * _wkv7_mask(L, dt, r.device)
    M_ab, M_ak = P[..., :L, :L], P[..., :L, L:]
    M_rb, M_rk = P[..., L:, :L], P[..., L:, L:]

    # T = (I - M_ab)^-1: unitriangular solve (the diagonal of -M_ab, zero, is ignored).
    eye = torch.eye(L, dtype=dt, device=r.device)
    Tinv = torch.linalg.solve_triangular(-M_ab, eye, upper=False, unitriangular=True)
    em = torch.exp(-h)  # e^{m}: moves factors from the middle to the chunk start/end
    qe = q * em.unsqueeze(3)  # [A0; R0]   (e^{c_{t-1}}, e^{c_t}: <= 1)
    kbe = kb * em.unsqueeze(3)  # [B_L; K_L] (e^{c_L - c_s}: <= 1)
    vv = X[:, :, :, 5]
    W = Tinv @ qe[:, :, :, 0]
    U = (Tinv @ M_ak) @ vv
    VK = vv.transpose(-1, -2) @ kbe[:, :, :, 1]  # V^T K_L
    g = torch.exp(-2.0 * h)  # e^{c_L}, [nc, B, H, 1, N]

    # Sequential scan over chunks (batched over B*H).
    Wt = W.view(nc, BH, L, N).transpose(-1, -2)
    Ut = U.view(nc, BH, L, N).transpose(-1, -2)
    BL = kbe[:, :, :, 0].reshape(nc, BH, L, N)
    VK = VK.view(nc, BH, N, N)
    g = g.view(nc, BH, 1, N)
    S = S.reshape(BH, N, N)
    starts, zs = [], []
    for i in range(nc):
        starts.append(S)
        Zt = torch.baddbmm(Ut[i], S, Wt[i])  # Z^T = S_0 W^T + U^T, [BH, N, L]
        zs.append(Zt)
        S = torch.baddbmm(torch.addcmul(VK[i], S, g[i]), Zt, BL[i])
    S0t = torch.stack(starts).view(nc, B, H, N, N).transpose(-1, -2)
    Z = torch.stack(zs).view(nc, B, H, N, L).transpose(-1, -2)

    # Outputs of all chunks at once.
    y = qe[:, :, :, 1] @ S0t + M_rb @ Z + M_rk @ vv
    return _unpack(y, T).to(out_dtype), S.view(B, H, N, N)


def wkv7(r, w, k, v, a, b, state=None) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV, default implementation (currently :func:`wkv7_chunked`)."""
    return wkv7_chunked(r, w, k, v, a, b, state)


# ----------------------------------------------------------------------------------
# RWKV-6
# ----------------------------------------------------------------------------------


def wkv6_sequential(r, w, k, v, u, state=None) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV, one token at a time (reference form).

    Per head, with state S [N key, N value] and decay d_t = exp(-exp(w_t)):

        y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S_{t-1}[i, j])
        S_t    = diag(d_t) S_{t-1} + k_t v_t^T
    """
    _check_shapes(r, w, k, v)
    B, T, H, N = r.shape
    if u.shape != (H, N):
        raise ValueError(f"u must be [H, N] = {(H, N)}, got {tuple(u.shape)}")
    out_dtype = r.dtype
    dt = _compute_dtype(r)
    r, w, k, v, u = (x.to(dt) for x in (r, w, k, v, u))
    d = torch.exp(-torch.exp(w))
    S = _init_state(state, B, H, N, dt, r.device)
    ys = []
    for t in range(T):
        rt, kt, vt = r[:, t], k[:, t], v[:, t]
        bonus = (rt * u * kt).sum(-1, keepdim=True)  # [B, H, 1]
        ys.append(torch.einsum("bhi,bhij->bhj", rt, S) + bonus * vt)
        S = d[:, t, :, :, None] * S + kt[..., :, None] * vt[..., None, :]
    y = torch.stack(ys, dim=1)
    return y.to(out_dtype), S


def wkv6_chunked(r, w, k, v, u, state=None, chunk_len=WKV6_CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV in chunked form (same maths as :func:`wkv6_sequential`).

    Inside a chunk (local t = 1..L, state S_0 at its start, c_t = sum_{i<=t} log d_i
    per key channel, c_0 = 0):

        y_t = (r_t e^{c_{t-1}})^T S_0 + sum_{s<t} A[t, s] v_s + (r_t . u . k_t) v_t
        A[t, s] = sum_i r_t[i] k_s[i] e^{c_{t-1}[i] - c_s[i]}          (s < t)
        S_L = diag(e^{c_L}) S_0 + sum_s (k_s e^{c_L - c_s}) v_s^T

    RWKV-6 decays are unbounded (log d = -exp(w) can be -20 per step), so A's decay
    factors are computed from pairwise differences c_{t-1} - c_s <= 0 (never as a
    product of a large and a small exponential); every exponent used is <= 0, so the
    form is finite and accurate for any w.  The scan over chunks is an elementwise
    decay plus add per chunk.
    """
    _check_shapes(r, w, k, v)
    B, T, H, N = r.shape
    if u.shape != (H, N):
        raise ValueError(f"u must be [H, N] = {(H, N)}, got {tuple(u.shape)}")
    L = int(chunk_len)
    if L < 1:
        raise ValueError("chunk_len must be >= 1")
    out_dtype = r.dtype
    dt = _compute_dtype(r)
    S = _init_state(state, B, H, N, dt, r.device)
    u = u.to(dt)

    # Packed [nc, B, H, 4, L, N]; slot 0 holds -log d = exp(w).  Padded steps are
    # zeros: d = 1, r = k = v = 0, so they change neither outputs nor state.
    X = _pack([torch.exp(w.to(dt)), r, k, v], L, dt)
    nc = X.shape[0]
    BH = B * H
    ew, rr, kk, vv = X.unbind(3)
    csum = torch.cumsum(ew, dim=-2)  # -c_t
    cprev = csum - ew  # -c_{t-1}
    csum_end = csum[..., -1:, :]  # -c_L

    # Pairwise exponents c_{t-1} - c_s = csum_s - cprev_t, [.., L(t), L(s), N].  They
    # are <= 0 for s < t; the s >= t entries (possibly > 0) are clamped to 0 so they
    # cannot overflow, and are masked out of A below.
    diff = (csum.unsqueeze(-3) - cprev.unsqueeze(-2)).clamp(max=0.0)
    # A[t, s] = sum_i r_t[i] (e^{diff[t, s, i]} k_s[i]): a batched mat-vec per (chunk, t).
    A = (rr.unsqueeze(-2) @ (torch.exp(diff) * kk.unsqueeze(-3)).transpose(-1, -2)).squeeze(-2)
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    bonus = (rr * u.unsqueeze(-2) * kk).sum(-1)  # r_t . u . k_t
    A = torch.where(strict, A, A.new_zeros(())) + torch.diag_embed(bonus)
    y_intra = A @ vv

    # Chunk-level state map S_L = diag(e^{c_L}) S_0 + K_L^T V, all exponents <= 0.
    g = torch.exp(-csum_end).transpose(-1, -2).reshape(nc, BH, N, 1)
    C_c = ((kk * torch.exp(csum - csum_end)).transpose(-1, -2) @ vv).view(nc, BH, N, N)
    S = S.reshape(BH, N, N)
    starts = []
    for i in range(nc):
        starts.append(S)
        S = torch.addcmul(C_c[i], g[i], S)
    S0 = torch.stack(starts).view(nc, B, H, N, N)

    y = (rr * torch.exp(-cprev)) @ S0 + y_intra
    return _unpack(y, T).to(out_dtype), S.view(B, H, N, N)


def wkv6(r, w, k, v, u, state=None) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV, default implementation (currently :func:`wkv6_chunked`)."""
    return wkv6_chunked(r, w, k, v, u, state)
