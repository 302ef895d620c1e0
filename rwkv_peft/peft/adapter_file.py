"""Adapter files: only the trained tensors, plus a config of every layer's method.

Our format is safetensors (no pickle at all, by construction), tensor names following the
official module names:
    <module>.lora_A [r, in]   <module>.lora_B [out, r]          LoRA
    ... plus <module>.init_A, <module>.init_B                    PiSSA (initial factors, for merge)
    <module>.bone [r, out]                                       Bone
    <module>.bat [in/r, r, r]                                    Bat
    <official key>                                               whole tensors of --train_parts
    blocks.<i>.att.time_state [H, N, N] fp32                     the learned initial state (state tuning)
and metadata "rwkv_peft" = JSON {"layers": {module: {"method", hyperparameters}},
"parts": [...], "base": {what the base was: sizes, file, fingerprint}}, plus "quant":
{"format": "nf4" | "int8", "targets": "adapted" | "all"} when the base was quantized in training.

Adapter files of the RWKV-PEFT project (.pth) are read too: <module>.disha (2-D = Bone,
3-D = Bat), <module>.bone, <module>.lora_A/lora_B, an optional "model." key prefix. Their
lora_A/lora_B files record neither alpha nor whether the run was PiSSA (whose initial
factors RWKV-PEFT writes to a separate init_pissa.pth as <module>.init_lora_A/init_lora_B):
the caller must say which, as lora_alpha or pissa_init; nothing is guessed.
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
from ..model.config import infer_config
from ..model.rwkv import RWKV
from ..model.time_state import check_states, is_state_key, set_time_state, state_parts
from .adapt import attach_adapters
from .methods import METHODS, PeftMethod
from .quant import QUANT_FORMATS, QUANT_TARGETS

FORMAT = "rwkv-peft-adapter/1"


@dataclass
class Adapter:
    layers: dict[str, tuple[str, dict]]              # module -> (method, hparams)
    tensors: dict[str, dict[str, torch.Tensor]]      # module -> {tensor name: tensor}
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # official key -> whole tensor
    base: dict | None = None                         # what the base checkpoint was (None: unknown)
    source: str = "adapter"
    quant: dict | None = None                        # how the frozen base was quantized in training (None: not)


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
                 parts: Mapping[str, torch.Tensor], base: dict, quant: dict | None = None) -> None:
    """Write an adapter file atomically (quant: the training's --quant, recorded when given)."""
    from safetensors.torch import save

    tensors, layers = {}, {}
    for module, method in methods.items():
        layers[module] = {"method": method.name, **method.hparams()}
        for name, t in method.tensors().items():
            tensors[f"{module}.{name}"] = t.detach().to("cpu").contiguous()
    for key, t in parts.items():
        t = t.detach().to("cpu")
        tensors[key] = (t.float() if is_state_key(key) else t).contiguous()
    config = {"format": FORMAT, "layers": layers, "parts": sorted(parts), "base": base}
    if quant:
        config["quant"] = quant
    data = save(tensors, metadata={"rwkv_peft": json.dumps(config)})
    atomic_write(path, lambda f: f.write(data))


def read_adapter(path: str | os.PathLike, *, lora_alpha: float | None = None,
                 pissa_init: str | os.PathLike | None = None) -> Adapter:
    """Read one of our .safetensors adapters, or an RWKV-PEFT .pth adapter.

    For an RWKV-PEFT file with lora_A/lora_B, say what it is: lora_alpha (plain LoRA, the
    alpha used in training) or pissa_init (a PiSSA run: the init_pissa.pth written beside it).
    """
    path = Path(path)
    if not path.exists():
        raise RWKVPeftError(f"adapter not found: {path}")
    if path.is_dir():  # a Hugging Face peft adapter directory (peft/hf_peft_dir.py)
        from .hf_peft_dir import read_peft_dir

        layers, tensors = read_peft_dir(path, lora_alpha, pissa_init)
        return Adapter(layers, tensors, {}, None, str(path))
    if path.suffix == ".safetensors":
        for given, flag in ((lora_alpha, "--lora_alpha"), (pissa_init, "--pissa_init")):
            if given is not None:
                raise RWKVPeftError(f"{flag} is for RWKV-PEFT .pth adapters; {path} records its own settings, "
                                    f"drop {flag}")
        return _read_ours(path)
    return _read_rwkv_peft(path, lora_alpha, pissa_init)


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
        quant = config.get("quant")
        if quant is not None and (quant["format"] not in QUANT_FORMATS or quant.get("targets", "adapted")
                                  not in QUANT_TARGETS):
            raise ValueError(f"unknown quantization {quant}; this version knows {', '.join(QUANT_FORMATS)}")
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
    return Adapter(layers, tensors, parts, config.get("base"), str(path), quant)


def _read_rwkv_peft(path: Path, lora_alpha: float | None, pissa_init: str | os.PathLike | None) -> Adapter:
    if lora_alpha is not None and pissa_init is not None:
        raise RWKVPeftError("give either --lora_alpha (a LoRA run) or --pissa_init (a PiSSA run), not both")
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
    lora_modules = [m for m in tensors if m not in layers]
    for module in lora_modules:
        if set(tensors[module]) != {"lora_A", "lora_B"}:
            raise RWKVPeftError(f"adapter {path}: layer {module} has {sorted(tensors[module])}; "
                                "LoRA needs lora_A and lora_B")
    if lora_modules and lora_alpha is None and pissa_init is None:
        raise RWKVPeftError(
            f"adapter {path} is an RWKV-PEFT LoRA or PiSSA file, which records neither alpha nor which of the two "
            "it is; pass --lora_alpha A (the alpha it was trained with; RWKV-PEFT's trainer default is 32) or, "
            "for a PiSSA run, --pissa_init FILE (the init_pissa.pth written beside it)")
    init = _read_pissa_init(Path(pissa_init), lora_modules) if pissa_init is not None else {}
    for module in lora_modules:
        r = tensors[module]["lora_A"].shape[0]
        if pissa_init is not None:
            layers[module] = ("pissa", {"r": r, "svd_niter": None, "dropout": 0.0})
            tensors[module] |= init[module]
        else:
            layers[module] = ("lora", {"r": r, "alpha": float(lora_alpha), "dropout": 0.0})
    if pissa_init is not None and not lora_modules:
        raise RWKVPeftError(f"--pissa_init {pissa_init} given, but adapter {path} has no lora_A/lora_B layers")
    if not layers and not parts:
        raise RWKVPeftError(f"adapter {path} holds no adapter tensors")
    return Adapter(layers, tensors, parts, None, str(path))


def _read_pissa_init(path: Path, modules: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """RWKV-PEFT's init_pissa.pth: [model.]<module>.init_lora_A / init_lora_B for every PiSSA layer."""
    sd = {k.removeprefix("model."): v for k, v in load_tensor_file(path, what="--pissa_init file").items()}
    init = {}
    for module in modules:
        pair = {}
        for theirs, ours in (("init_lora_A", "init_A"), ("init_lora_B", "init_B")):
            key = f"{module}.{theirs}"
            if not isinstance(sd.get(key), torch.Tensor):
                raise RWKVPeftError(f"--pissa_init {path}: missing tensor '{key}'; is it the init_pissa.pth "
                                    "of this adapter's run?")
            pair[ours] = sd[key]
        init[module] = pair
    extra = sorted(k for k in sd if k.rpartition(".")[0] not in init)
    if extra:
        raise RWKVPeftError(f"--pissa_init {path}: '{extra[0]}' belongs to no layer of the adapter; "
                            "is it the init_pissa.pth of this adapter's run?")
    return init


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
    states = state_parts(adapter.parts)
    if states:  # a base without a state of its own gets one
        check_states(states, infer_config(sd), adapter.source, adapter.base)
    for key, t in adapter.parts.items():
        if key in states:
            continue
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
    states = state_parts(adapter.parts)
    if states:
        set_time_state(model, states, adapter.source, adapter.base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in adapter.parts.items():
            if key not in states:
                params[key].copy_(t)
    return methods
