"""Tests of the PEFT methods (rwkv_peft/peft/methods.py) against SPEC section 4.

Every reference below is built in this file, explicitly, from the SPEC formulas (plain
loops over r-blocks where that reads better). The module's own `delta` and `forward`
are only ever the thing being checked, never the reference.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.peft.methods import METHODS, make_method

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the matrices here are tiny


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------
# Explicit references (SPEC section 4), written with torch ops so autograd can flow
# ----------------------------------------------------------------------------------------

def lora_delta_ref(A, B, alpha, r):
    """LoRA: delta = (alpha / r) B A."""
    return (alpha / r) * (B @ A)


def pissa_delta_ref(A, B, A0, B0):
    """PiSSA: merged = W_res + B A = W + (B A - B0 A0)."""
    return B @ A - B0 @ A0


def bone_delta_ref(D, in_features):
    """Bone: D [r, out]; W[:, b*r:(b+1)*r] += D^T for every column block b; a last partial
    block gets the first in % r columns of D^T."""
    r = D.shape[0]
    Dt = D.T                                     # [out, r]
    cols = []
    b = 0
    while b * r < in_features:
        width = min(r, in_features - b * r)      # r, or in % r for the last partial block
        cols.append(Dt[:, :width])
        b += 1
    out = torch.cat(cols, dim=1)
    assert out.shape == (D.shape[1], in_features)
    return out


def bat_delta_ref(W, D):
    """Bat (RWKV-PEFT layout): D [in/r, r, r]; delta block (a, b) = W_ab D_b + D_b with
    W_ab the r x r block of W at output block a, input block b."""
    nb, r, _ = D.shape
    out_features, in_features = W.shape
    assert in_features == nb * r and out_features % r == 0
    rows = []
    for a in range(out_features // r):
        row = []
        for b in range(in_features // r):
            W_ab = W[a * r:(a + 1) * r, b * r:(b + 1) * r]
            D_b = D[b]
            row.append(W_ab @ D_b + D_b)
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def explicit_delta(m, W):
    """The explicit delta for module m's current parameters (autograd flows to them)."""
    t = m.tensors()
    if m.name == "lora":
        return lora_delta_ref(t["lora_A"], t["lora_B"], m.alpha, m.r)
    if m.name == "pissa":
        return pissa_delta_ref(t["lora_A"], t["lora_B"], t["init_A"], t["init_B"])
    if m.name == "bone":
        return bone_delta_ref(t["bone"], m.in_features)
    if m.name == "bat":
        return bat_delta_ref(W, t["bat"])
    raise AssertionError(m.name)


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------

def build(name, in_f, out_f, W, dtype=F64, seed=0, **hp):
    """A module in `dtype`, reset on W, then all trainable parameters perturbed to random,
    nonzero values (so that no term of the delta can hide behind a zero)."""
    m = make_method(name, in_f, out_f, **hp).to(dtype)
    m.reset_parameters(W.to(dtype))
    with torch.no_grad():
        for i, (pname, p) in enumerate(sorted(m.named_parameters())):
            p.add_(0.3 * randn(*p.shape, seed=1000 + seed * 17 + i, dtype=dtype))
    return m


HP = {"lora": dict(alpha=24.0), "pissa": dict(), "bone": dict(), "bat": dict()}

# (name, in, out, r): square and non-square; Bone with in % r == 0, in % r != 0 and r == in
CASES = [
    ("lora", 16, 16, 4), ("lora", 20, 12, 5), ("lora", 12, 20, 12),
    ("pissa", 16, 16, 4), ("pissa", 20, 12, 5), ("pissa", 12, 20, 3),
    ("bone", 16, 16, 4), ("bone", 20, 12, 6), ("bone", 20, 20, 6), ("bone", 20, 10, 20),
    ("bone", 7, 9, 3), ("bone", 12, 12, 1),
    ("bat", 16, 16, 4), ("bat", 12, 8, 4), ("bat", 8, 12, 4), ("bat", 12, 12, 12), ("bat", 6, 6, 1),
]
CASE_IDS = [f"{n}-in{i}-out{o}-r{r}" for n, i, o, r in CASES]


def weight(in_f, out_f, seed=7, dtype=F64):
    return randn(out_f, in_f, seed=seed, dtype=dtype)


# ----------------------------------------------------------------------------------------
# The explicit references themselves, on hand-checkable examples
# ----------------------------------------------------------------------------------------

