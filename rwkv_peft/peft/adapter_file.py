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
"parts": [...], "base": {what the base was: sizes, file, fingerprint, fingerprint_version}},
plus "quant": {"format": "nf4" | "int8", "targets": "adapted" | "all"} when the base was
quantized in training. Every field is checked for its type when read: a damaged or foreign
config is one line naming the field.

The base fingerprint (fingerprint_version 2) hashes every value of every tensor. Adapters
written before it have no fingerprint_version: their fingerprint sampled about a thousand
values per tensor, and they are checked with that same sampled hash (_sampled_fingerprint).

Adapter files of the RWKV-PEFT project (.pth) are read too: <module>.disha (2-D = Bone,
3-D = Bat), <module>.bone, <module>.lora_A/lora_B, an optional "model." key prefix. Their
lora_A/lora_B files record neither alpha nor whether the run was PiSSA (whose initial
factors RWKV-PEFT writes to a separate init_pissa.pth as <module>.init_lora_A/init_lora_B):
the caller must say which, as lora_alpha or pissa_init; nothing is guessed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import RWKVPeftError
from ..io import atomic_write, check_finite, load_tensor_file
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


FINGERPRINT_VERSION = 2   # 2: every value (base_fingerprint); none recorded: 1, sampled (_sampled_fingerprint)
_HASH_CHUNK = 1 << 24     # elements hashed at a time: bounded temporaries for fp32 tensors


def base_fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """A content hash of a checkpoint: every tensor's name, shape and every one of its values.

    Floating-point values are rounded to bf16 first, so the same weights stored as fp32 or bf16
    (or loaded into an fp32 model from a bf16 file) agree; the bytes are hashed in C order.
    Tensors are hashed in parallel (hashlib and torch release the GIL): about the time of
    reading the file once.
    """
    keys = sorted(sd)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda key: _tensor_digest(key, sd[key]), keys))
    h = hashlib.sha256()
    for digest in digests:
        h.update(digest)
    return h.hexdigest()[:16]


def _tensor_digest(key: str, t: torch.Tensor) -> bytes:
    h = hashlib.sha256(f"{key}{tuple(t.shape)}".encode())
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _HASH_CHUNK):
        chunk = flat[start:start + _HASH_CHUNK]
        if chunk.is_floating_point():
            chunk = chunk.to(torch.bfloat16)
        h.update(chunk.cpu().contiguous().view(torch.uint8).numpy())
    return h.digest()


def _sampled_fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint of adapters written before FINGERPRINT_VERSION 2 (names, shapes and a
    strided sample of about a thousand values per tensor, rounded to bf16): kept only to check
    those adapters as they were written."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        h.update(f"{key}{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024]
        h.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


FINGERPRINTS = {1: _sampled_fingerprint, 2: base_fingerprint}


def describe_base(sd: Mapping[str, torch.Tensor], config, path: str | os.PathLike | None) -> dict:
    return {"version": config.version, "n_layer": config.n_layer, "n_embd": config.n_embd,
            "vocab_size": config.vocab_size, "path": str(Path(path).resolve()) if path else None,
            "fingerprint": base_fingerprint(sd), "fingerprint_version": FINGERPRINT_VERSION}


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
    layers, part_keys, base, quant = _parse_config(path, meta["rwkv_peft"])
    check_finite(flat, f"adapter {path}")
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
    return Adapter(layers, tensors, parts, base, str(path), quant)


class _Malformed(Exception):
    """A field of an adapter's config with the wrong type or value (the message says which)."""


def _parse_config(path: Path, text: str) -> tuple[dict, list, dict | None, dict | None]:
    """(layers, part keys, base, quant) of an adapter's rwkv_peft metadata, every field checked."""
    try:
        try:
            config = json.loads(text)
        except ValueError as e:
            raise _Malformed(f"not valid JSON: {e}") from None
        _expect(isinstance(config, dict), "the config", "a JSON object", config)
        raw_layers = config.get("layers", {})
        _expect(isinstance(raw_layers, dict), "'layers'", "a table of layer -> settings", raw_layers)
        layers = {module: _layer_spec(module, spec) for module, spec in raw_layers.items()}
        part_keys = config.get("parts", [])
        _expect(isinstance(part_keys, list) and all(isinstance(k, str) for k in part_keys), "'parts'",
                "a list of tensor names", part_keys)
        return layers, list(part_keys), _base_record(config.get("base")), _quant_record(config.get("quant"))
    except _Malformed as e:
        raise RWKVPeftError(f"adapter {path}: malformed rwkv_peft config ({e}); re-save it with rwkv-peft, "
                            "or use the file it was copied from") from None


