"""Tests of rwkv_peft.model.wkv: chunked WKV forms against the per-token loops.

The per-token loops are themselves checked against a naive, explicit per-head
reference written here with numpy float64 scalar indexing.
"""

from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkv_peft.model.wkv import (
    WKV6_CHUNK_LEN,
    WKV7_CHUNK_LEN,
    wkv6_chunked,
    wkv6_sequential,
    wkv7_chunked,
    wkv7_sequential,
)
from rwkv_peft.model.wkv_dispatch import wkv6, wkv7

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rwkv7_inputs(B, T, H, N, dtype=F64, seed=0):
    """Realistic RWKV-7 inputs: w = -softplus(-x) - 0.5, a = -kk, b = kk * rate."""
    g = _gen(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    w = -F.softplus(-rnd(B, T, H, N, scale=2.0).to(F64) + 0.5) - 0.5
    kk = F.normalize(rnd(B, T, H, N).to(F64), dim=-1)
    rate = torch.sigmoid(rnd(B, T, H, N, scale=2.0).to(F64))
    a, b = -kk, kk * rate
    return [t.to(dtype) for t in (r, w, k, v, a, b)]


def rwkv6_inputs(B, T, H, N, dtype=F64, seed=0):
    """RWKV-6 inputs with w spread over [-8, 2] (d from ~1 - 3e-4 to ~6e-4), plus a few
    channels at the extremes of real models (w = -10: d ~ 1; w = 3: d ~ 2e-9)."""
    g = _gen(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=F64) for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g, dtype=F64) * 10.0 - 8.0
    w[..., 0] = -10.0
    if N > 2:
        w[..., 1] = 3.0
    u = torch.randn(H, N, generator=g, dtype=F64) * 0.5
    return [t.to(dtype) for t in (r, w, k, v, u)]


def rand_state(B, H, N, dtype=F64, seed=1):
    return torch.randn(B, H, N, N, generator=_gen(seed), dtype=F64).to(dtype)


def assert_close(actual, expected, rtol, what=""):
    """Norm-wise relative check: max |actual - expected| <= rtol * max(1, max |expected|)."""
    actual, expected = actual.to(F64), expected.to(F64)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.1e} * {scale:.3e}"


# --------------------------------------------------------------------------------------
# Independent naive references (numpy float64, explicit per-head, per-element loops)
# --------------------------------------------------------------------------------------


def naive_wkv7(r, w, k, v, a, b, state):
    r, w, k, v, a, b, S_all = (np.asarray(t.detach(), dtype=np.float64) for t in (r, w, k, v, a, b, state))
    B, T, H, N = r.shape
    y = np.zeros((B, T, H, N))
    S_out = np.zeros((B, H, N, N))
    for bb in range(B):
        for h in range(H):
            S = S_all[bb, h].copy()  # [value i, key j]
            for t in range(T):
                d = np.exp(-np.exp(w[bb, t, h]))
                Sa = [sum(S[i, j] * a[bb, t, h, j] for j in range(N)) for i in range(N)]
                new = np.zeros((N, N))
                for i in range(N):
                    for j in range(N):
                        new[i, j] = (
                            S[i, j] * d[j] + Sa[i] * b[bb, t, h, j] + v[bb, t, h, i] * k[bb, t, h, j]
                        )
                S = new
                for i in range(N):
                    y[bb, t, h, i] = sum(S[i, j] * r[bb, t, h, j] for j in range(N))
            S_out[bb, h] = S
    return torch.from_numpy(y), torch.from_numpy(S_out)


def naive_wkv6(r, w, k, v, u, state):
    r, w, k, v, u, S_all = (np.asarray(t.detach(), dtype=np.float64) for t in (r, w, k, v, u, state))
    B, T, H, N = r.shape
    y = np.zeros((B, T, H, N))
    S_out = np.zeros((B, H, N, N))
    for bb in range(B):
        for h in range(H):
            S = S_all[bb, h].copy()  # [key i, value j]
            for t in range(T):
                for j in range(N):
                    y[bb, t, h, j] = sum(
                        r[bb, t, h, i] * (u[h, i] * k[bb, t, h, i] * v[bb, t, h, j] + S[i, j])
                        for i in range(N)
                    )
                d = np.exp(-np.exp(w[bb, t, h]))
                for i in range(N):
                    for j in range(N):
                        S[i, j] = d[i] * S[i, j] + k[bb, t, h, i] * v[bb, t, h, j]
            S_out[bb, h] = S
    return torch.from_numpy(y), torch.from_numpy(S_out)