def test_bone_reference_by_hand():
    # in=5, r=2, out=3: blocks [0,1], [2,3], [4] (partial: first column of D^T)
    D = torch.arange(6, dtype=F64).reshape(2, 3)       # D [r=2, out=3]
    ref = bone_delta_ref(D, 5)
    expect = torch.tensor([[0, 3, 0, 3, 0],
                           [1, 4, 1, 4, 1],
                           [2, 5, 2, 5, 2]], dtype=F64)
    assert torch.equal(ref, expect)


def test_bat_reference_by_hand():
    # r=1: delta_ab = W_ab d_b + d_b, a scalar per entry
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    D = torch.tensor([10.0, 100.0], dtype=F64).reshape(2, 1, 1)
    expect = torch.tensor([[1 * 10 + 10, 2 * 100 + 100], [3 * 10 + 10, 4 * 100 + 100]], dtype=F64)
    assert torch.equal(bat_delta_ref(W, D), expect)


# ----------------------------------------------------------------------------------------
# delta(W), forward and gradients against the explicit materialized form
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,in_f,out_f,r", CASES, ids=CASE_IDS)
def test_delta_matches_explicit(name, in_f, out_f, r):
    W = weight(in_f, out_f)
    m = build(name, in_f, out_f, W, r=r, **HP[name])
    d = m.delta(W)
    assert d.dtype == torch.float32 and d.shape == (out_f, in_f)
    with torch.no_grad():
        ref = explicit_delta(m, W)
    torch.testing.assert_close(d.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5,), (2, 3), (1,), ()], ids=["N", "BT", "1", "vector"])
@pytest.mark.parametrize("name,in_f,out_f,r", CASES, ids=CASE_IDS)
def test_forward_matches_explicit(name, in_f, out_f, r, shape):
    W = weight(in_f, out_f)
    m = build(name, in_f, out_f, W, r=r, **HP[name])
    x = randn(*shape, in_f, seed=3)
    y = m(x, m.frozen_weight(W))
    assert y.shape == (*shape, out_f) and y.dtype == F64
    with torch.no_grad():
        ref = x @ (W + explicit_delta(m, W)).T
    # PiSSA's frozen weight W - B0 A0 is computed in fp32 by design (merges in fp32), so the
    # identity W_res + B0 A0 == W only holds to fp32 precision there
    tol = dict(rtol=1e-5, atol=1e-5) if name == "pissa" else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, ref, **tol)


@pytest.mark.parametrize("name,in_f,out_f,r", CASES, ids=CASE_IDS)
def test_forward_with_frozen_matches_merge_of_adapter(name, in_f, out_f, r):
    """With the frozen weight the layer actually holds, the adapted output is exactly
    x @ (Wf + adapter part)^T in float64 (PiSSA: Wf + B A)."""
    W = weight(in_f, out_f)
    m = build(name, in_f, out_f, W, r=r, **HP[name])
    Wf = m.frozen_weight(W)
    x = randn(4, 3, in_f, seed=4)
    t = m.tensors()
    with torch.no_grad():
        if name == "pissa":
            ref = x @ (Wf + t["lora_B"] @ t["lora_A"]).T
        else:
            assert torch.equal(Wf, W)
            ref = x @ (W + explicit_delta(m, W)).T
    torch.testing.assert_close(m(x, Wf), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(6,), (2, 3)], ids=["N", "BT"])
@pytest.mark.parametrize("name,in_f,out_f,r", CASES, ids=CASE_IDS)
def test_gradients_match_explicit(name, in_f, out_f, r, shape):
    W = weight(in_f, out_f)
    m = build(name, in_f, out_f, W, r=r, **HP[name])
    Wf = m.frozen_weight(W).detach()
    params = [p for _, p in sorted(m.named_parameters())]
    assert params and all(p.requires_grad for p in params)
    x = randn(*shape, in_f, seed=5).requires_grad_(True)
    g = randn(*shape, out_f, seed=6)

    y = m(x, Wf)
    got = torch.autograd.grad((y * g).sum(), [x, *params])

    if name == "pissa":   # the layer holds Wf = W - B0 A0 frozen; trains B A on top of it
        t = m.tensors()
        y_ref = x @ (Wf + t["lora_B"] @ t["lora_A"]).T
    else:
        y_ref = x @ (W + explicit_delta(m, W)).T
    want = torch.autograd.grad((y_ref * g).sum(), [x, *params])

    for (label, a, b) in zip(["x"] + [n for n, _ in sorted(m.named_parameters())], got, want):
        assert a.shape == b.shape, label
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda s: f"grad {label}: {s}")
        assert b.abs().max() > 0, label    # the check is not vacuous