def _expect(ok: bool, field: str, expected: str, got) -> None:
    if not ok:
        shown = json.dumps(got) if not isinstance(got, (dict, list)) else type(got).__name__
        raise _Malformed(f"{field} must be {expected}, got {shown[:60]}")


def _layer_spec(module: str, spec) -> tuple[str, dict]:
    """(method, hyperparameters) of one layer, checked against the method's constructor."""
    _expect(isinstance(spec, dict), f"layer '{module}'", "a table with a 'method'", spec)
    method = spec.get("method")
    _expect(method in METHODS, f"layer '{module}' method", f"one of {', '.join(METHODS)}", method)
    hparams = {k: v for k, v in spec.items() if k != "method"}
    params = inspect.signature(METHODS[method].__init__).parameters
    known = [name for name in params if name not in ("self", "in_features", "out_features")]
    for name, value in hparams.items():
        _expect(name in known, f"layer '{module}' setting '{name}'", f"one of {', '.join(known)} for {method}",
                name)
        if name in ("r", "svd_niter"):  # sizes and counts
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= (1 if name == "r" else 0)
                  or (value is None and name != "r"))
            _expect(ok, f"layer '{module}' {name}", "a positive whole number" if name == "r" else
                    "a whole number or null", value)
        elif name == "dropout":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
            _expect(ok, f"layer '{module}' dropout", "a number in [0, 1)", value)
        else:
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and math.isfinite(value))
            _expect(ok, f"layer '{module}' {name}", "a finite number", value)
    missing = [name for name in known if params[name].default is inspect.Parameter.empty and name not in hparams]
    _expect(not missing, f"layer '{module}'", f"a table with '{missing[0] if missing else ''}'", spec)
    return method, hparams


_BASE_FIELDS = {"version": (int, "6 or 7"), "n_layer": (int, "a whole number"), "n_embd": (int, "a whole number"),
                "vocab_size": (int, "a whole number"), "path": (str, "a path"), "fingerprint": (str, "a string"),
                "fingerprint_version": (int, f"one of {', '.join(map(str, FINGERPRINTS))}")}


def _base_record(base) -> dict | None:
    if base is None:
        return None
    _expect(isinstance(base, dict), "'base'", "a table", base)
    for name, (kind, expected) in _BASE_FIELDS.items():
        value = base.get(name)
        ok = value is None or (isinstance(value, kind) and not isinstance(value, bool))
        if ok and value is not None and name == "version":
            ok = value in (6, 7)
        if ok and value is not None and name == "fingerprint_version":
            ok = value in FINGERPRINTS
        _expect(ok, f"base {name}", expected, value)
    return base


def _quant_record(quant) -> dict | None:
    if quant is None:
        return None
    _expect(isinstance(quant, dict), "'quant'", "a table", quant)
    if quant.get("format") not in QUANT_FORMATS or quant.get("targets", "adapted") not in QUANT_TARGETS:
        raise _Malformed(f"unknown quantization {json.dumps(quant)[:80]}; this version knows formats "
                         f"{', '.join(QUANT_FORMATS)} and targets {', '.join(QUANT_TARGETS)}")
    return quant


def _read_rwkv_peft(path: Path, lora_alpha: float | None, pissa_init: str | os.PathLike | None) -> Adapter:
    if lora_alpha is not None and pissa_init is not None:
        raise RWKVPeftError("give either --lora_alpha (a LoRA run) or --pissa_init (a PiSSA run), not both")
    sd = load_tensor_file(path, what="adapter")
    layers, tensors, parts = {}, {}, {}
    for key, t in sd.items():
        if not isinstance(key, str):
            raise RWKVPeftError(f"adapter {path}: key {key!r} is not a tensor name (it is of type "
                                f"{type(key).__name__}); is it an adapter file?")
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
    loaded = load_tensor_file(path, what="--pissa_init file")
    for key in loaded:
        if not isinstance(key, str):
            raise RWKVPeftError(f"--pissa_init {path}: key {key!r} is not a tensor name (it is of type "
                                f"{type(key).__name__}); is it the init_pissa.pth of this adapter's run?")
    sd = {k.removeprefix("model."): v for k, v in loaded.items()}
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


