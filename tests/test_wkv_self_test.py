"""The start-up self-test of the WKV CUDA kernel (rwkv_peft/model/wkv_self_test.py) and the
fallback decision around it (rwkv_peft/model/wkv_cuda.py, wkv_dispatch.py), on the CPU.

Stand-ins for the kernel: the per-token loops of rwkv_peft.model.wkv (an implementation
independent of the chunked form the self-test compares with) must pass; kernels with one
planted fault each (built on the fast chunked form: the fault is what is tested) must fail
with one line naming the fault. A failing build is injected through load_extension. The
self-test's child process is exercised with stand-in children (one killed by a signal, one
that exits early, one that hangs, one that passes) and with the real child command; the
shared-memory check with the properties of cards that have too little. tests/test_cuda_compile.py
runs the self-test on the real kernel sources (host emulation); tests/test_wkv_cuda.py on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.model import wkv_cuda, wkv_dispatch
from rwkv_peft.model.wkv import wkv6_chunked, wkv6_sequential, wkv7_chunked, wkv7_sequential
from rwkv_peft.model.wkv_self_test import self_test

SEQUENTIAL = {7: wkv7_sequential, 6: wkv6_sequential}


@pytest.mark.parametrize("version", [7, 6])
def test_a_correct_kernel_passes(version):
    assert self_test(SEQUENTIAL[version], version, 16, "cpu") is None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient comes back scaled (a planted backward fault)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _ignores_initial_state(*x):
    return wkv7_chunked(*x[:-1], None)


def _wrong_partial_chunk(*x):
    y, s = wkv7_chunked(*x)
    return torch.cat([y[:, :32], y[:, 32:] * 1.05], 1), s  # the steps after the second 16-step chunk


def _wrong_grad_w(r, w, *rest):
    return wkv7_chunked(r, _ScaleGrad.apply(w, 1.1), *rest)


def _no_grad_to_state(*x):
    return wkv7_chunked(*x[:-1], x[-1].detach())


def _wrong_in_bf16_only(*x):
    y, s = wkv7_chunked(*x)
    return (y.flip(1) if y.dtype == torch.bfloat16 else y), s


def _wrong_without_grad_only(*x):
    y, s = wkv7_chunked(*x)
    return (y if torch.is_grad_enabled() else y * 0.9), s


def _nan_output(*x):
    y, s = wkv7_chunked(*x)
    y = y.clone()
    y[0, 0, 0, 0] = float("nan")
    return y, s


def _crashes(*x):
    raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")


@pytest.mark.parametrize("kernel,dtype,expected", [
    (_ignores_initial_state, "float32", ["y (no grad)", "y", "ds0"]),
    (_wrong_partial_chunk, "float32", ["y (no grad)", "y", "dr"]),
    (_wrong_grad_w, "float32", ["dw"]),
    (_no_grad_to_state, "float32", ["ds0"]),
    (_wrong_in_bf16_only, "bfloat16", ["y (no grad)", "y"]),
    (_wrong_without_grad_only, "float32", ["y (no grad)"]),
    (_nan_output, "float32", ["y (no grad)", "y"]),
], ids=lambda x: getattr(x, "__name__", "")[1:] or None)
def test_a_wrong_kernel_is_caught_in_one_line(kernel, dtype, expected):
    reason = self_test(kernel, 7, 16, "cpu")
    assert reason is not None and "\n" not in reason
    head = f"RWKV-7 kernel self-test failed on cpu ({dtype}, head size 16): "
    assert reason.startswith(head), reason
    assert reason[len(head):].startswith("differs from the PyTorch chunked path in "), reason
    wrong = reason.split(" chunked path in ")[1].split(" (worst")[0].split(", ")
    assert set(expected) <= set(wrong), reason
    if kernel in (_wrong_grad_w, _no_grad_to_state, _wrong_without_grad_only):
        assert wrong == expected, reason  # only the planted fault


def test_a_crashing_kernel_is_caught_in_one_line():
    reason = self_test(_crashes, 7, 16, "cpu")
    assert reason == ("RWKV-7 kernel self-test failed on cpu (float32): RuntimeError: CUDA error: an illegal memory "
                      "access was encountered; run `python -m pytest tests/test_wkv_cuda.py` for details")


def test_rwkv6_state_fault_is_caught():
    reason = self_test(lambda *x: wkv6_chunked(*x[:-1], None), 6, 16, "cpu")
    assert reason is not None and reason.startswith("RWKV-6 kernel self-test failed")


def test_first_use_inside_inference_mode_leaves_rng_and_modes_alone():
    """Chat and evaluation make their first WKV call under inference mode or no_grad."""
    rng = torch.get_rng_state()
    with torch.inference_mode():
        assert self_test(wkv7_chunked, 7, 16, "cpu") is None
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("kernel,passes", [(wkv7_chunked, True), (_wrong_grad_w, False)],
                         ids=["correct", "wrong"])
def test_first_use_inside_an_activation_checkpoint(kernel, passes):
    """With --grad_cp 1 the first WKV call runs inside a block under non-reentrant activation
    checkpointing: the self-test must neither trip its saved-tensor hooks nor disturb the
    block's backward."""
    from torch.utils.checkpoint import checkpoint

    reasons = []

    def block(x):
        if not reasons:  # as in wkv_cuda: once, not again in the recomputation
            reasons.append(self_test(kernel, 7, 16, "cpu"))
        return (x * 2).sin()

    x = torch.linspace(-1, 1, 5, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert (reasons[0] is None) == passes
    torch.testing.assert_close(x.grad, 2 * torch.cos(2 * x.detach()))


def test_a_failing_build_is_reported_with_its_error_line(monkeypatch):
    def failing_build(head_size, device):
        raise RuntimeError("Error building extension 'rwkv_peft_wkv_sm90_n64':\n[1/3] nvcc -c wkv7.cu\n"
                           "cuda/wkv7.cu(12): error: identifier \"foo\" is undefined\nninja: build stopped")

    monkeypatch.setattr(wkv_cuda, "load_extension", failing_build)
    reason = wkv_cuda._check_kernel(torch.device("cpu"), 64, 7)
    assert reason == ('CUDA extension build failed: cuda/wkv7.cu(12): error: identifier "foo" is undefined '
                      "(RWKV_PEFT_CUDA_VERBOSE=1 shows the whole build)")


@pytest.fixture
def op():
    previous = wkv_dispatch.get_op()
    wkv_dispatch._warn_fallback.cache_clear()
    yield wkv_dispatch.set_op
    wkv_dispatch.set_op(previous)
    wkv_dispatch._warn_fallback.cache_clear()


def test_auto_falls_back_with_one_warning_line_once(op, capsys):
    op("auto")
    reason = "RWKV-7 kernel self-test failed on cuda:0 (X): dw is off by 3.0e-01"
    assert wkv_dispatch._kernel_accepted(reason) is False
    assert wkv_dispatch._kernel_accepted(reason) is False
    assert wkv_dispatch._kernel_accepted(None) is True
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: WKV CUDA kernel not used: " + reason)
    assert "PyTorch chunked path" in lines[0] and "--op torch" in lines[0]


def test_op_cuda_stops_with_the_reason(op, capsys):
    op("cuda")
    with pytest.raises(RWKVPeftError, match="--op cuda: the WKV CUDA kernel cannot be used: .*dw is off"):
        wkv_dispatch._kernel_accepted("RWKV-7 kernel self-test failed on cuda:0 (X): dw is off by 3.0e-01")
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------
# The self-test runs in a child process (a crash there must not take the caller down)
# ----------------------------------------------------------------------------------------


def _built(folder):
    """What load_extension returns, as far as the self-test's caller looks at it: a module file
    in its build folder."""
    return SimpleNamespace(__file__=str(folder / "ext.so"))


def _child(body: str):
    """A stand-in for the self-test child: `body` runs first, then the real child code."""
    code = ("import json, os, signal, sys\nfrom rwkv_peft.model import wkv_cuda\n" + body +
            "\nwkv_cuda._self_test_child(json.loads(sys.argv[1]))\n")
    return lambda spec: [sys.executable, "-c", code, json.dumps(spec)]


# every binding kills its process, as a kernel that makes an illegal memory access takes its
# CUDA context and, at the next CUDA call, the process down
CRASHING = """
class Crashing:
    def __getattr__(self, name):
        return lambda *args: os.kill(os.getpid(), signal.SIGSEGV)

wkv_cuda.load_extension = lambda head_size, device: Crashing()
"""


@pytest.fixture
def built(tmp_path, monkeypatch):
    monkeypatch.setattr(wkv_cuda, "load_extension", lambda head_size, device: _built(tmp_path))
    return tmp_path


def test_a_kernel_that_kills_its_process_is_a_one_line_fallback(built, monkeypatch, op, capsys):
    """Before the fix the self-test ran in the calling process, which this kernel kills."""
    monkeypatch.setattr(wkv_cuda, "_child_command", _child(CRASHING))
    reason = wkv_cuda._check_kernel(torch.device("cpu"), 16, 7)
    assert reason == "RWKV-7 kernel self-test on cpu crashed (killed by SIGSEGV)"
    assert torch.ones(3).sum().item() == 3  # this process goes on
    op("auto")
    assert wkv_dispatch._kernel_accepted(reason) is False
    assert capsys.readouterr().err.startswith(f"warning: WKV CUDA kernel not used: {reason}. Going on with")
    assert list(built.iterdir()) == []  # a failure is not recorded: checked again next run


@pytest.mark.slow  # a child process: starting Python and torch takes seconds
def test_a_child_that_exits_early_is_reported_with_its_last_line(built, monkeypatch):
    monkeypatch.setattr(wkv_cuda, "_child_command", _child(
        "print('RuntimeError: CUDA error: an illegal memory access was encountered', file=sys.stderr)\n"
        "sys.stderr.flush()\nos._exit(3)"))
    assert wkv_cuda._check_kernel(torch.device("cpu"), 16, 6) == (
        "RWKV-6 kernel self-test on cpu crashed (exit code 3: RuntimeError: CUDA error: an illegal memory access "
        "was encountered)")


@pytest.mark.slow  # a child process: starting Python and torch takes seconds
def test_a_hung_child_is_given_up(built, monkeypatch):
    monkeypatch.setattr(wkv_cuda, "SELF_TEST_TIMEOUT_S", 1)
    monkeypatch.setattr(wkv_cuda, "_child_command", _child("import time\ntime.sleep(60)"))
    assert wkv_cuda._check_kernel(torch.device("cpu"), 16, 7) == (
        "RWKV-7 kernel self-test on cpu did not finish in 1 s (a hung kernel?)")


@pytest.mark.slow  # a child process: starting Python and torch takes seconds
def test_a_pass_is_recorded_beside_the_build_and_not_run_again(built, monkeypatch):
    monkeypatch.setattr(wkv_cuda, "_child_command", _child(
        "wkv_cuda.load_extension = lambda *args: None\nwkv_cuda._run_self_test = lambda *args: None"))
    assert wkv_cuda._check_kernel(torch.device("cpu"), 16, 7) is None
    assert [p.name for p in built.iterdir()] == ["self-test-passed-v7-cpu"]

    def no_child(*args, **kwargs):
        raise AssertionError("the child ran again")

    monkeypatch.setattr(subprocess, "run", no_child)
    assert wkv_cuda._check_kernel(torch.device("cpu"), 16, 7) is None


@pytest.mark.slow  # a child process: starting Python and torch takes seconds
def test_a_wrong_kernel_in_the_child_is_reported_as_its_self_test_says(built, monkeypatch):
    """The child's own verdict (here: the real self-test on a planted wrong kernel) comes back as is."""
    monkeypatch.setattr(wkv_cuda, "_child_command", _child(
        "wkv_cuda.load_extension = lambda *args: None\n"
        "from rwkv_peft.model.wkv import wkv7_chunked\nfrom rwkv_peft.model.wkv_self_test import self_test\n"
        "wrong = lambda *x: (wkv7_chunked(*x)[0] * 1.1, wkv7_chunked(*x)[1])\n"
        "wkv_cuda._run_self_test = lambda ext, device, n, v: self_test(wrong, v, n, device)"))
    reason = wkv_cuda._check_kernel(torch.device("cpu"), 16, 7)
    assert reason.startswith("RWKV-7 kernel self-test failed on cpu (float32, head size 16): differs from the "
                             "PyTorch chunked path in y (no grad), y"), reason


@pytest.mark.slow  # a child process: starting Python and torch takes seconds
def test_the_real_child_reports_on_a_machine_without_a_gpu(tmp_path):
    """The child command as shipped, end to end: it cannot load a CUDA build here, and says so."""
    reason = wkv_cuda._self_test_in_child(_built(tmp_path), torch.device("cpu"), 16, 7)
    assert reason is not None and "\n" not in reason
    assert reason.startswith("RWKV-7 kernel self-test could not run on cpu: "), reason


# ----------------------------------------------------------------------------------------
# Shared memory: the opt-in limit per block, checked before building or launching
# ----------------------------------------------------------------------------------------

T4 = SimpleNamespace(name="Tesla T4", major=7, minor=5, shared_memory_per_block_optin=64 * 1024)
A100 = SimpleNamespace(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, shared_memory_per_block_optin=163 * 1024)


def test_shared_memory_needs_of_each_kernel():
    """The bytes cuda/wkv7.cu and cuda/wkv6.cu ask for (tests/test_cuda_compile.py checks them
    against the kernels themselves): RWKV-7's backward at head size 128 is the largest."""
    assert wkv_cuda.shared_memory_bytes(7, 128) == {"forward": 49152, "backward": 74752}
    assert wkv_cuda.shared_memory_bytes(6, 128) == {"forward": 40960, "backward": 57344}
    assert wkv_cuda.shared_memory_bytes(7, 64) == {"forward": 24576, "backward": 37376}


@pytest.mark.parametrize("props,head_size,version,ok", [
    (T4, 128, 7, False), (T4, 64, 7, True), (T4, 128, 6, True), (A100, 128, 7, True)])
def test_shared_memory_beyond_the_opt_in_limit_is_one_line(props, head_size, version, ok):
    reason = wkv_cuda._shared_memory_reason(props, head_size, version)
    if ok:
        assert reason is None
    else:
        assert reason == ("the RWKV-7 backward kernel at head size 128 needs 74,752 B of shared memory per block, "
                          "more than the 65,536 B that Tesla T4 (sm_75) allows")


def test_a_card_with_too_little_shared_memory_falls_back_before_any_build(monkeypatch):
    """Before the fix the build and self-test ran, and the failed opt-in surfaced later as a
    CUDA error in an unrelated op."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: T4)
    monkeypatch.setattr(wkv_cuda, "_device", lambda device: torch.device("cuda", 5))
    monkeypatch.setattr(wkv_cuda, "_toolchain_reason", lambda device, head_size: None)

    def no_build(*args):
        raise AssertionError("built and self-tested a kernel that cannot launch")

    monkeypatch.setattr(wkv_cuda, "_check_kernel", no_build)
    monkeypatch.setattr(wkv_cuda, "_reasons", {})
    assert "needs 74,752 B of shared memory" in wkv_cuda.cuda_unavailable_reason("cuda:5", 128, 7)


@pytest.mark.parametrize("module", ["chat", "eval", "run"])
def test_chat_eval_and_run_take_op(module, op, tmp_path, capsys):
    """--op reaches the dispatch before the model loads (here: a missing file, so nothing runs)."""
    import importlib

    op("auto")
    main = importlib.import_module(f"rwkv_peft.{module}").main
    extra = ["--prompt", "hi"] if module == "chat" else []
    assert main(["--op", "torch", "--model", str(tmp_path / "missing.pth"), *extra]) != 0
    assert wkv_dispatch.get_op() == "torch"
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--op", "triton"])
    assert "invalid choice: 'triton'" in capsys.readouterr().err