@pytest.mark.parametrize("name,in_f,out_f,r", CASES, ids=CASE_IDS)
def test_forward_equals_merged_forward(name, in_f, out_f, r):
    """Merging reproduces the adapted model: F.linear(x, W + delta(W)) == m(x, frozen_weight(W)).
    For Bat this is the efficient forward against the materialized one."""
    W = weight(in_f, out_f, dtype=torch.float32)
    m = build(name, in_f, out_f, W, dtype=torch.float32, r=r, **HP[name])
    x = torch.randn(2, 5, in_f, generator=gen(8))
    with torch.no_grad():
        y = m(x, m.frozen_weight(W))
        y_merged = F.linear(x, W + m.delta(W))
    torch.testing.assert_close(y, y_merged, rtol=1e-4, atol=1e-4)


def test_bat_efficient_forward_equals_materialized_large():
    """The efficient Bat forward against the explicit materialized form at a realistic shape."""
    in_f, out_f, r = 256, 384, 32
    W = weight(in_f, out_f, seed=11)
    m = build("bat", in_f, out_f, W, r=r)
    x = randn(3, 7, in_f, seed=12)
    with torch.no_grad():
        y = m(x, W)
        y_mat = F.linear(x, W + bat_delta_ref(W, m.bat))
    torch.testing.assert_close(y, y_mat, rtol=1e-10, atol=1e-9)


def test_bat_forward_builds_no_out_by_in_temporary():
    """SPEC: the efficient Bat forward keeps no (out, in) temporary for backward: the only
    (out, in)-sized tensor autograd saves is the frozen weight itself."""
    in_f, out_f, r = 64, 96, 16
    W = torch.randn(out_f, in_f, generator=gen(13))
    m = build("bat", in_f, out_f, W, dtype=torch.float32, r=r)
    x = torch.randn(5, in_f, generator=gen(14), requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x, W)
    big = [t for t in saved if t.numel() >= out_f * in_f]
    for t in big:
        assert t.untyped_storage().data_ptr() == W.untyped_storage().data_ptr(), t.shape
    y.sum().backward()
    assert m.bat.grad is not None and x.grad is not None


# ----------------------------------------------------------------------------------------
# Bone specifics
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_f,out_f,r", [(16, 8, 4), (20, 8, 6), (20, 8, 20), (20, 8, 19), (1, 3, 1)])
def test_bone_delta_tiling_explicit_loop(in_f, out_f, r):
    """Column by column: delta[:, j] == D^T[:, j % r] (the last partial block included)."""
    W = weight(in_f, out_f)
    m = build("bone", in_f, out_f, W, r=r)
    d = m.delta(W)
    D = m.bone.detach()
    for j in range(in_f):
        torch.testing.assert_close(d[:, j].double(), D[j % r, :], rtol=1e-6, atol=1e-6)


def test_bone_partial_block_forward_pinned():
    """in=20, r=6: inputs 18, 19 (the partial block) meet rows 0, 1 of D."""
    in_f, out_f, r = 20, 4, 6
    m = make_method("bone", in_f, out_f, r=r).double()
    with torch.no_grad():
        m.bone.copy_(randn(r, out_f, seed=15))
    W = torch.zeros(out_f, in_f, dtype=F64)
    for j in range(in_f):
        x = torch.zeros(in_f, dtype=F64)
        x[j] = 1.0
        torch.testing.assert_close(m(x, W), m.bone.detach()[j % r], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# PiSSA specifics
# ----------------------------------------------------------------------------------------

def lowrank_plus_noise(out_f, in_f, rank, seed):
    """A weight with a clear spectral gap after `rank`, so that randomized SVD finds the
    same top singular subspace as a full SVD."""
    g = gen(seed)
    U, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=g, dtype=F64))
    S = torch.linspace(10.0, 5.0, rank, dtype=F64)
    return ((U * S) @ V.T + 0.01 * torch.randn(out_f, in_f, generator=g, dtype=F64)).float()


