"""Start-up self-test of a WKV kernel against the PyTorch chunked path.

A kernel that builds can still compute wrong results on a given GPU (a compiler or driver
bug, an architecture the code never ran on, a race that shows only there). So before the
first use of the CUDA kernel on a device, rwkv_peft.model.wkv_cuda runs :func:`self_test`
on it: one tiny random problem per kernel dtype (fp32, bf16, fp16), with a state in and
out, checked

* forward without a gradient (the inference path: chat, evaluation),
* forward with a gradient, then backward from random upstream gradients on both the
  output and the final state,

against :func:`rwkv_peft.model.wkv.wkv7_chunked` / ``wkv6_chunked`` run in float64 on the
same device, on the same (dtype-rounded) inputs: the output, the final state and the
gradient of every input, the initial state's included. Milliseconds on a GPU.

The result is None (the kernel agrees) or one line saying what disagreed, by how much, and
what to do; the caller falls back to the PyTorch path (or, with ``--op cuda``, stops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .wkv import wkv6_chunked, wkv7_chunked

__all__ = ["self_test"]

# B, T, H: T = 40 spans two whole 16-step checkpoint chunks of the kernels and a partial
# third one, and more than one 32-step chunk of the PyTorch form.
SHAPE = (2, 40, 2)
# Largest accepted relative error (norm of the difference / norm of the reference). The
# kernels reach about 1e-6 in fp32 and a few 1e-3 in bf16 (rounding of the bf16 outputs and
# gradients), see tests/test_wkv_cuda.py; the margins keep a correct kernel from ever
# failing, while a wrong one is off by 1e-1 or more.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
NAMES = {7: ("r", "w", "k", "v", "a", "b"), 6: ("r", "w", "k", "v", "u")}
# Inputs that are stored in the working dtype (the others, w and RWKV-6's u, stay fp32).
LOW_PRECISION = {7: ("r", "k", "v", "a", "b"), 6: ("r", "k", "v")}


def _inputs(version: int, head_size: int, device, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Model-like random inputs (fp32) and an initial state."""
    B, T, H = SHAPE
    N = head_size

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device) * scale

    x = {"r": randn(B, T, H, N, scale=0.5), "k": randn(B, T, H, N, scale=0.5), "v": randn(B, T, H, N)}
    if version == 7:
        x["w"] = -F.softplus(-(randn(B, T, H, N, scale=2.0) - 1.0)) - 0.5  # the model's w <= -0.5
        kk = F.normalize(randn(B, T, H, N), dim=-1)
        x["a"], x["b"] = -kk, kk * torch.sigmoid(randn(B, T, H, N))
    else:
        x["w"] = torch.rand(B, T, H, N, generator=gen, device=device) * 7 - 6  # decays 1 down to 0.07
        x["u"] = randn(H, N, scale=0.5)
    return {name: x[name] for name in NAMES[version]}, randn(B, H, N, N, scale=0.3)


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _errors(kernel, reference, version, inputs, s0, dtype, gen) -> dict[str, float]:
    """Relative errors of the kernel against the float64 reference, by quantity name."""
    low = LOW_PRECISION[version]
    ins = {n: (x.to(dtype) if n in low else x) for n, x in inputs.items()}
    gy = torch.randn(ins["r"].shape, generator=gen, device=s0.device).to(dtype)
    gs = torch.randn(s0.shape, generator=gen, device=s0.device)

    # The reference: the chunked PyTorch form in float64 on the same rounded inputs.
    ref_leaves = {n: x.detach().double().requires_grad_() for n, x in {**ins, "s0": s0}.items()}
    y_ref, s_ref = reference(*ref_leaves.values())
    ((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum()).backward()

    errors = {}
    with torch.no_grad():  # the inference path (no checkpoints kept)
        y, sT = kernel(*ins.values(), s0)
    errors["y (no grad)"], errors["final state (no grad)"] = _relative_error(y, y_ref), _relative_error(sT, s_ref)

    leaves = {n: x.clone().requires_grad_() for n, x in {**ins, "s0": s0}.items()}
    y, sT = kernel(*leaves.values())
    ((y.float() * gy.float()).sum() + (sT.float() * gs).sum()).backward()
    errors["y"], errors["final state"] = _relative_error(y, y_ref), _relative_error(sT, s_ref)
    for name, x in leaves.items():
        grad = x.grad if x.grad is not None else torch.zeros_like(x)  # a missing gradient is a wrong one
        errors[f"d{name}"] = _relative_error(grad, ref_leaves[name].grad)
    return errors


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def self_test(kernel, version: int, head_size: int, device, seed: int = 0) -> str | None:
    """None when ``kernel`` agrees with the PyTorch chunked path; else one line saying why not.

    kernel: ``(r, w, k, v, a, b, state) -> (y, new_state)`` for version 7, ``(r, w, k, v,
    u, state)`` for version 6, with the conventions of rwkv_peft.model.wkv. Runs under its
    own random generator (the global RNG streams are left alone), with gradients enabled and
    autocast off, and with its own (identity) saved-tensor hooks: it may be first called from
    inside torch.no_grad, inference mode, autocast, or a block's forward under activation
    checkpointing (--grad_cp 1), whose hooks would otherwise capture the test's tensors.
    """
    device = torch.device(device)
    where = f"{device}, {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)
    reference = wkv7_chunked if version == 7 else wkv6_chunked
    gen = torch.Generator(device=device).manual_seed(seed)
    with (torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False),
          torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)):
        inputs, s0 = _inputs(version, head_size, device, gen)
        for dtype, tolerance in TOLERANCE.items():
            dtype_name = str(dtype).removeprefix("torch.")
            try:
                errors = _errors(kernel, reference, version, inputs, s0, dtype, gen)
            except Exception as e:  # a failed launch, an illegal memory access, ...
                return (f"RWKV-{version} kernel self-test failed on {where} ({dtype_name}): {_first_line(e)}; "
                        f"run `python -m pytest tests/test_wkv_cuda.py` for details")
            wrong = [name for name, error in errors.items() if not error <= tolerance]  # NaN is wrong too
            if wrong:
                worst = max(wrong, key=lambda name: math.inf if math.isnan(errors[name]) else errors[name])
                return (f"RWKV-{version} kernel self-test failed on {where} ({dtype_name}, head size {head_size}): "
                        f"differs from the PyTorch chunked path in {', '.join(wrong)} (worst: {worst}, off by "
                        f"{errors[worst]:.1e} relative, tolerance {tolerance:.0e}); the kernel computes wrong "
                        f"results on this GPU: please report it with the output of "
                        f"`python -m pytest tests/test_wkv_cuda.py`")
    return None
