"""The CUDA WKV kernels (rwkv_peft/model/wkv_cuda.py, cuda/) on a GPU.

Against the float64 sequential references of rwkv_peft.model.wkv: outputs, final states
and the gradient of every input (the initial state and RWKV-6's u included), for several
B, H, T (T = 1, T not a multiple of the 16-step chunk, long T), with and without an
initial state, in fp32 and bf16; the start-up self-test, on the real kernels and on a
planted wrong one; then whole models (random official-layout checkpoints) with the CUDA op against the
PyTorch op: logits and adapter gradients.

Skipped without a CUDA device. On a GPU machine a build failure fails the tests (only a
missing nvcc or ninja skips them): a broken kernel must not pass as "skipped".
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from rwkv_peft.model import wkv_cuda, wkv_dispatch
from rwkv_peft.model.wkv import wkv6_chunked, wkv6_sequential, wkv7_chunked, wkv7_sequential

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
# Relative errors (norm of the difference / norm of the reference). bf16: the inputs are
# rounded to bf16 before both runs, so what remains is the kernel's bf16 outputs and
# gradients (half an ulp is 2e-3) on top of fp32 accumulation.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    reason = wkv_cuda.cuda_unavailable_reason()
    if reason is None:
        return
    if reason.startswith(("nvcc not found", "ninja not found")):
        pytest.skip(reason)
    pytest.fail(f"a CUDA device is present but the WKV kernels are unavailable: {reason}")


def _inputs7(B, T, H, N, seed):
    """Model-like RWKV-7 inputs: w = -softplus(-x) - 0.5, a = -kk, b = kk * rate."""
    g = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEV)

    r, k, v = randn(B, T, H, N) * 0.5, randn(B, T, H, N) * 0.5, randn(B, T, H, N)
    w = -F.softplus(-(randn(B, T, H, N) * 2 - 1)) - 0.5
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    b = kk * torch.sigmoid(randn(B, T, H, N))
    return [r, w, k, v, -kk, b], randn(B, H, N, N) * 0.3, g


def _inputs6(B, T, H, N, seed, fast_decays=False):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEV)

    r, k, v = randn(B, T, H, N) * 0.5, randn(B, T, H, N) * 0.5, randn(B, T, H, N)
    hi = 3.0 if fast_decays else 1.0  # exp(w) up to e^3 = 20: decays down to 2e-9 per step
    w = torch.rand(B, T, H, N, generator=g, device=DEV) * (hi + 6) - 6
    u = randn(H, N) * 0.5
    return [r, w, k, v, u], randn(B, H, N, N) * 0.3, g


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare(fn, ref_fn, ins, s0, g, dtype, low_precision):
    """Relative errors of fn (output, state, every gradient) against ref_fn in float64, on
    the same dtype-rounded inputs and the same upstream gradients of y and the state."""
    ins = [x.to(dtype) if i in low_precision else x for i, x in enumerate(ins)]
    B, T, H, N = ins[0].shape
    gy = torch.randn(B, T, H, N, generator=g, device=DEV).to(dtype)
    gs = torch.randn(B, H, N, N, generator=g, device=DEV)
    n = len(ins)
    leaves = [x.clone().requires_grad_() for x in ins] + ([s0.clone().requires_grad_()] if s0 is not None else [])
    y, sT = fn(*leaves[:n], leaves[n] if s0 is not None else None)
    assert y.dtype == dtype and sT.dtype == torch.float32 and y.shape == ins[0].shape
    ((y.float() * gy.float()).sum() + (sT * gs).sum()).backward()
    refs = [x.detach().double().requires_grad_() for x in leaves]
    y_ref, s_ref = ref_fn(*refs[:n], refs[n] if s0 is not None else None)
    ((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum()).backward()
    errs = {"y": _rel(y, y_ref), "state": _rel(sT, s_ref)}
    names = ("r", "w", "k", "v", "a", "b") if ref_fn is wkv7_sequential else ("r", "w", "k", "v", "u")
    for name, x, xr in zip((*names, "s0"), leaves, refs):
        assert x.grad is not None and x.grad.dtype == x.dtype and x.grad.shape == x.shape, name
        assert torch.isfinite(x.grad).all(), name
        errs["d" + name] = _rel(x.grad, xr.grad)
    return errs


SHAPES = [(1, 1, 1), (2, 16, 4), (3, 37, 2), (2, 100, 3), (1, 300, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%dH%d" % s)
def test_wkv7_matches_float64_reference(shape, with_state, dtype):
    ins, s0, g = _inputs7(*shape, 64, seed=sum(shape))
    errs = _compare(wkv_cuda.wkv7_cuda, wkv7_sequential, ins, s0 if with_state else None, g, dtype,
                    low_precision={0, 2, 3, 4, 5})
    assert max(errs.values()) < TOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%dH%d" % s)
def test_wkv6_matches_float64_reference(shape, with_state, dtype):
    ins, s0, g = _inputs6(*shape, 64, seed=sum(shape), fast_decays=True)
    errs = _compare(wkv_cuda.wkv6_cuda, wkv6_sequential, ins, s0 if with_state else None, g, dtype,
                    low_precision={0, 2, 3})
    assert max(errs.values()) < TOL[dtype], errs


@pytest.mark.parametrize("head_size", [32, 128])
def test_other_head_sizes(head_size):
    ins, s0, g = _inputs7(2, 40, 2, head_size, seed=1)
    errs = _compare(wkv_cuda.wkv7_cuda, wkv7_sequential, ins, s0, g, torch.float32, {0, 2, 3, 4, 5})
    assert max(errs.values()) < TOL[torch.float32], errs
    ins, s0, g = _inputs6(2, 40, 2, head_size, seed=1)
    errs = _compare(wkv_cuda.wkv6_cuda, wkv6_sequential, ins, s0, g, torch.float32, {0, 2, 3})
    assert max(errs.values()) < TOL[torch.float32], errs


def test_long_sequence_matches_chunked_torch():
    """T = 2048 in bf16 against the PyTorch chunked forms (fp32 inside), forward and backward."""
    for ref_fn, cuda_fn, (ins, s0, g), low in (
        (wkv7_chunked, wkv_cuda.wkv7_cuda, _inputs7(2, 2048, 4, 64, seed=2), {0, 2, 3, 4, 5}),
        (wkv6_chunked, wkv_cuda.wkv6_cuda, _inputs6(2, 2048, 4, 64, seed=2), {0, 2, 3}),
    ):
        ins = [x.to(torch.bfloat16) if i in low else x for i, x in enumerate(ins)]
        a = [x.clone().requires_grad_() for x in ins]
        b = [x.float().clone().requires_grad_() for x in ins]
        gy = torch.randn(ins[0].shape, generator=g, device=DEV)
        y, s = cuda_fn(*a, s0)
        y_ref, s_ref = ref_fn(*b, s0)
        (y.float() * gy).sum().backward()
        (y_ref * gy).sum().backward()
        assert _rel(y, y_ref.double()) < 1e-2 and _rel(s, s_ref.double()) < 1e-3
        for x, xr in zip(a, b):
            assert _rel(x.grad, xr.grad.double()) < 2e-2


def test_no_grad_path_rnn_split_and_determinism():
    ins, s0, _ = _inputs7(2, 50, 2, 64, seed=4)
    with torch.no_grad():
        y0, s_0 = wkv_cuda.wkv7_cuda(*ins, s0)
        ya, sa = wkv_cuda.wkv7_cuda(*(x[:, :23] for x in ins), s0)
        yb, sb = wkv_cuda.wkv7_cuda(*(x[:, 23:] for x in ins), sa)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sb, s_0, rtol=1e-5, atol=1e-5)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in ins]
        y, s = wkv_cuda.wkv7_cuda(*leaves, s0)
        assert torch.equal(y.detach(), y0) and torch.equal(s.detach(), s_0)
        (y.square().sum() + s.sum()).backward()
        grads.append([x.grad for x in leaves])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)  # no atomics: bitwise reproducible


def test_inputs_as_the_model_passes_them():
    """w in fp32 and the rest bf16, non-contiguous views, u in bf16 (RWKV-6)."""
    ins, s0, _ = _inputs7(2, 33, 4, 64, seed=5)
    r, w, k, v, a, b = ins
    low = [x.to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2) for x in (r, k, v, a, b)]
    y, _ = wkv_cuda.wkv7_cuda(low[0], w, *low[1:])
    y_ref, _ = wkv7_sequential(*(x.double() for x in (low[0], w, *low[1:])))
    assert y.dtype == torch.bfloat16 and _rel(y, y_ref) < 1e-2

    (r, w, k, v, u), s0, _ = _inputs6(2, 33, 4, 64, seed=5)
    u = u.to(torch.bfloat16).requires_grad_()
    state = s0.clone().requires_grad_()
    y, _ = wkv_cuda.wkv6_cuda(r.bfloat16(), w, k.bfloat16(), v.bfloat16(), u, state)
    y.float().sum().backward()
    assert u.grad.dtype == torch.bfloat16 and torch.isfinite(u.grad).all() and state.grad.abs().sum() > 0


def test_unavailable_reason_for_other_devices():
    assert wkv_cuda.cuda_unavailable_reason() is None
    assert "cpu" in wkv_cuda.cuda_unavailable_reason("cpu")
    assert "head size" in wkv_cuda.cuda_unavailable_reason(head_size=96)


def test_self_test_passes_on_this_gpu():
    """The start-up self-test (rwkv_peft/model/wkv_self_test.py) accepts both kernels here."""
    for version in (7, 6):
        assert wkv_cuda.cuda_unavailable_reason(version=version) is None
    for head_size in (32, 128):
        assert wkv_cuda._check_kernel(torch.device(DEV, torch.cuda.current_device()), head_size, 7) is None


# ----------------------------------------------------------------------------------------
# Whole models: the CUDA op against the PyTorch op
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _wkv_op(name):
    previous = wkv_dispatch.get_op()
    wkv_dispatch.set_op(name)
    try:
        yield
    finally:
        wkv_dispatch.set_op(previous)


def _model(version, dtype):
    from official_layout import rwkv6_state_dict, rwkv7_state_dict

    from rwkv_peft import load_model

    if version == 7:
        sd = rwkv7_state_dict(n_layer=3, n_embd=128, head_size=64, vocab=97, seed=11)
    else:
        sd = rwkv6_state_dict(n_layer=3, n_embd=128, head_size=64, vocab=97, seed=11)
    return load_model(sd, dtype=dtype, device=DEV)


def _run(version, op, dtype, method, grad_cp, tokens):
    from rwkv_peft.peft.adapt import plan_adapters, prepare_peft

    model = _model(version, dtype)
    hparams = {"lora": {"r": 8, "alpha": 16}, "bone": {"r": 16}, "bat": {"r": 16}}[method]
    torch.manual_seed(0)
    methods, _ = prepare_peft(model, plan_adapters(model, [], (method, hparams)))
    with torch.no_grad():  # a trained-looking adapter (LoRA's B and Bone's D start at zero)
        g = torch.Generator(device=DEV).manual_seed(1)
        for p in (p for m in methods.values() for p in m.parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=g, device=DEV).to(p.dtype))
    model.train()
    model.grad_checkpointing = grad_cp
    with _wkv_op(op):
        logits = model(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("version", [7, 6])
@pytest.mark.parametrize("dtype,method,grad_cp", [(torch.float32, "lora", False), (torch.bfloat16, "bone", True),
                                                  (torch.bfloat16, "bat", False)], ids=str)
def test_model_logits_and_adapter_grads_match_torch_op(version, dtype, method, grad_cp):
    tokens = torch.randint(0, 97, (2, 77), generator=torch.Generator().manual_seed(3)).to(DEV)
    logits_cuda, grads_cuda = _run(version, "cuda", dtype, method, grad_cp, tokens)
    logits_torch, grads_torch = _run(version, "torch", dtype, method, grad_cp, tokens)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert _rel(logits_cuda, logits_torch.double()) < tol
    assert grads_cuda.keys() == grads_torch.keys() and grads_cuda
    for name in grads_cuda:
        assert _rel(grads_cuda[name], grads_torch[name].double()) < (1e-3 if dtype == torch.float32 else 5e-2), name


@pytest.mark.parametrize("version", [7, 6])
def test_model_rnn_mode_with_cuda_op(version):
    """Feeding a sequence in pieces with the carried state gives the whole sequence's logits."""
    model = _model(version, torch.float32).eval()
    tokens = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(5)).to(DEV)
    with torch.no_grad(), _wkv_op("cuda"):
        whole = model(tokens)
        state = model.zero_state(2)
        a, state = model(tokens[:, :20], state)
        b, state = model(tokens[:, 20:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-4, atol=1e-4)


def test_a_wrong_kernel_is_caught_once_and_the_model_falls_back(monkeypatch, capsys):
    """A kernel that builds but computes wrong results (planted: the forward output 1% off) fails
    the self-test at its first use; --op auto then runs the PyTorch path with one warning line,
    and --op cuda stops with the reason."""
    from rwkv_peft.errors import RWKVPeftError

    real = wkv_cuda.load_extension(64)

    class Faulty:
        def __getattr__(self, name):
            return getattr(real, name)

        def wkv7_forward(self, *args):
            outs = real.wkv7_forward(*args)
            outs[0] = outs[0] * 1.01
            return outs

    checks = []

    def counted_self_test(*args):
        checks.append(args[1:])
        return self_test(*args)

    self_test = wkv_cuda.self_test
    monkeypatch.setattr(wkv_cuda, "self_test", counted_self_test)
    monkeypatch.setattr(wkv_cuda, "load_extension", lambda head_size, device=None: Faulty())
    # in this process, where the planted fault is (the child would load the real extension)
    monkeypatch.setattr(wkv_cuda, "_self_test_in_child", wkv_cuda._run_self_test)
    monkeypatch.setattr(wkv_cuda, "_reasons", {})
    wkv_dispatch._warn_fallback.cache_clear()
    model = _model(7, torch.float32).eval()
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(6)).to(DEV)
    with torch.no_grad(), _wkv_op("auto"):
        first, second = model(tokens), model(tokens)
    with torch.no_grad(), _wkv_op("torch"):
        reference = model(tokens)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert len(checks) == 1  # once per device and version, not per layer or call
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: WKV CUDA kernel not used: RWKV-7 kernel self-test "
                                                   "failed"), lines
    assert "y (no grad)" in lines[0]
    with torch.no_grad(), _wkv_op("cuda"), pytest.raises(RWKVPeftError, match="self-test failed"):
        model(tokens)
    wkv_dispatch._warn_fallback.cache_clear()
