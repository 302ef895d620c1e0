"""The learned initial WKV state of state tuning (att.time_state): giving a model one, state files.

Every layer i holds one fp32 tensor `blocks.{i}.att.time_state` [H, N, N], in the layout
official files use: RWKV-7 [head, value, key], the official package's own WKV state;
RWKV-6 [head, value, key], as official state-tuned checkpoints store it (the RWKV-6
recurrence runs on the transpose, see TimeMix6.initial_wkv_state).

State files hold only these keys: ours, written by `merge.py --state_only`, are .pth (what
desktop runtimes load beside an unchanged base) or .safetensors (which also records the
model version and sizes); RWKV-PEFT's state-tuning files are .pth, keys optionally
prefixed `model.`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from ..errors import RWKVPeftError
from ..io import atomic_write, check_checkpoint_suffix, load_tensor_file, save_checkpoint_file
from .config import RWKVConfig

META_KEY = "rwkv_peft_state"


def state_key(layer: int) -> str:
    return f"blocks.{layer}.att.time_state"


def is_state_key(key: str) -> bool:
    return key.startswith("blocks.") and key.endswith(".att.time_state")


def state_parts(parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned initial states among an adapter's whole tensors (--train_parts), by key."""
    return {k: t for k, t in parts.items() if is_state_key(k)}


def add_time_state(model) -> dict[str, nn.Parameter]:
    """Give every layer a learned initial state, zeros (the model's outputs do not change)
    where it has none yet; returns {official key: parameter}."""
    cfg = model.config
    ref = model.emb.weight
    for block in model.blocks:
        if not hasattr(block.att, "time_state"):
            shape = (cfg.n_head, cfg.head_size, cfg.head_size)
            block.att.time_state = nn.Parameter(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
    cfg.time_state = True
    return {state_key(i): block.att.time_state for i, block in enumerate(model.blocks)}


def check_states(states: Mapping[str, torch.Tensor], config: RWKVConfig, source: str,
                 recorded: dict | None = None) -> None:
    """Refuse states that do not fit the model: one line naming the key and what to do.

    recorded: the version and sizes the file says it was trained on, when it says.
    """
    kind = f"RWKV-{config.version}"
    if recorded and recorded.get("version") and recorded.get("version") != config.version:
        raise RWKVPeftError(f"{source} is a state for RWKV-{recorded.get('version')}, but the base is {kind}; "
                            "pass a state trained on this base")
    H, N, L = config.n_head, config.head_size, config.n_layer
    for key, t in states.items():
        m = key.split(".")
        if not is_state_key(key) or not m[1].isdigit() or int(m[1]) >= L:
            raise RWKVPeftError(f"{source}: '{key}' is no layer's state in this {L}-layer {kind} model "
                                f"(keys are blocks.0..{L - 1}.att.time_state); was it trained on another base?")
        if tuple(t.shape) != (H, N, N):
            raise RWKVPeftError(f"{source}: '{key}' has shape {list(t.shape)}, but this {kind} model "
                                f"({config.n_embd} channels, head size {N}) needs {[H, N, N]}; "
                                "was it trained on another base?")
    missing = [state_key(i) for i in range(L) if state_key(i) not in states]
    if missing:
        raise RWKVPeftError(f"{source} has no '{missing[0]}' (it holds {len(states)} of this model's {L} layers); "
                            "was it trained on another base?")


def set_time_state(model, states: Mapping[str, torch.Tensor], source: str, recorded: dict | None = None) -> None:
    """Check states against the model and make them its learned initial state."""
    check_states(states, model.config, source, recorded)
    params = add_time_state(model)
    with torch.no_grad():
        for key, t in states.items():
            params[key].copy_(t)


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(states by official key, the recorded model version and sizes or None) of a state file."""
    path = Path(path)
    recorded = None
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            recorded = json.loads(meta[META_KEY]) if META_KEY in meta else None
        except (SafetensorError, OSError, ValueError) as e:
            raise RWKVPeftError(f"state file {path} is not a readable safetensors file: {e}") from None
        if recorded is not None and not (isinstance(recorded, dict) and recorded.get("version") in (6, 7)):
            raise RWKVPeftError(f"state file {path}: its {META_KEY} metadata is malformed (expected a table with "
                                "version 6 or 7); re-save it with merge.py --state_only")
    sd = load_tensor_file(path, what="state file")  # refuses NaN and Inf, naming the tensor
    states = {}
    for key, t in sd.items():
        if not isinstance(key, str):
            raise RWKVPeftError(f"state file {path}: key {key!r} is not a tensor name (it is of type "
                                f"{type(key).__name__})")
        key = key.removeprefix("model.")
        if not is_state_key(key):
            raise RWKVPeftError(f"{path} is not a state file: it holds '{key}' (a state file holds only "
                                "blocks.<i>.att.time_state); pass an adapter as --adapter, or write the state "
                                "alone with merge.py --state_only")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise RWKVPeftError(f"state file {path}: '{key}' is not a floating-point tensor")
        states[key] = t.float()
    if not states:
        raise RWKVPeftError(f"state file {path} holds no blocks.<i>.att.time_state tensors")
    return states, recorded


def load_state_file(model, path: str | os.PathLike) -> None:
    """Make the states of a state file the model's learned initial state."""
    states, recorded = read_state_file(path)
    set_time_state(model, states, f"state file {path}", recorded)


def save_state_file(path: str | os.PathLike, states: Mapping[str, torch.Tensor], version: int | None,
                    flag: str = "--output") -> None:
    """Write states (fp32) as .pth (plain, for desktop runtimes) or .safetensors (recording the version)."""
    check_checkpoint_suffix(path, flag)
    tensors = {k: t.detach().float().cpu().contiguous() for k, t in sorted(states.items())}
    if Path(path).suffix == ".safetensors" and version is not None:
        from safetensors.torch import save

        H, N, _ = next(iter(tensors.values())).shape
        meta = {"version": version, "n_layer": len(tensors), "n_head": H, "head_size": N}
        data = save(tensors, metadata={META_KEY: json.dumps(meta)})
        atomic_write(path, lambda f: f.write(data))
    else:
        save_checkpoint_file(tensors, path, flag)
