"""Which WKV implementation runs: the CUDA kernel (`wkv_cuda.py`) or the PyTorch forms (`wkv.py`).

Both forms are imported here and neither imports this module, so the choice lives in one
place: `set_op` (`--op` of train, chat, eval and run, or a test) sets it for the process,
and `wkv7` / `wkv6` (what the model blocks call) apply it per call.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

from ..errors import RWKVPeftError
from .wkv import wkv6_chunked, wkv6_sequential, wkv7_chunked, wkv7_sequential
from . import wkv_cuda

OPS = ("auto", "cuda", "torch")
_op = "auto"  # process-wide, set once at start-up by the trainer (--op) or by tests


def set_op(name: str) -> None:
    """'auto': the CUDA kernel for GPU tensors when it builds and passes its start-up self-test,
    else PyTorch (with one warning line naming the cause); 'cuda': the kernel or an error;
    'torch': always the PyTorch forms."""
    global _op
    if name not in OPS:
        raise ValueError(f"WKV op must be one of {', '.join(OPS)}, got {name!r}")
    _op = name


def get_op() -> str:
    return _op


def wkv7(r, w, k, v, a, b, state=None) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV: the CUDA kernel for GPU tensors when it is usable (see set_op), else
    chunked (one token, as in generation: the plain step, which skips the chunk setup)."""
    if _use_cuda(r, version=7):
        return wkv_cuda.wkv7_cuda(r, w, k, v, a, b, state)
    if r.shape[1] == 1:
        return wkv7_sequential(r, w, k, v, a, b, state)
    return wkv7_chunked(r, w, k, v, a, b, state)


def wkv6(r, w, k, v, u, state=None) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV: the CUDA kernel for GPU tensors when it is usable (see set_op), else
    chunked (one token, as in generation: the plain step, which skips the chunk setup)."""
    if _use_cuda(r, version=6):
        return wkv_cuda.wkv6_cuda(r, w, k, v, u, state)
    if r.shape[1] == 1:
        return wkv6_sequential(r, w, k, v, u, state)
    return wkv6_chunked(r, w, k, v, u, state)


def _use_cuda(r: Tensor, version: int) -> bool:
    if _op == "torch" or r.dtype == torch.float64:
        return False
    if r.device.type != "cuda":
        if _op == "cuda":
            raise RWKVPeftError("--op cuda needs the model on a CUDA GPU; use --op auto or torch on the CPU")
        return False
    return _kernel_accepted(wkv_cuda.cuda_unavailable_reason(r.device, r.shape[-1], version))


def _kernel_accepted(reason: str | None) -> bool:
    """True when there is no reason against the kernel; else fall back with one warning line
    (--op auto) or stop (--op cuda)."""
    if reason is None:
        return True
    if _op == "cuda":
        raise RWKVPeftError(f"--op cuda: the WKV CUDA kernel cannot be used: {reason}")
    _warn_fallback(reason)
    return False


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    """One line on stderr, once per distinct reason."""
    print(f"warning: WKV CUDA kernel not used: {reason}. Going on with the PyTorch chunked path "
          f"(same results, slower). --op torch (train, chat, eval, run) skips the kernel and this "
          f"warning; --op cuda stops instead", file=sys.stderr, flush=True)