@pytest.mark.parametrize("svd_niter", [None, 4], ids=["full", "randomized"])
@pytest.mark.parametrize("in_f,out_f", [(48, 32), (32, 48)])
def test_pissa_factors_are_top_r_svd(svd_niter, in_f, out_f):
    r = 6
    W = lowrank_plus_noise(out_f, in_f, r, seed=20)
    torch.manual_seed(0)   # svd_lowrank is randomized
    m = make_method("pissa", in_f, out_f, r=r, svd_niter=svd_niter)
    m.reset_parameters(W)
    A, B = m.lora_A.detach().double(), m.lora_B.detach().double()
    assert A.shape == (r, in_f) and B.shape == (out_f, r)

    # reference SVD from numpy (independent of torch)
    U, S, Vt = np.linalg.svd(W.double().numpy(), full_matrices=False)
    U, S, Vt = torch.from_numpy(U[:, :r]), torch.from_numpy(S[:r]), torch.from_numpy(Vt[:r])
    root = S.sqrt()
    A_ref, B_ref = root[:, None] * Vt, U * root[None, :]
    # singular vectors are defined up to sign: align each triplet by the sign of <B_i, B_ref_i>
    sign = torch.sign((B * B_ref).sum(0))
    tol = dict(rtol=1e-4, atol=1e-4) if svd_niter is None else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(B * sign, B_ref, **tol)
    torch.testing.assert_close(A * sign[:, None], A_ref, **tol)
    # sign-free: A A^T == B^T B == diag(S);  B A == U_r S_r V_r^T
    torch.testing.assert_close(A @ A.T, torch.diag(S), **tol)
    torch.testing.assert_close(B.T @ B, torch.diag(S), **tol)
    torch.testing.assert_close(B @ A, (U * S) @ Vt, **tol)


@pytest.mark.parametrize("svd_niter", [None, 4, 0], ids=["full", "niter4", "niter0"])
def test_pissa_init_leaves_model_unchanged(svd_niter):
    in_f, out_f, r = 40, 24, 8
    W = torch.randn(out_f, in_f, generator=gen(21))
    m = make_method("pissa", in_f, out_f, r=r, svd_niter=svd_niter)
    m.reset_parameters(W)
    t = m.tensors()
    assert set(t) == {"lora_A", "lora_B", "init_A", "init_B"}
    assert torch.equal(t["init_A"], t["lora_A"]) and torch.equal(t["init_B"], t["lora_B"])
    assert {n for n, _ in m.named_parameters()} == {"lora_A", "lora_B"}   # B0, A0 are frozen
    Wres = m.frozen_weight(W)
    torch.testing.assert_close(Wres, W - t["init_B"] @ t["init_A"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Wres + t["init_B"] @ t["init_A"], W, rtol=1e-5, atol=1e-5)
    assert (Wres - W).abs().max() > 0.1     # the principal part was really moved out
    x = torch.randn(3, 5, in_f, generator=gen(22))
    with torch.no_grad():
        torch.testing.assert_close(m(x, Wres), x @ W.T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.delta(W), torch.zeros(out_f, in_f), rtol=0, atol=1e-6)


def test_pissa_delta_after_training_step():
    in_f, out_f, r = 24, 16, 4
    W = torch.randn(out_f, in_f, generator=gen(23))
    m = make_method("pissa", in_f, out_f, r=r)
    m.reset_parameters(W)
    A0, B0 = m.init_A.clone(), m.init_B.clone()
    with torch.no_grad():
        m.lora_A.add_(torch.randn(r, in_f, generator=gen(24)))
        m.lora_B.add_(torch.randn(out_f, r, generator=gen(25)))
    assert torch.equal(m.init_A, A0) and torch.equal(m.init_B, B0)   # B0, A0 do not move
    ref = m.lora_B.detach() @ m.lora_A.detach() - B0 @ A0
    torch.testing.assert_close(m.delta(W), ref, rtol=1e-5, atol=1e-5)
    # merge from base checkpoint + saved adapter alone: W + delta reproduces the layer
    x = torch.randn(7, in_f, generator=gen(26))
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, W + m.delta(W)), m(x, m.frozen_weight(W)),
                                   rtol=1e-4, atol=1e-4)
    # ... and a fresh module loaded from the saved tensors gives the same merge (no new SVD)
    fresh = make_method("pissa", in_f, out_f, **m.hparams())
    fresh.load_tensors({k: v.detach().clone() for k, v in m.tensors().items()}, "test")
    torch.testing.assert_close(fresh.delta(W), m.delta(W), rtol=0, atol=0)


def test_pissa_scale_is_one():
    m = make_method("pissa", 8, 8, r=3)
    assert m.scale == 1.0


# ----------------------------------------------------------------------------------------
# Initial state
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,in_f,out_f,r", [("bone", 20, 12, 6), ("bat", 16, 8, 4), ("bone", 16, 16, 16)])
def test_bone_bat_start_at_zero(name, in_f, out_f, r):
    W = torch.randn(out_f, in_f, generator=gen(30))
    m = make_method(name, in_f, out_f, r=r)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)    # reset must really zero it
    m.reset_parameters(W)
    assert all(torch.count_nonzero(p) == 0 for p in m.parameters())
    assert torch.count_nonzero(m.delta(W)) == 0
    x = torch.randn(3, in_f, generator=gen(31))
    with torch.no_grad():
        torch.testing.assert_close(m(x, m.frozen_weight(W)), x @ W.T, rtol=1e-6, atol=1e-6)


