"""WKV recurrences of RWKV-7 and RWKV-6 in pure PyTorch.

Two forms of each recurrence:

* ``wkv*_sequential``: the plain per-token loop.  It is the reference for the tests
  (works in float64) and the baseline of ``bench/bench_wkv.py``.
* ``wkv*_chunked``: the same maths in chunked matrix form, used by default on the
  CPU.  All intra-chunk work is done at once for every chunk with a few batched
  matmuls; only a short scan over chunks (one to three batched ops per chunk) carries
  the state.  Differentiable through ordinary autograd (no custom backward).  On the
  CPU, large inputs are processed in independent groups of (batch, head) pairs so that
  the temporaries stay in cache (see ``_in_groups``).

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

__all__ = ["wkv7_sequential", "wkv7_chunked", "wkv6_sequential", "wkv6_chunked"]

# Chunk lengths, chosen by measurement on the 2-core CPU (N = 64, B*H in 4..64,
# T in 512..2048, forward and forward+backward, 16 / 32 / 64 compared in the same runs):
# * RWKV-7: 32.  Per token, the score blocks and the triangular solve cost O(L N) and
#   O(L^2), the scan and the state terms O(N^2) (independent of L), and the number of
#   sequential scan steps is T / L.  32 was fastest everywhere (16: 0-15% slower,
#   mostly from twice the scan steps; 64: 15-40% slower from the L-sized blocks).
#   The key-side decay factors then stay below e^{0.61 * 32} ~ 3e8 (see below).
# * RWKV-6: 32.  The recursive halving costs log2(L) levels of elementwise work per
#   token, the scan T / L steps.  On a quiet machine (B in 1, 4; H in 4, 16; T = 512)
#   32 beat 16 on every forward+backward case by 5-17% and tied on forward; 8 was
#   20-50% slower, 64 3-10% slower.  (A first comparison under heavy load had put 16
#   and 32 within noise.)
WKV7_CHUNK_LEN = 32
WKV6_CHUNK_LEN = 32


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(r: Tensor, *others: Tensor) -> None:
    if r.dim() != 4:
        raise ValueError(f"expected [B, T, H, N] inputs, got shape {tuple(r.shape)}")
    for x in others:
        if x.shape != r.shape:
            raise ValueError(f"input shapes differ: {tuple(r.shape)} vs {tuple(x.shape)}")


def _check_u(u: Tensor, H: int, N: int) -> None:
    if u.shape != (H, N):
        raise ValueError(f"u must be [H, N] = {(H, N)}, got {tuple(u.shape)}")


def _check_state(state: Tensor, B: int, H: int, N: int) -> None:
    if state.shape != (B, H, N, N):
        raise ValueError(f"state must be [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")


def _init_state(state: Tensor | None, B: int, H: int, N: int, dtype, device) -> Tensor:
    if state is None:
        return torch.zeros(B, H, N, N, dtype=dtype, device=device)
    _check_state(state, B, H, N)
    return state.to(dtype)


# Largest per-chunk total decay -c_L whose factor e^{-c_L} is safe to form.
_MAX_EXPONENT = {torch.float32: 60.0, torch.float64: 600.0}


def _chunked(x: Tensor, L: int) -> Tensor:
    """View [B, T, H, N] as chunks [nc, B, H, L, N] (a strided view, no copy).

    When T is not a multiple of L the time axis is first zero padded (a copy).
    Elementwise ops that take such a view as their second operand, with a contiguous
    chunk-layout tensor first, write their result in contiguous chunk layout: the
    re-layout costs no separate pass.
    """
    B, T, H, N = x.shape
    pad = (-T) % L
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(B, (T + pad) // L, L, H, N).permute(1, 0, 3, 2, 4)


def _cached_constant(maxsize: int):
    """lru_cache for functions that build constant tensors.  The cached tensors
    outlive the call, so they are built outside inference mode: an inference tensor
    cached by a first call under torch.inference_mode() would make every later
    training step fail in backward."""

    def wrap(fn):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def build(*args):
            with torch.inference_mode(False):
                return fn(*args)

        return build

    return wrap


@_cached_constant(maxsize=32)
def _tril_masks(L: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """0/1 masks [L, L] of the strictly lower and the lower (inclusive) triangle."""
    ones = torch.ones(L, L, dtype=dtype)
    return ones.tril(-1).to(device), ones.tril().to(device)


@_cached_constant(maxsize=16)
def _wkv6_tile_index(L: int, device: torch.device) -> Tensor:
    """Index map from the concatenated halving pieces of wkv6_chunked to a row-major
    [L, L] matrix: pieces are [diagonal (L), level m = 1, 2, .., L/2 quadrants
    (blocks, rows, cols), one zero]; every entry above the diagonal maps to the zero."""
    idx = torch.full((L, L), -1, dtype=torch.long)
    idx[range(L), range(L)] = torch.arange(L)
    pos, m = L, 1
    while m < L:
        for blk in range(L // (2 * m)):
            for i in range(m):
                for j in range(m):
                    idx[blk * 2 * m + m + i, blk * 2 * m + j] = pos
                    pos += 1
        m *= 2
    idx[idx < 0] = pos  # the trailing zero
    return idx.flatten().to(device)


# Work on at most this many elements (B * T * H * N) per call of a chunked core.  The
# chunked forms make a few dozen passes over [B, T, H, N]-sized temporaries; kept
# near 2 MB (fp32) each, they stay in the CPU caches, which on the 2-core test
# machine made large calls up to ~1.8x faster (e.g. B=4, T=2048, H=16).
_GROUP_ELEMS = 1 << 19


def _in_groups(core, xs: list[Tensor], head_xs: list[Tensor], S: Tensor, L: int, dt):
    """Run ``core(*xs, *head_xs, S, L, dt)`` on groups of (batch, head) pairs of at
    most ~_GROUP_ELEMS elements and concatenate the results.

    xs are [B, T, H, N], head_xs [H, ...], S [B, H, N, N].  Groups are independent
    (each carries its own state), so this only bounds the working set.  split() /
    cat() keep the backward to one concatenation per level.
    """
    B, T, H, N = xs[0].shape
    pairs = max(1, _GROUP_ELEMS // (T * N))  # (batch, head) pairs per group
    if pairs >= B * H or S.device.type != "cpu":
        return core(*xs, *head_xs, S, L, dt)
    if pairs >= H:  # whole batch rows
        parts = zip(*(x.split(pairs // H, 0) for x in xs), S.split(pairs // H, 0))
        outs = [core(*p[:-1], *head_xs, p[-1], L, dt) for p in parts]
        return torch.cat([o[0] for o in outs], 0), torch.cat([o[1] for o in outs], 0)
    ys, ss = [], []
    for row in zip(*(x.split(1, 0) for x in xs), S.split(1, 0)):  # one batch row,
        parts = zip(  # groups of heads
            *(x.split(pairs, 2) for x in row[:-1]), *(h.split(pairs, 0) for h in head_xs),
            row[-1].split(pairs, 1),
        )
        outs = [core(*p[:-1], p[-1], L, dt) for p in parts]
        ys.append(torch.cat([o[0] for o in outs], 2))
        ss.append(torch.cat([o[1] for o in outs], 1))
    return torch.cat(ys, 0), torch.cat(ss, 0)


def _unpack(y: Tensor, T: int) -> Tensor:
    """[nc, B, H, L, N] -> [B, T, H, N], dropping the padding."""
    nc, B, H, L, N = y.shape
    y = y.permute(1, 0, 3, 2, 4).reshape(B, nc * L, H, N)
    return y[:, :T] if nc * L != T else y


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

        S_t = (S_0 + sum_{s<=t} z_s b~_s^T + v_s k~_s^T) G_t,    b~_s = G_s^-1 b_s, k~ alike
        z_t = S_{t-1} a_t = S_0 a~_t + sum_{s<t} z_s (b~_s . a~_t) + v_s (k~_s . a~_t),
              a~_t = G_{t-1} a_t

    With rows indexed by time and M_xy[t, s] = x~_t . y~_s, the second line is the unit
    lower-triangular system (I - M_ab) Z = A~ S_0^T + M_ak V (M_ak strictly lower),
    so Z = W S_0^T + U with W = T A~, U = T M_ak V and T = (I - M_ab)^-1 (one batched
    triangular solve): a WY/UT-style form of the product of the chunk's L
    diag-plus-rank-one transitions.  With r~_t = G_t r_t:

        Z^T = S_0 W^T + U^T                          (scan, per chunk)
        S_L = (S_0 + Z^T B~ + V^T K~) G_L            (scan, per chunk)
        Y   = R~ S_0^T + M_rb Z + M_rk V             (M_r* inclusive lower)

    All score blocks, the solve, W, U, V^T K~ and Y are computed for every chunk at
    once with batched matmuls; the scan over chunks is two small batched matmuls per
    chunk.

    Numerics: relies on the RWKV-7 bound w <= -0.5 (the model computes
    w = -softplus(-x) - 0.5), i.e. -log d <= exp(-0.5) ~ 0.61 per step, so the key-side
    factors e^{-c_s} stay below e^{0.61 L} (e^{19.4} for L = 32): far from fp32
    overflow, and every product of factors equals a decay <= 1 up to rounding.  The
    bound is not asserted; the only guard is a cheap check on the per-chunk total
    decay (one max over [nc, B, H, N]) that falls back to shorter chunks when the
    factors could overflow.
    """
    _check_shapes(r, w, k, v, a, b)
    B, T, H, N = r.shape
    L = int(chunk_len)
    if L < 1:
        raise ValueError("chunk_len must be >= 1")
    dt = _compute_dtype(r)
    S = _init_state(state, B, H, N, dt, r.device)
    y, S = _in_groups(_wkv7_chunked_core, [r, w, k, v, a, b], [], S, L, dt)
    return y.to(r.dtype), S