class Version(NamedTuple):
    """One WKV version's inputs, references and implementations, so each test runs on both."""

    inputs: Callable
    naive: Callable
    sequential: Callable
    chunked: Callable
    dispatch: Callable  # wkv7 / wkv6: what the model calls
    default_chunk: int
    names: str  # the inputs' letters, for messages


V = {7: Version(rwkv7_inputs, naive_wkv7, wkv7_sequential, wkv7_chunked, wkv7, WKV7_CHUNK_LEN, "rwkvab"),
     6: Version(rwkv6_inputs, naive_wkv6, wkv6_sequential, wkv6_chunked, wkv6, WKV6_CHUNK_LEN, "rwkvu")}
VERSIONS = pytest.mark.parametrize("version", [7, 6])


@VERSIONS
@pytest.mark.parametrize("with_state", [False, True])
def test_sequential_matches_naive(version, with_state):
    B, T, H, N = 2, 6, 2, 4
    v = V[version]
    x = v.inputs(B, T, H, N, seed=3)
    s0 = rand_state(B, H, N) if with_state else torch.zeros(B, H, N, N, dtype=F64)
    y, s = v.sequential(*x, state=s0 if with_state else None)
    y_ref, s_ref = v.naive(*x, s0)
    assert_close(y, y_ref, 1e-12, "y")
    assert_close(s, s_ref, 1e-12, "state")


# --------------------------------------------------------------------------------------
# Chunked vs sequential, float64
# --------------------------------------------------------------------------------------

L_TEST = 8  # small chunk for coverage of many chunks / remainders at small T
T_CASES = [1, 5, L_TEST, L_TEST + 3, 3 * L_TEST + 1, 4 * L_TEST]


@VERSIONS
@pytest.mark.parametrize("T", T_CASES)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_sequential(version, T, with_state):
    B, H, N = 2, 3, 8
    v = V[version]
    x = v.inputs(B, T, H, N, seed=T)
    s0 = rand_state(B, H, N) if with_state else None
    y_ref, s_ref = v.sequential(*x, state=s0)
    y, s = v.chunked(*x, state=s0, chunk_len=L_TEST)
    assert y.shape == (B, T, H, N) and y.dtype == F64
    assert s.shape == (B, H, N, N) and s.dtype == F64
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(s, s_ref, 1e-10, "state")


@VERSIONS
@pytest.mark.parametrize("T", [1, 7, 33, "2 chunks + 5"])
def test_default_chunk_len(version, T):
    B, H, N = 1, 2, 16
    v = V[version]
    T = 2 * v.default_chunk + 5 if T == "2 chunks + 5" else T
    x = v.inputs(B, T, H, N, seed=10 + T)
    s0 = rand_state(B, H, N)
    y_ref, s_ref = v.sequential(*x, state=s0)
    for fn in (v.chunked, v.dispatch):
        y, s = fn(*x, state=s0)
        assert_close(y, y_ref, 1e-10, f"{fn.__name__} y")
        assert_close(s, s_ref, 1e-10, f"{fn.__name__} state")


# RWKV-6's chunk length must be a power of two; RWKV-7's may be anything
@pytest.mark.parametrize("version,L", [(7, 1), (7, 3), (7, 5), (7, 16), (7, 32), (7, 64),
                                       (6, 1), (6, 2), (6, 4), (6, 16), (6, 32), (6, 64)])
def test_chunk_lengths(version, L):
    v = V[version]
    x = v.inputs(1, 45, 2, 8, seed=L)
    s0 = rand_state(1, 2, 8)
    y_ref, s_ref = v.sequential(*x, state=s0)
    y, s = v.chunked(*x, state=s0, chunk_len=L)
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(s, s_ref, 1e-10, "state")


def test_wkv6_chunk_len_must_be_power_of_two():
    x = rwkv6_inputs(1, 8, 1, 4)
    with pytest.raises(ValueError):
        wkv6_chunked(*x, chunk_len=12)


