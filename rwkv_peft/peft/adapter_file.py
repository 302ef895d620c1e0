"""Adapter files: only the trained tensors, plus a config of every layer's method.

Our format is safetensors (no pickle at all, by construction), tensor names following the
official module names:
    <module>.lora_A [r, in]   <module>.lora_B [out, r]          LoRA
    ... plus <module>.init_A, <module>.init_B                    PiSSA (initial factors, for merge)
    <module>.bone [r, out]                                       Bone
    <module>.bat [in/r, r, r]                                    Bat
    <official key>                                               whole tensors of --train_parts
and metadata "rwkv_peft" = JSON {"layers": {module: {"method", hyperparameters}},
"parts": [...], "base": {what the base was: sizes, file, fingerprint}}.

Adapter files of the RWKV-PEFT project (.pth) are read too: <module>.disha (2-D = Bone,
3-D = Bat), <module>.bone, <module>.lora_A/lora_B, an optional "model." key prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import RWKVPeftError
from ..io import atomic_write, load_tensor_file
from ..model.rwkv import RWKV
from .adapt import attach_adapters
from .methods import METHODS, PeftMethod

FORMAT = "rwkv-peft-adapter/1"


@dataclass
class Adapter:
    layers: dict[str, tuple[str, dict]]              # module -> (method, hparams)
    tensors: dict[str, dict[str, torch.Tensor]]      # module -> {tensor name: tensor}
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # official key -> whole tensor
    base: dict | None = None                         # what the base checkpoint was (None: unknown)
    source: str = "adapter"


def base_fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """A fast content hash of a checkpoint: names, shapes, and a strided sample of each tensor.

    Samples are rounded to bf16, so the same weights stored as fp32 or bf16 agree.
    """
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        h.update(f"{key}{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024]
        h.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def describe_base(sd: Mapping[str, torch.Tensor], config, path: str | os.PathLike | None) -> dict:
    return {"version": config.version, "n_layer": config.n_layer, "n_embd": config.n_embd,
            "vocab_size": config.vocab_size, "path": str(Path(path).resolve()) if path else None,
            "fingerprint": base_fingerprint(sd)}


def save_adapter(path: str | os.PathLike, methods: Mapping[str, PeftMethod],
                 parts: Mapping[str, torch.Tensor], base: dict) -> None:
    """Write an adapter file atomically."""
    from safetensors.torch import save

    tensors, layers = {}, {}
    for module, method in methods.items():
        layers[module] = {"method": method.name, **method.hparams()}
        for name, t in method.tensors().items():
            tensors[f"{module}.{name}"] = t.detach().to("cpu").contiguous()
    for key, t in parts.items():
        tensors[key] = t.detach().to("cpu").contiguous()
    config = {"format": FORMAT, "layers": layers, "parts": sorted(parts), "base": base}
    data = save(tensors, metadata={"rwkv_peft": json.dumps(config)})
    atomic_write(path, lambda f: f.write(data))


def read_adapter(path: str | os.PathLike, *, lora_alpha: float | None = None) -> Adapter:
    """Read one of our .safetensors adapters, or an RWKV-PEFT .pth adapter.

    lora_alpha: RWKV-PEFT files do not record LoRA's alpha; pass the value used in training
    (default: alpha = r, a scale of 1).
    """
    path = Path(path)
    if not path.exists():
        raise RWKVPeftError(f"adapter not found: {path}")
    if path.suffix == ".safetensors":
        return _read_ours(path)
    return _read_rwkv_peft(path, lora_alpha)


def _read_ours(path: Path) -> Adapter:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise RWKVPeftError(f"adapter {path} is not a readable safetensors file: {e}") from None
    if "rwkv_peft" not in meta:
        raise RWKVPeftError(f"adapter {path} has no rwkv_peft config in its metadata; "
                            "was it written by rwkv-peft?")
    try:
        config = json.loads(meta["rwkv_peft"])
        layers = {m: (spec["method"], {k: v for k, v in spec.items() if k != "method"})
                  for m, spec in config["layers"].items()}
        part_keys = list(config.get("parts", []))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RWKVPeftError(f"adapter {path}: malformed rwkv_peft config ({e})") from None
    tensors: dict[str, dict[str, torch.Tensor]] = {m: {} for m in layers}
    parts = {}
    for key, t in flat.items():
        if key in part_keys:
            parts[key] = t
            continue
        module, _, name = key.rpartition(".")
        if module not in tensors:
            raise RWKVPeftError(f"adapter {path}: tensor '{key}' belongs to no configured layer")
        tensors[module][name] = t
    for key in part_keys:
        if key not in parts:
            raise RWKVPeftError(f"adapter {path}: missing trained tensor '{key}'")
    return Adapter(layers, tensors, parts, config.get("base"), str(path))


def _read_rwkv_peft(path: Path, lora_alpha: float | None) -> Adapter:
    sd = load_tensor_file(path, what="adapter")
    layers, tensors, parts = {}, {}, {}
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise RWKVPeftError(f"adapter {path}: key '{key}' is not a tensor")
        key = key.removeprefix("model.")
        module, _, name = key.rpartition(".")
        if name in ("disha", "bone"):
            if t.dim() == 2:      # Bone D [r, out]
                layers[module] = ("bone", {"r": t.shape[0]})
                tensors.setdefault(module, {})["bone"] = t
            elif t.dim() == 3:    # Bat D [in/r, r, r], indexed by the input block
                layers[module] = ("bat", {"r": t.shape[1]})
                tensors.setdefault(module, {})["bat"] = t
            else:
                raise RWKVPeftError(f"adapter {path}: '{key}' has shape {list(t.shape)}; "
                                    "expected 2-D (Bone) or 3-D (Bat)")
        elif name in ("lora_A", "lora_B"):
            tensors.setdefault(module, {})[name] = t
        else:
            parts[key] = t
    for module, ts in tensors.items():
        if module in layers:
            continue
        if set(ts) != {"lora_A", "lora_B"}:
            raise RWKVPeftError(f"adapter {path}: layer {module} has {sorted(ts)}; LoRA needs lora_A and lora_B")
        r = ts["lora_A"].shape[0]
        layers[module] = ("lora", {"r": r, "alpha": float(lora_alpha if lora_alpha is not None else r),
                                   "dropout": 0.0})
    if not layers and not parts:
        raise RWKVPeftError(f"adapter {path} holds no adapter tensors")
    return Adapter(layers, tensors, parts, None, str(path))


def recorded_base(adapter: Adapter, name: str | os.PathLike, fix: str, what: str = "base checkpoint") -> str:
    """The base checkpoint path recorded in adapter; RWKVPeftError "{name} does not record its {what}; {fix}"
    when it has none."""
    base = (adapter.base or {}).get("path")
    if not base:
        raise RWKVPeftError(f"{name} does not record its {what}; {fix}")
    return base


def check_base(adapter: Adapter, sd: Mapping[str, torch.Tensor], base_name: str) -> None:
    """Refuse a base the adapter was not trained on (layer shapes, then content fingerprint)."""
    for module, (method, hparams) in adapter.layers.items():
        key = f"{module}.weight"
        if key not in sd:
            raise RWKVPeftError(f"{adapter.source} adapts '{module}', but base {base_name} has no '{key}'")
        out_f, in_f = sd[key].shape
        try:
            fitted = METHODS[method](in_f, out_f, **hparams)
        except (RWKVPeftError, TypeError, KeyError) as e:
            raise RWKVPeftError(f"{adapter.source} does not fit base {base_name} at {module}: {e}") from None
        expected = {name: list(t.shape) for name, t in fitted.tensors().items()}
        for name, t in adapter.tensors.get(module, {}).items():
            if name in expected and list(t.shape) != expected[name]:
                raise RWKVPeftError(f"{adapter.source}: '{module}.{name}' has shape {list(t.shape)}, but base "
                                    f"{base_name} needs {expected[name]}; was it trained on another model?")
    for key, t in adapter.parts.items():
        if key not in sd or tuple(sd[key].shape) != tuple(t.shape):
            have = list(sd[key].shape) if key in sd else "no such key"
            raise RWKVPeftError(f"{adapter.source}: trained tensor '{key}' {list(t.shape)} does not fit base "
                                f"{base_name} ({have})")
    recorded = (adapter.base or {}).get("fingerprint")
    if recorded and recorded != base_fingerprint(sd):
        trained_on = (adapter.base or {}).get("path") or "unknown"
        raise RWKVPeftError(f"{adapter.source} was trained on a different base (fingerprint {recorded}, "
                            f"{base_name} has {base_fingerprint(sd)}); pass the base it was trained on: {trained_on}")


def apply_adapter(model: RWKV, adapter: Adapter) -> dict[str, PeftMethod]:
    """Attach the adapter's methods with its trained values (unmerged) and copy trained parts."""
    methods = attach_adapters(model, adapter.layers, init=False)
    for module, method in methods.items():
        method.load_tensors(adapter.tensors.get(module, {}), f"{adapter.source} at {module}")
        layer = model.get_submodule(module)
        layer.weight = torch.nn.Parameter(method.frozen_weight(layer.weight.detach()), requires_grad=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in adapter.parts.items():
            params[key].copy_(t)
    return methods