def _wkv7_chunked_core(r, w, k, v, a, b, S, L, dt) -> tuple[Tensor, Tensor]:
    """wkv7_chunked on one group of (batch, head) pairs; y in dt."""
    B, T, H, N = r.shape
    BH = B * H
    r, k, v, a, b = (x.to(dt) for x in (r, k, v, a, b))  # no-op unless bf16/fp16

    # Chunked views [nc, B, H, L, N] of the inputs (no copy unless T needs padding).
    # Padded steps are zeros, with the decay padded as -log d = exp(w) = 0, i.e.
    # d = 1, and a = b = k = v = 0: they leave the state unchanged and their outputs
    # are dropped.
    ew = _chunked(torch.exp(w.to(dt)), L).contiguous()  # -log d_t > 0
    a_, r_, b_, k_ = (_chunked(x, L) for x in (a, r, b, k))
    nc = ew.shape[0]
    # (cumsum is ~3x faster on the contiguous copy than on the strided view)
    csum = torch.cumsum(ew, dim=-2)  # -c_t >= 0
    csum_end = csum[..., -1:, :]  # -c_L
    if L > 1 and float(csum_end.detach().max()) > _MAX_EXPONENT[dt]:
        # Decays far outside the RWKV-7 range: e^{-c_s} could overflow.
        return _wkv7_chunked_core(r, w, k, v, a, b, S, L // 2, dt)

    # Decay factors: e^{-c_t} (>= 1, key side), e^{c_t} (<= 1, r) and e^{c_{t-1}}
    # (<= 1, a: the r factor shifted one step, 1 at the chunk start).
    e_inv = torch.exp(csum)
    e_r = torch.reciprocal(e_inv)
    e_a = F.pad(e_r[..., :-1, :], (0, 0, 1, 0), value=1.0)
    # Decay-scaled operands.  The factor comes first so that the product is laid out
    # like it (contiguous chunks): scaling and re-layout of the input in one pass.
    a_t = e_a * a_  # a~ = e^{c_{t-1}} a
    r_t = e_r * r_  # r~ = e^{c_t} r
    b_t = e_inv * b_  # b~ = e^{-c_t} b
    k_t = e_inv * k_  # k~ = e^{-c_t} k
    vv = _chunked(v, L).contiguous()

    # Score blocks M_xy = x~ y~^T, masked causally: strictly lower for the a-rows
    # (z_t only sees s < t), inclusive for the r-rows.  M_ab needs no mask: the
    # unitriangular solve reads only below the diagonal.
    # (Multiplying by cached 0/1 masks: torch.tril launches threads even for tiny
    # inputs, which costs milliseconds per call when the other core is busy.)
    strict, incl = _tril_masks(L, dt, r.device)
    M_ab = a_t @ b_t.transpose(-1, -2)
    M_ak = (a_t @ k_t.transpose(-1, -2)) * strict
    M_rb = (r_t @ b_t.transpose(-1, -2)) * incl
    M_rk = (r_t @ k_t.transpose(-1, -2)) * incl

    eye = torch.eye(L, dtype=dt, device=r.device)
    Tinv = torch.linalg.solve_triangular(-M_ab, eye, upper=False, unitriangular=True)
    W = Tinv @ a_t
    U = (Tinv @ M_ak) @ vv
    # Fold the chunk's decay G_L into the key side of the state update:
    # S_L = S_0 G_L + Z^T B_L + V^T K_L, with B_L = b~ G_L, K_L = k~ G_L (<= 1).
    g = e_r[..., -1:, :]  # e^{c_L}, [nc, B, H, 1, N]
    BL = b_t * g
    VK = vv.transpose(-1, -2) @ (k_t * g)  # V^T K_L, [N value, N key]

    # Sequential scan over chunks, batched over B*H.  unbind() gives per-chunk views
    # whose backward is a single stack (indexing [i] would cost a full-size zero
    # tensor per chunk in backward).
    Wt = W.view(nc, BH, L, N).transpose(-1, -2).unbind(0)
    Ut = U.view(nc, BH, L, N).transpose(-1, -2).unbind(0)
    BL = BL.view(nc, BH, L, N).unbind(0)
    VK = VK.view(nc, BH, N, N).unbind(0)
    g = g.view(nc, BH, 1, N).unbind(0)
    S = S.reshape(BH, N, N)
    starts, zs = [], []
    for i in range(nc):
        starts.append(S)
        Zt = torch.baddbmm(Ut[i], S, Wt[i])  # Z^T = S_0 W^T + U^T, [BH, N, L]
        zs.append(Zt)
        # S_0 G_L + V^T K_L in one pass, then += Z^T B_L in place (addcmul does not
        # keep its output for backward, so the in-place update is safe).
        S = torch.addcmul(VK[i], S, g[i]).baddbmm_(Zt, BL[i])
    S0 = torch.stack(starts).view(nc * BH, N, N)
    Z = torch.stack(zs).view(nc * BH, N, L)

    # Outputs of all chunks at once: Y = M_rk V + M_rb Z + R~ S_0^T (accumulated in
    # place into the first product's fresh output).
    y = torch.bmm(M_rk.view(nc * BH, L, L), vv.view(nc * BH, L, N))
    y.baddbmm_(M_rb.view(nc * BH, L, L), Z.transpose(-1, -2))
    y.baddbmm_(r_t.view(nc * BH, L, N), S0.transpose(-1, -2))
    return _unpack(y.view(nc, B, H, L, N), T), S.view(B, H, N, N)


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
    _check_u(u, H, N)
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

        y_t = (e^{c_{t-1}} r_t)^T S_0 + sum_{s<t} A[t, s] v_s + (r_t . u . k_t) v_t
        A[t, s] = sum_i r_t[i] k_s[i] e^{c_{t-1}[i] - c_s[i]}          (s < t)
        S_L = diag(e^{c_L}) S_0 + sum_s (e^{c_L - c_s} k_s) v_s^T

    RWKV-6 decays are unbounded (-log d = exp(w) reaches ~20 per step), so the
    factor e^{c_{t-1} - c_s} may not be split around a fixed point of the chunk: one
    side would overflow.  A is built by recursive halving instead: in every block of
    2m steps, the pairs (t in the right half, s in the left half) are split around
    the block's midpoint p,

        e^{c_{t-1} - c_s} = e^{c_{t-1} - c_p} * e^{c_p - c_s},   both exponents <= 0,

    so each quadrant is one batched matmul of decay-scaled r and k, and the
    log2(L) levels (m = L/2, ..., 1) cover every pair s < t exactly once.  Every
    exponent used anywhere is <= 0: finite and accurate for any w.  The scan over
    chunks is one elementwise decay-and-add per chunk.  chunk_len must be a power
    of two.
    """
    _check_shapes(r, w, k, v)
    B, T, H, N = r.shape
    _check_u(u, H, N)
    L = int(chunk_len)
    if L < 1 or L & (L - 1):
        raise ValueError(f"chunk_len must be a power of two, got {chunk_len}")
    dt = _compute_dtype(r)
    S = _init_state(state, B, H, N, dt, r.device)
    y, S = _in_groups(_wkv6_chunked_core, [r, w, k, v], [u], S, L, dt)
    return y.to(r.dtype), S


def _wkv6_chunked_core(r, w, k, v, u, S, L, dt) -> tuple[Tensor, Tensor]:
    """wkv6_chunked on one group of (batch, head) pairs; y in dt."""
    B, T, H, N = r.shape
    BH = B * H
    r, k, v, u = (x.to(dt) for x in (r, k, v, u))  # no-op unless bf16/fp16

    # Chunked views [nc, B, H, L, N] (no copy unless T needs padding); padded steps
    # are zeros with -log d = exp(w) = 0: d = 1, r = k = v = 0, so they change
    # neither outputs nor state.
    ew = _chunked(torch.exp(w.to(dt)), L).contiguous()  # -log d_t >= 0 (contiguous:
    r_, k_ = _chunked(r, L), _chunked(k, L)  # cumsum is ~3x faster than on the view)
    vv = _chunked(v, L).contiguous()
    nc = ew.shape[0]
    csum = torch.cumsum(ew, dim=-2)  # -c_t, contiguous chunk layout
    cprev = csum - ew  # -c_{t-1}
    csum_end = csum[..., -1:, :]  # -c_L

    # Intra-chunk scores A by recursive halving.  Level m (m = 1, 2, .., L/2) gives
    # the [m, m] quadrants (t in the right half, s in the left half) of the blocks of
    # 2m steps; with the bonus diagonal they tile the lower triangle of A exactly
    # once, so A is one gather from their concatenation (zeros above the diagonal).
    pieces = [(r_ * k_ * u.unsqueeze(-2)).sum(-1)]  # diagonal: r_t . u . k_t
    m = 1
    while m < L:
        shape = (nc, B, H, L // (2 * m), 2, m, N)
        cs, cp = csum.view(shape), cprev.view(shape)
        mid = cs[..., 0, m - 1 :, :]  # -c_p at the end of each left half
        # t in the right half: e^{c_{t-1} - c_p} r_t; s in the left half: e^{c_p - c_s} k_s.
        r_hat = torch.exp(mid - cp[..., 1, :, :]) * r_.reshape(shape)[..., 1, :, :]
        k_hat = torch.exp(cs[..., 0, :, :] - mid) * k_.reshape(shape)[..., 0, :, :]
        pieces.append((r_hat @ k_hat.transpose(-1, -2)).view(nc, B, H, -1))
        m *= 2
    pieces.append(csum.new_zeros(nc, B, H, 1))
    A = torch.cat(pieces, dim=-1).index_select(-1, _wkv6_tile_index(L, r.device))
    A = A.view(nc, B, H, L, L)

    # Chunk-level state map S_L = diag(e^{c_L}) S_0 + K_L^T V, exponents <= 0.
    g = torch.exp(csum_end.neg()).transpose(-1, -2).reshape(nc, BH, N, 1).unbind(0)
    K_L = torch.exp(csum - csum_end) * k_
    C_c = (K_L.transpose(-1, -2) @ vv).view(nc, BH, N, N).unbind(0)
    S = S.reshape(BH, N, N)
    starts = []
    for i in range(nc):
        starts.append(S)
        S = torch.addcmul(C_c[i], g[i], S)
    S0 = torch.stack(starts)  # [nc, BH, N, N]

    # y = e^{c_{t-1}} r S_0 + A V
    r_t = torch.exp(cprev.neg()) * r_
    y = torch.baddbmm(
        (A @ vv).view(nc * BH, L, N), r_t.view(nc * BH, L, N), S0.view(nc * BH, N, N)
    )
    return _unpack(y.view(nc, B, H, L, N), T), S.view(B, H, N, N)