def test_wkv7_large_decay_falls_back_to_shorter_chunks():
    # w far above the RWKV-7 bound (d = exp(-e^2) ~ 6e-4 per step): the chunked form
    # must notice and still be exact and finite (fp32, where e^{-c} would overflow).
    x = rwkv7_inputs(1, 70, 2, 8, seed=5)
    x[1] = torch.full_like(x[1], 2.0)
    y_ref, s_ref = wkv7_sequential(*x)
    x32 = [t.float() for t in x]
    y, s = wkv7_chunked(*x32, chunk_len=32)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(s, s_ref, 1e-5, "state")
    yb, sb = wkv7_chunked(*(t.bfloat16() for t in x), chunk_len=32)
    assert yb.dtype == torch.bfloat16 and sb.dtype == torch.float32
    assert torch.isfinite(yb).all() and torch.isfinite(sb).all()


def test_state_continuation():
    """Running a sequence in two calls, carrying the state, equals one call."""
    x7 = rwkv7_inputs(2, 40, 2, 8, seed=7)
    x6 = rwkv6_inputs(2, 40, 2, 8, seed=7)
    for fn, x, extra in ((wkv7_chunked, x7, ()), (wkv6_chunked, x6[:4], (x6[4],))):
        y, s = fn(*x, *extra)
        y1, s1 = fn(*(t[:, :13] for t in x), *extra)
        y2, s2 = fn(*(t[:, 13:] for t in x), *extra, state=s1)
        assert_close(torch.cat([y1, y2], 1), y, 1e-12, f"{fn.__name__} y")
        assert_close(s2, s, 1e-12, f"{fn.__name__} state")


@pytest.mark.parametrize("group_elems", [1, 3 * 37 * 8])  # head groups / batch-row groups
def test_grouped_calls_match_sequential(monkeypatch, group_elems):
    """Large CPU inputs are split into groups of (batch, head) pairs: forcing tiny
    groups must not change outputs, state or gradients."""
    import rwkv_peft.model.wkv as wkv_mod

    monkeypatch.setattr(wkv_mod, "_GROUP_ELEMS", group_elems)
    B, T, H, N = 2, 37, 3, 8
    s0 = rand_state(B, H, N)
    gy = torch.randn(B, T, H, N, generator=_gen(5), dtype=F64)
    gs = torch.randn(B, H, N, N, generator=_gen(6), dtype=F64)
    for seq, chk, x in (
        (wkv7_sequential, wkv7_chunked, rwkv7_inputs(B, T, H, N, seed=2)),
        (wkv6_sequential, wkv6_chunked, rwkv6_inputs(B, T, H, N, seed=2)),
    ):
        y_ref, s_ref = seq(*x, state=s0)
        y, s = chk(*x, state=s0, chunk_len=8)
        assert_close(y, y_ref, 1e-10, f"{chk.__name__} y")
        assert_close(s, s_ref, 1e-10, f"{chk.__name__} state")
        for a, e in zip(_grads(chk, x, s0, gy, gs, chunk_len=8), _grads(seq, x, s0, gy, gs)):
            assert_close(a, e, 1e-9, f"{chk.__name__} grad")


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def _grads(fn, inputs, state, gy, gs, **kw):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    state = state.detach().clone().requires_grad_()
    y, s = fn(*inputs, state=state, **kw)
    torch.autograd.backward([y, s], [gy, gs])
    return [t.grad for t in inputs] + [state.grad]


@VERSIONS
def test_chunked_grads_match_sequential(version):
    B, T, H, N = 2, 2 * L_TEST + 3, 2, 6
    v = V[version]
    x, seq, chk, names = v.inputs(B, T, H, N, seed=4), v.sequential, v.chunked, v.names
    s0 = rand_state(B, H, N)
    gy = torch.randn(B, T, H, N, generator=_gen(5), dtype=F64)
    gs = torch.randn(B, H, N, N, generator=_gen(6), dtype=F64)
    g_ref = _grads(seq, x, s0, gy, gs)
    g = _grads(chk, x, s0, gy, gs, chunk_len=L_TEST)
    for name, a, e in zip(list(names) + ["state"], g, g_ref):
        assert a is not None, f"no gradient for {name}"
        assert_close(a, e, 1e-9, f"grad {name}")


