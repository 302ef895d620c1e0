"""Training on from a trained adapter (train.py --init_adapter FILE): SFT first, then DPO, say.

The adapter's own methods and hyperparameters are attached to the base with its trained values
(not fresh ones), and they go on training; a learned initial state in it goes on training too.
The run's adapter file is then a complete adapter of the same kind, merged, chatted with and
evaluated on the base like any other; its metadata names the adapter it started from
(`base.init_adapter`: path and content hash).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import RWKVPeftError
from ..model.time_state import add_time_state, set_time_state, state_parts
from .adapt import attach_adapters, part_parameters, quantize_linears
from .adapter_file import check_base, read_adapter


def origin_record(path: str) -> dict:
    """What the new adapter file records about the adapter it started from."""
    return {"path": str(Path(path).resolve()), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def continue_adapter(model, path: str, base_sd: dict, train_parts=(), *, quant: str | None = None,
                     quant_targets: str = "adapted") -> tuple[dict, dict]:
    """(methods, trained parts) with the adapter at path attached to model, its values loaded."""
    if not Path(path).is_file():
        raise RWKVPeftError(f"--init_adapter {path} not found; give an adapter.safetensors a run wrote")
    adapter = read_adapter(path)
    check_base(adapter, base_sd, "--load_model")
    states = state_parts(adapter.parts)
    if len(adapter.parts) > len(states):
        raise RWKVPeftError(f"--init_adapter {path} trained whole tensors (--train_parts ln/time/emb/head); "
                            "continuing such an adapter is not supported yet: merge it into a new base instead")
    methods = attach_adapters(model, adapter.layers, init=False)  # quantized below, once the weights are final
    for module, method in methods.items():
        method.load_tensors(adapter.tensors.get(module, {}), f"--init_adapter {path} at {module}")
        if method.frozen_weight_from_tensors:  # PiSSA: the frozen residual of the adapter's own B0 A0
            layer = model.get_submodule(module)
            # a new tensor: the base's own stays intact in base_sd (merges, resume and the fingerprint read it)
            layer.weight = torch.nn.Parameter(method.frozen_weight(layer.weight.detach()), requires_grad=False)
    parts = part_parameters(model, train_parts)
    if states:
        set_time_state(model, states, f"--init_adapter {path}", adapter.base)
        parts.update(add_time_state(model))  # a state it learned goes on learning
    for p in parts.values():
        p.requires_grad_(True)
    if quant:
        quantize_linears(model, quant, quant_targets)
    return methods, parts