_V6_NAMES = ("att.gate", "ffn.receptance", "att.time_maa", "att.time_decay", "att.time_faaaa", "ffn.time_maa")
_V7_NAMES = ("att.x_", "att.w0", "att.w1", "att.w2", "att.a0", "att.a1", "att.a2", "att.v0", "att.v1", "att.v2",
             "att.g1", "att.g2", "att.k_k", "att.k_a", "att.r_k", "ffn.x_k")


def adapter_version(adapter: Adapter) -> int | None:
    """The RWKV version an adapter was trained on: as recorded, else as its layer and tensor names
    say (RWKV-6 has att.gate, ffn.receptance, time_maa_*; RWKV-7 x_*, w0..g2, k_k ...), else None."""
    recorded = (adapter.base or {}).get("version")
    if recorded:
        return recorded
    names = [k.split(".", 2)[2] for k in [*adapter.layers, *adapter.parts]
             if k.startswith("blocks.") and k.count(".") >= 2]
    v6 = any(n.startswith(_V6_NAMES) for n in names)
    v7 = any(n.startswith(_V7_NAMES) for n in names)
    return 6 if v6 and not v7 else 7 if v7 and not v6 else None


def check_base(adapter: Adapter, sd: Mapping[str, torch.Tensor], base_name: str) -> None:
    """Refuse a base the adapter was not trained on: the RWKV version, layer shapes, then the
    content fingerprint (of the kind the adapter recorded)."""
    try:
        config = infer_config(sd)
    except RWKVPeftError as e:
        raise RWKVPeftError(f"base {base_name}: {e}") from None
    trained_on = (adapter.base or {}).get("path") or "unknown"
    version = adapter_version(adapter)
    if version is not None and version != config.version:
        how = "was trained on" if (adapter.base or {}).get("version") else "has the layers of"
        raise RWKVPeftError(f"{adapter.source} {how} an RWKV-{version} model, but base {base_name} is "
                            f"RWKV-{config.version}; pass an RWKV-{version} base (it was trained on: {trained_on})")
    for module, (method, hparams) in adapter.layers.items():
        key = f"{module}.weight"
        if key not in sd:
            raise RWKVPeftError(f"{adapter.source} adapts '{module}', but base {base_name} (RWKV-{config.version}) "
                                f"has no '{key}'; was it trained on another model?")
        if sd[key].dim() != 2:
            raise RWKVPeftError(f"{adapter.source} adapts '{module}', which is no linear layer of base {base_name} "
                                f"('{key}' has shape {list(sd[key].shape)}); was it trained on another model?")
        out_f, in_f = sd[key].shape
        try:
            fitted = METHODS[method](in_f, out_f, **hparams)
        except (RWKVPeftError, TypeError, KeyError, ValueError, RuntimeError) as e:
            raise RWKVPeftError(f"{adapter.source} does not fit base {base_name} at {module}: {e}") from None
        expected = {name: list(t.shape) for name, t in fitted.tensors().items()}
        for name, t in adapter.tensors.get(module, {}).items():
            if name in expected and list(t.shape) != expected[name]:
                raise RWKVPeftError(f"{adapter.source}: '{module}.{name}' has shape {list(t.shape)}, but base "
                                    f"{base_name} needs {expected[name]}; was it trained on another model?")
    states = state_parts(adapter.parts)
    if states:  # a base without a state of its own gets one
        check_states(states, config, adapter.source, adapter.base)
    for key, t in adapter.parts.items():
        if key in states:
            continue
        if key not in sd or tuple(sd[key].shape) != tuple(t.shape):
            have = list(sd[key].shape) if key in sd else "no such key"
            raise RWKVPeftError(f"{adapter.source}: trained tensor '{key}' {list(t.shape)} does not fit base "
                                f"{base_name} ({have})")
    recorded = (adapter.base or {}).get("fingerprint")
    if recorded:
        # adapters without a fingerprint_version were written with the sampled fingerprint
        fingerprint = FINGERPRINTS[(adapter.base or {}).get("fingerprint_version") or 1](sd)
        if recorded != fingerprint:
            raise RWKVPeftError(f"{adapter.source} was trained on a different base (fingerprint {recorded}, "
                                f"{base_name} has {fingerprint}); pass the base it was trained on: {trained_on}")


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