@VERSIONS
def test_backward_after_inference_mode_call(version):
    """Cached constants built by a first call under torch.inference_mode() (generation,
    evaluation) must not break a later backward (training in the same process)."""
    from rwkv_peft.model import wkv as wkv_module

    wkv_module._tril_masks.cache_clear()
    wkv_module._wkv6_tile_index.cache_clear()
    B, T, H, N = 1, 2 * L_TEST + 3, 2, 4
    x, seq, chk = V[version].inputs(B, T, H, N, seed=7), V[version].sequential, V[version].chunked
    s0 = rand_state(B, H, N)
    with torch.inference_mode():
        chk(*x, state=s0, chunk_len=L_TEST)
    gy = torch.randn(B, T, H, N, generator=_gen(8), dtype=F64)
    gs = torch.randn(B, H, N, N, generator=_gen(9), dtype=F64)
    for a, e in zip(_grads(chk, x, s0, gy, gs, chunk_len=L_TEST), _grads(seq, x, s0, gy, gs)):
        assert_close(a, e, 1e-9, "grad")


# Full (per-element) gradcheck on one case per version; the fast mode (random
# projections of the Jacobian) on the others keeps the suite quick.
@pytest.mark.parametrize("T,L,fast", [(7, 4, False), (5, 2, True), (9, 4, True)])
def test_wkv7_chunked_gradcheck(T, L, fast):
    x = rwkv7_inputs(1, T, 1, 3, seed=T)
    s0 = rand_state(1, 1, 3) * 0.5
    args = [t.detach().clone().requires_grad_() for t in x + [s0]]

    def f(r, w, k, v, a, b, s):
        return wkv7_chunked(r, w, k, v, a, b, state=s, chunk_len=L)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("T,L,fast", [(9, 4, False), (5, 2, True), (8, 4, True)])
def test_wkv6_chunked_gradcheck(T, L, fast):
    x = rwkv6_inputs(1, T, 1, 4, seed=T)
    # keep w in a range where finite differences of exp(-exp(w)) are well conditioned
    x[1] = x[1].clamp(-4.0, 1.0)
    s0 = rand_state(1, 1, 4) * 0.5
    args = [t.detach().clone().requires_grad_() for t in x + [s0]]

    def f(r, w, k, v, u, s):
        return wkv6_chunked(r, w, k, v, u, state=s, chunk_len=L)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


# --------------------------------------------------------------------------------------
# Precision: fp32 and bf16 inputs
# --------------------------------------------------------------------------------------


@VERSIONS
def test_fp32_chunked_matches_float64_sequential(version):
    B, T, H, N = 1, 130, 2, 64
    x, seq, chk = V[version].inputs(B, T, H, N, seed=8), V[version].sequential, V[version].chunked
    s0 = rand_state(B, H, N)
    y_ref, s_ref = seq(*x, state=s0)
    y, s = chk(*(t.float() for t in x), state=s0.float())
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(s, s_ref, 1e-5, "state")


@VERSIONS
def test_bf16_inputs(version):
    B, T, H, N = 1, 40, 2, 32
    x, seq, chk = V[version].inputs(B, T, H, N, seed=9), V[version].sequential, V[version].chunked
    xb = [t.bfloat16() for t in x]
    # reference: the same bf16-rounded inputs, computed in float64
    y_ref, s_ref = seq(*(t.double() for t in xb))
    xb = [t.requires_grad_() for t in xb]
    y, s = chk(*xb)
    assert y.dtype == torch.bfloat16
    assert s.dtype == torch.float32
    assert_close(y, y_ref, 1e-2, "y")  # bf16 output rounding: 2^-8 relative
    assert_close(s, s_ref, 1e-5, "state")  # state stays fp32
    (y.float().sum() + s.sum()).backward()
    for t in xb:
        assert t.grad is not None and t.grad.dtype == torch.bfloat16
        assert torch.isfinite(t.grad.float()).all()


def test_shape_errors():
    x = rwkv7_inputs(1, 4, 2, 4)
    with pytest.raises(ValueError):
        wkv7_chunked(*x, state=torch.zeros(1, 2, 4, 3, dtype=F64))
    with pytest.raises(ValueError):
        wkv7_chunked(x[0], x[1][:, :3], *x[2:])
    x6 = rwkv6_inputs(1, 4, 2, 4)
    with pytest.raises(ValueError):
        wkv6_chunked(*x6[:4], torch.zeros(3, 4, dtype=F64))