def test_lora_init():
    in_f, out_f, r = 64, 32, 8
    W = torch.randn(out_f, in_f, generator=gen(32))
    torch.manual_seed(0)
    m = make_method("lora", in_f, out_f, r=r, alpha=16)
    m.reset_parameters(W)
    assert torch.count_nonzero(m.lora_B) == 0
    assert torch.count_nonzero(m.lora_A) == m.lora_A.numel()
    bound = 1 / math.sqrt(in_f)       # Kaiming uniform with a=sqrt(5), as nn.Linear
    assert m.lora_A.abs().max() <= bound + 1e-7
    assert m.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(m.delta(W)) == 0
    assert m.scale == 2.0
    assert make_method("lora", in_f, out_f, r=r).scale == 1.0      # alpha defaults to r
    assert set(m.tensors()) == {"lora_A", "lora_B"}
    x = torch.randn(3, in_f, generator=gen(33))
    with torch.no_grad():
        torch.testing.assert_close(m(x, W), x @ W.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,in_f,out_f,r,shapes", [
    ("lora", 20, 12, 4, {"lora_A": (4, 20), "lora_B": (12, 4)}),
    ("pissa", 20, 12, 4, {"lora_A": (4, 20), "lora_B": (12, 4), "init_A": (4, 20), "init_B": (12, 4)}),
    ("bone", 20, 12, 6, {"bone": (6, 12)}),
    ("bat", 20, 12, 4, {"bat": (5, 4, 4)}),
])
def test_tensor_names_and_shapes(name, in_f, out_f, r, shapes):
    m = make_method(name, in_f, out_f, r=r)
    assert {k: tuple(v.shape) for k, v in m.tensors().items()} == shapes
    # hparams rebuild the same method
    again = METHODS[name](in_f, out_f, **m.hparams())
    assert type(again) is type(m) and again.hparams() == m.hparams()


# ----------------------------------------------------------------------------------------
# Lower precision
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,r", [("lora", 16), ("pissa", 16), ("bone", 16), ("bat", 16), ("bone", 24)])
def test_bf16_forward_close_to_fp32(name, r):
    in_f, out_f = 96, 64
    W = torch.randn(out_f, in_f, generator=gen(40)) / math.sqrt(in_f)
    m = make_method(name, in_f, out_f, r=r)
    m.reset_parameters(W)
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen(41 + i)))
    x = torch.randn(2, 9, in_f, generator=gen(45))
    with torch.no_grad():
        y32 = m(x, m.frozen_weight(W))
        mb = copy.deepcopy(m).to(torch.bfloat16)
        Wb = W.bfloat16()
        yb = mb(x.bfloat16(), mb.frozen_weight(Wb))
    assert yb.dtype == torch.bfloat16 and yb.shape == y32.shape
    assert torch.isfinite(yb).all()
    rel = (yb.float() - y32).norm() / y32.norm()
    assert rel < 3e-2, float(rel)
    # the merge is computed in fp32 even from bf16 tensors
    assert mb.delta(Wb).dtype == torch.float32
    # and the training path (backward) runs in bf16
    xb = x.bfloat16().requires_grad_(True)
    mb(xb, mb.frozen_weight(Wb)).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in mb.parameters())


# ----------------------------------------------------------------------------------------
# Rank errors
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,in_f,out_f,r", [
    ("lora", 16, 8, 9), ("lora", 8, 16, 9), ("lora", 16, 16, 0), ("lora", 16, 16, -2),
    ("pissa", 16, 8, 9), ("pissa", 16, 16, 0),
    ("bone", 16, 32, 17), ("bone", 16, 16, 0),
    ("bat", 20, 16, 3), ("bat", 16, 20, 8), ("bat", 16, 18, 4), ("bat", 18, 16, 4), ("bat", 16, 16, 0),
    ("bat", 16, 16, 32),
])
def test_bad_rank_raises(name, in_f, out_f, r):
    with pytest.raises(RWKVPeftError) as e:
        make_method(name, in_f, out_f, r=r)
    assert str(r) in str(e.value)
    assert "rank" in str(e.value)


@pytest.mark.parametrize("name,in_f,out_f,r", [
    ("lora", 16, 8, 8), ("pissa", 16, 8, 8), ("bone", 16, 4, 16), ("bat", 16, 8, 8), ("bat", 16, 16, 16),
])
def test_edge_ranks_accepted(name, in_f, out_f, r):
    m = make_method(name, in_f, out_f, r=r)
    assert m.r == r


def test_unknown_method():
    with pytest.raises(RWKVPeftError, match="lorax"):
        make_method("lorax", 8, 8, r=2)
