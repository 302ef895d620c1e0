"""Loading official RWKV-6/RWKV-7 checkpoints into `RWKV` modules."""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
import torch.nn as nn

from ..errors import RWKVPeftError
from ..io import load_tensor_file
from .config import RWKVConfig, infer_config
from .rwkv import RWKV
from .time_state import load_state_file


def check_state_dict(sd: Mapping[str, torch.Tensor], model: RWKV, source: str = "checkpoint") -> None:
    """Every key of the model present with its shape, nothing else: else one line naming the key."""
    expected = model.state_dict()
    kind = f"RWKV-{model.config.version}"
    for key, ref in expected.items():
        if key not in sd:
            raise RWKVPeftError(
                f"{source}: missing key '{key}' (expected shape {list(ref.shape)} for this {kind} model)")
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            raise RWKVPeftError(f"{source}: key '{key}' holds a {type(t).__name__}, expected a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            raise RWKVPeftError(
                f"{source}: key '{key}' has shape {list(t.shape)}, expected {list(ref.shape)} "
                f"for this {kind} model")
        if not t.is_floating_point():
            raise RWKVPeftError(f"{source}: key '{key}' has dtype {t.dtype}, expected floating point")
    for key in sd:
        if key not in expected:
            raise RWKVPeftError(f"{source}: unexpected key '{key}' for an {kind} checkpoint")


def build_model(config: RWKVConfig, sd: Mapping[str, torch.Tensor], *, dtype=None, device="cpu",
                source: str = "checkpoint", copy: bool = True, quantizing: bool = False) -> RWKV:
    """An RWKV module holding the tensors of sd (checked against config), cast to dtype.

    copy=False lets the model share memory with sd where no cast is needed: only for a
    state dict nobody else holds (a freshly loaded file), since training writes in place.
    quantizing=True leaves every linear weight as sd holds it (memory-mapped, in the file's
    dtype) for the caller to quantize one layer at a time (peft/adapt.py: quantize_linears):
    no full-precision copy of those weights is ever made.
    """
    with torch.device("meta"):
        model = RWKV(config)
    check_state_dict(sd, model, source)
    if dtype is None:
        dtype = sd["emb.weight"].dtype
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors = {k: v if quantizing and k in linear_weights else v.to(device=device, dtype=dtype, copy=copy)
               for k, v in sd.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def load_model(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], *,
               state: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", quantizing: bool = False,
               check: Callable[[Mapping[str, torch.Tensor], str], None] | None = None) -> RWKV:
    """Load an official RWKV-6 or RWKV-7 checkpoint (a .pth/.safetensors path or a state dict).

    Every size is inferred from tensor shapes. dtype=None keeps the checkpoint's dtype
    (official files are bf16); pass torch.float32 for exact CPU inference.
    state: a state file (blocks.<i>.att.time_state) to start from instead of the checkpoint's own.
    quantizing: linear weights stay memory-mapped in the file's dtype, to be quantized next
    (see build_model).
    check(sd, source): a caller's check of the tensors before the model is built (an adapter's
    base fingerprint: rwkv_peft.peft.load).
    """
    if isinstance(checkpoint, Mapping):
        sd, source = checkpoint, "state dict"
    else:
        sd, source = load_tensor_file(checkpoint), str(checkpoint)
    try:
        config = infer_config(sd)
    except RWKVPeftError as e:
        raise RWKVPeftError(f"{source}: {e}") from None
    if check is not None:
        check(sd, source)
    # a caller's state dict is copied so that training never writes into it
    model = build_model(config, sd, dtype=dtype, device=device, source=source,
                        copy=isinstance(checkpoint, Mapping), quantizing=quantizing)
    if state is not None:
        load_state_file(model, state)
    return model.eval()
