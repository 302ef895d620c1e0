"""Reading a Hugging Face peft adapter directory (adapter_config.json + adapter_model.safetensors)
as an `Adapter`, so that --adapter DIR merges, chats and evaluates like one of our files.

The directory may have been saved on a model with the official module names (our RWKV module,
as RWKV-PEFT's later versions save with save_pretrained) or on the Hugging Face RWKV-7 layout
(model.layers.<i>.attn.k_proj, ...). Supported: LoRA (alpha, rank_pattern, alpha_pattern and
use_rslora read from the config, never guessed) and MiSS in its default mode (our Bone).
Everything else is refused with one line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import RWKVPeftError
from ..model.hf_names import linear_from_hf

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# initialisations that change the base weights themselves: such an adapter is not a delta on the base
_BASE_CHANGING = ("pissa", "olora", "corda", "loftq")


def pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern: a key matches a module name ending in it (as a regex)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def official_module(name: str, source: Path) -> str:
    """A peft module name (after base_model.model.) as our official module name."""
    if re.fullmatch(r"(model\.)?blocks\.\d+\.(att|ffn)\.\w+|(model\.)?head", name):
        return name.removeprefix("model.")
    try:
        return linear_from_hf(name)
    except KeyError:
        raise RWKVPeftError(f"adapter {source}: module '{name}' is neither an official RWKV name "
                            "(blocks.<i>.att.key) nor the Hugging Face RWKV-7 layout's (model.layers.<i>.attn.k_proj)"
                            ) from None


def read_peft_dir(path: Path, lora_alpha: float | None = None, pissa_init=None):
    """(layers, tensors) of a peft directory, as an Adapter holds them (lora_alpha, pissa_init: only
    for RWKV-PEFT .pth files, refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for given, flag in ((lora_alpha, "--lora_alpha"), (pissa_init, "--pissa_init")):
        if given is not None:
            raise RWKVPeftError(f"{flag} is for RWKV-PEFT .pth adapters; {path} records its own settings in "
                                f"{CONFIG}, drop {flag}")

    if not (path / CONFIG).is_file():
        raise RWKVPeftError(f"adapter {path} is a directory without {CONFIG}; pass a Hugging Face peft adapter "
                            "directory or an adapter file")
    if not (path / WEIGHTS).is_file():
        found = "adapter_model.bin (pickle, not loaded)" if (path / "adapter_model.bin").exists() else "nothing"
        raise RWKVPeftError(f"adapter {path} has no {WEIGHTS} (found {found}); re-save it with "
                            "save_pretrained(..., safe_serialization=True)")
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        flat = load_file(path / WEIGHTS)
    except (OSError, ValueError, SafetensorError) as e:
        raise RWKVPeftError(f"adapter {path} is not readable: {str(e).splitlines()[0][:160]}") from None
    kind = config.get("peft_type")
    if kind not in ("LORA", "MISS"):
        raise RWKVPeftError(f"adapter {path}: peft_type {kind} is not supported; rwkv-peft reads LORA and MISS")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise RWKVPeftError(f"adapter {path} also trains whole modules or biases (modules_to_save/bias), which "
                            "rwkv-peft cannot read from a peft directory; merge it with peft instead")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    names = {}  # official module -> the name peft matched its patterns against
    for key, t in flat.items():
        name = key.removeprefix("base_model.model.")
        for suffix in (".lora_A.weight", ".lora_B.weight", ".miss_block"):
            if name.endswith(suffix):
                peft_name = name.removesuffix(suffix)
                module = official_module(peft_name, path)
                names[module] = peft_name
                tensors.setdefault(module, {})[suffix.split(".")[1]] = t
                break
        else:
            raise RWKVPeftError(f"adapter {path}: unexpected tensor '{key}' for a {kind} adapter")
    if not tensors:
        raise RWKVPeftError(f"adapter {path} holds no adapter tensors")
    if kind == "LORA":
        layers, tensors = _lora_layers(config, tensors, names, path)
    else:
        layers, tensors = _miss_layers(config, tensors, path)
    return layers, tensors


def _lora_layers(config: dict, tensors: dict, names: dict, path: Path):
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(flag):
            raise RWKVPeftError(f"adapter {path}: {flag} is not supported; rwkv-peft reads plain LoRA")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING):
        raise RWKVPeftError(f"adapter {path} was initialised with {init}, which changes the base weights; save it "
                            "with path_initial_model_for_weight_conversion (peft's conversion to a plain LoRA)")
    layers, out = {}, {}
    for module, pair in tensors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise RWKVPeftError(f"adapter {path}: layer {module} has {sorted(pair)}; LoRA needs lora_A and lora_B")
        r = pair["lora_A"].shape[0]
        expected_r = pattern_value(config.get("rank_pattern") or {}, names[module], config.get("r"))
        if expected_r != r:
            raise RWKVPeftError(f"adapter {path}: {module} has rank {r} but its config says {expected_r}")
        alpha = pattern_value(config.get("alpha_pattern") or {}, names[module], config.get("lora_alpha"))
        if alpha is None:
            raise RWKVPeftError(f"adapter {path}: {CONFIG} records no lora_alpha")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        layers[module] = ("lora", {"r": r, "alpha": scale * r, "dropout": 0.0})  # ours scales by alpha / r
        out[module] = {"lora_A": pair["lora_A"], "lora_B": pair["lora_B"]}
    return layers, out


def _miss_layers(config: dict, tensors: dict, path: Path):
    mode = config.get("init_weights", True)
    if mode == "bat":
        raise RWKVPeftError(f"adapter {path}: MiSS's bat mode indexes its blocks by output block, rwkv-peft's Bat "
                            "by input block, so it cannot be read exactly; merge it with peft instead")
    if mode not in (True, False):
        raise RWKVPeftError(f"adapter {path}: MiSS mode init_weights={mode!r} is not supported; rwkv-peft reads "
                            "the default mode (its Bone)")
    layers, out = {}, {}
    for module, block in tensors.items():
        if set(block) != {"miss_block"} or block["miss_block"].dim() != 2:
            raise RWKVPeftError(f"adapter {path}: layer {module} has {sorted(block)}; MiSS needs a 2-D miss_block")
        layers[module] = ("bone", {"r": block["miss_block"].shape[0]})
        out[module] = {"bone": block["miss_block"]}
    return layers, out
