"""Choosing a PEFT method and rank per linear layer, and attaching them to a model.

Rules are globs on the official module names, first match wins:
    "blocks.*.att.*=bone:64; blocks.*.ffn.key=lora:32,alpha=64; blocks.0.*=none"
or the same as a JSON file: {"blocks.*.att.*": "bone:64", ...} or a list of
{"pattern": ..., "method": ..., "r": ..., <other hyperparameters>} objects.
Layers no rule matches get the default method (--peft) if they are default targets.
"""

from __future__ import annotations

import fnmatch
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import RWKVPeftError
from ..io import read_json
from ..model.rwkv import RWKV
from ..model.time_state import add_time_state, state_parts
from .methods import METHODS, PeftMethod, make_method
from .quant import QuantizedLinear, QuantizedWeight

DEFAULT_TARGETS = {
    7: ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"),
    6: ("att.receptance", "att.key", "att.value", "att.output", "att.gate",
        "ffn.key", "ffn.value", "ffn.receptance"),
}
TRAIN_PARTS = ("ln", "time", "emb", "head", "state")


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus one PEFT method; `weight` keeps its official name and is a
    frozen tensor or a QuantizedWeight (--quant)."""

    def __init__(self, weight: torch.Tensor | QuantizedWeight, method: PeftMethod):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, QuantizedWeight) else nn.Parameter(weight, requires_grad=False)
        self.adapter = method
        self.base_only = False  # set by adapters_disabled: the original base layer's output

    def forward(self, x):
        if self.base_only:
            return self.adapter.base_forward(x, self.weight)
        return self.adapter(x, self.weight)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, {self.adapter.name} {self.adapter.hparams()}"


@dataclass
class Rule:
    pattern: str
    method: str | None          # None: leave the layer alone
    hparams: dict = field(default_factory=dict)
    text: str = ""


def _parse_spec(pattern: str, spec, text: str) -> Rule:
    """'bone:64', 'lora:32,alpha=64,dropout=0.05', 'none', or a dict from JSON."""
    if isinstance(spec, dict):
        spec = dict(spec)
        method = str(spec.pop("method", "")).lower()
        hparams = spec
    else:
        parts = str(spec).strip().split(",")
        head = parts[0].split(":")
        method = head[0].strip().lower()
        hparams = {}
        if len(head) > 2:
            raise RWKVPeftError(f"rule '{text}': write 'method:rank[,key=value...]'")
        if len(head) == 2:
            hparams["r"] = head[1].strip()
        for part in parts[1:]:
            if "=" not in part:
                raise RWKVPeftError(f"rule '{text}': '{part.strip()}' is not key=value")
            key, value = part.split("=", 1)
            hparams[key.strip()] = value.strip()
    if method == "none":
        return Rule(pattern, None, {}, text)
    if method not in METHODS:
        raise RWKVPeftError(f"rule '{text}': unknown method '{method}'; choose one of "
                            f"{', '.join(METHODS)} or none")
    try:
        hparams = {k: _number(v) for k, v in hparams.items()}
    except ValueError as e:
        raise RWKVPeftError(f"rule '{text}': {e}") from None
    return Rule(pattern, method, hparams, text)


def _number(value):
    if isinstance(value, (int, float)) or value is None:
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("none", "null"):
        return None
    raise ValueError(f"'{value}' is not a number")


def parse_rules(text: str | None) -> list[Rule]:
    """Rules from a string ('glob=method:rank; ...') or a JSON file path."""
    if not text or not text.strip():
        return []
    if text.strip().endswith(".json"):
        path = Path(text.strip())
        data = read_json(path, "--peft_rules")
        if isinstance(data, dict):
            return [_parse_spec(p, s, f"{p}={s}") for p, s in data.items()]
        if isinstance(data, list) and all(isinstance(d, dict) and "pattern" in d for d in data):
            return [_parse_spec(d["pattern"], {k: v for k, v in d.items() if k != "pattern"}, json.dumps(d))
                    for d in data]
        raise RWKVPeftError(f"--peft_rules file {path}: expected an object {{glob: spec}} or a list of "
                            "{\"pattern\": ..., \"method\": ...} objects")
    rules = []
    for item in re.split(r"[;\n]", text):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise RWKVPeftError(f"rule '{item}': write 'glob=method:rank', e.g. 'blocks.*.att.*=bone:64'")
        pattern, spec = item.split("=", 1)
        rules.append(_parse_spec(pattern.strip(), spec, item))
    return rules


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, AdaptedLinear, QuantizedLinear))}


def _layer_kind(name: str) -> str:
    """'blocks.3.att.key' -> 'att.key'."""
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def plan_adapters(model: RWKV, rules: list[Rule], default: tuple[str, dict] | None,
                  default_source: str = "--peft") -> dict[str, tuple[str, dict]]:
    """Which method (and hyperparameters) each linear layer gets: {layer name: (method, hparams)}."""
    layers = linear_layers(model)
    for rule in rules:
        if not any(fnmatch.fnmatchcase(name, rule.pattern) for name in layers):
            example = next(iter(layers))
            raise RWKVPeftError(f"rule '{rule.text}' matches no linear layer "
                                f"(names look like '{example}'; see the layer table)")
    targets = DEFAULT_TARGETS[model.config.version]
    plan = {}
    for name, layer in layers.items():
        rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is not None:
            if rule.method is None:
                continue
            choice, source = (rule.method, rule.hparams), f"rule '{rule.text}'"
            if default and default[0] == rule.method:  # a rule inherits the flags' other hyperparameters
                choice = (rule.method, {**default[1], **rule.hparams})
        elif default is not None and _layer_kind(name) in targets:
            choice, source = default, default_source
        else:
            continue
        method, hparams = choice
        try:
            make_method(method, layer.in_features, layer.out_features, **hparams)
        except TypeError as e:
            raise RWKVPeftError(f"{source}: bad hyperparameter for {method}: {e}") from None
        except RWKVPeftError as e:
            raise RWKVPeftError(f"{source} at layer {name}: {e}") from None
        plan[name] = (method, dict(hparams))
    return plan


def part_parameters(model: RWKV, parts: list[str] | tuple[str, ...]) -> dict[str, nn.Parameter]:
    """The whole-tensor groups --train_parts unfreezes, by official key ('state' first gives
    every layer a learned initial state, see model/time_state.py)."""
    chosen = {}
    for part in parts:
        if part not in TRAIN_PARTS:
            raise RWKVPeftError(f"--train_parts: unknown part '{part}'; choose from {', '.join(TRAIN_PARTS)}")
        if part == "state":
            chosen.update(add_time_state(model))
            continue
        for mod_name, module in model.named_modules():
            if part == "ln" and isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                params = module.named_parameters()
            elif part == "time" and mod_name.endswith((".att", ".ffn")):
                params = module.named_parameters(recurse=False)  # mixing/decay vectors, low-rank mixers
            elif part in ("emb", "head") and mod_name == part and isinstance(module, (nn.Embedding, nn.Linear)):
                params = module.named_parameters(recurse=False)
            else:
                continue
            for pname, p in params:
                if pname != "time_state":  # the state is its own part
                    chosen[f"{mod_name}.{pname}"] = p
    return chosen


def attach_adapters(model: RWKV, plan: dict[str, tuple[str, dict]], *, init: bool = True,
                    quant: str | None = None) -> dict[str, PeftMethod]:
    """Replace each planned nn.Linear by an AdaptedLinear; freeze everything else.

    init=True initialises each method for training (PiSSA runs its SVD here, on the
    full-precision weight); init=False leaves them to be filled from an adapter file.
    quant (nf4, int8): each frozen weight is quantized as its layer is adapted, so no more than
    one layer's full-precision temporary exists at a time (PiSSA quantizes its residual).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = model.emb.weight.dtype  # the working dtype: a weight kept in its file's dtype for quantizing may differ
    methods = {}
    for name, (method_name, hparams) in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            raise RWKVPeftError(f"layer {name} is already adapted")
        weight = linear.weight.detach()
        method = make_method(method_name, linear.in_features, linear.out_features, **hparams)
        method.to(device=weight.device, dtype=dtype)
        if quant:
            weight = weight.float()
        if init:
            method.reset_parameters(weight)
            weight = method.frozen_weight(weight)
        if quant:
            weight = QuantizedWeight(weight, quant, dtype, name=name)
        setattr(parent, attr, AdaptedLinear(weight, method))
        methods[name] = method
    return methods


def trainable_summary(model: RWKV, methods: dict[str, PeftMethod], parts: dict[str, nn.Parameter]) -> str:
    """A table of adapted layers (blocks grouped), method, hyperparameters and trainable parameters."""
    groups: dict[tuple, list[int]] = {}
    counts: dict[tuple, int] = {}
    for name, method in methods.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", name)
        layer, kind = (int(m.group(1)), m.group(2)) if m else (-1, name)
        hp = ", ".join(f"{k}={v}" for k, v in method.hparams().items())
        key = (kind, method.name, hp)
        groups.setdefault(key, []).append(layer)
        counts[key] = counts.get(key, 0) + sum(p.numel() for p in method.parameters())
    rows = [("layers", "method", "hyperparameters", "trainable")]
    for (kind, mname, hp), blocks in sorted(groups.items(), key=lambda kv: (min(kv[1]), kv[0])):
        where = kind if blocks == [-1] else f"blocks.{_ranges(blocks)}.{kind}"
        rows.append((where, mname, hp, f"{counts[(kind, mname, hp)]:,}"))
    states = state_parts(parts)
    if states:
        layers = [int(k.split(".")[1]) for k in states]
        rows.append((f"blocks.{_ranges(layers)}.att.time_state", "state", "initial WKV state",
                     f"{sum(p.numel() for p in states.values()):,}"))
    if len(parts) > len(states):
        rows.append((f"{len(parts) - len(states)} whole tensors (--train_parts)", "full", "",
                     f"{sum(p.numel() for k, p in parts.items() if k not in states):,}"))
    total = sum(p.numel() for p in model.parameters())
    # a quantized frozen weight is a buffer, not a parameter: it counts by its elements, as unquantized
    total += sum(w.shape[0] * w.shape[1] for w in model.modules() if isinstance(w, QuantizedWeight))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '{0-2,5}'; a single block -> '3'."""
    ids = sorted(ids)
    spans = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return text if len(ids) == 1 else "{" + text + "}"


def prepare_peft(model: RWKV, plan: dict[str, tuple[str, dict]], train_parts=(), *, init: bool = True,
                 quant: str | None = None, quant_targets: str = "adapted") -> tuple[dict, dict]:
    """Attach adapters and unfreeze the --train_parts groups (init, quant: see attach_adapters;
    quant_targets: see quantize_linears)."""
    methods = attach_adapters(model, plan, init=init, quant=quant)
    parts = part_parameters(model, train_parts)
    if "head" in train_parts and "head" in methods:
        raise RWKVPeftError("--train_parts head conflicts with an adapter on 'head'; choose one")
    for p in parts.values():
        p.requires_grad_(True)
    if quant:
        quantize_linears(model, quant, quant_targets)
    return methods, parts


def quantize_linears(model: RWKV, fmt: str, targets: str = "adapted") -> None:
    """Store frozen linear weights quantized, one layer at a time: every adapted layer's, and with
    targets 'all' every other frozen linear layer's too, the head included. A frozen linear layer
    left unquantized is brought to the model's working dtype (a quantizing load leaves every
    linear weight in its file's dtype)."""
    dtype = model.emb.weight.dtype
    for name, layer in linear_layers(model).items():
        if isinstance(layer, AdaptedLinear) and isinstance(layer.weight, torch.Tensor):
            quantized = QuantizedWeight(layer.weight, fmt, dtype, name=name)
            del layer.weight  # a parameter's name cannot take a module
            layer.weight = quantized
        elif type(layer) is nn.Linear and targets == "all" and not layer.weight.requires_grad:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, QuantizedLinear(QuantizedWeight(layer.weight, fmt, dtype, name=name)))
        elif type(layer) is nn.Linear:
            layer.weight.data = layer.weight.data.to(dtype)  # in place: a --train_parts head stays the same parameter


@contextmanager
def adapters_disabled(model: nn.Module, states: dict[str, torch.Tensor] | None = None):
    """Inside, the model computes its base: every AdaptedLinear the original layer's output
    (PeftMethod.base_forward) and every learned initial state (att.time_state) the base's own:
    `states` (key -> tensor, e.g. a copy taken before training) where given, else none (zeros).
    Nothing is copied: the same frozen weights serve both, which is why preference tuning's
    reference model costs no memory. Use under torch.no_grad()."""
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    swapped = []
    for name, param in model.named_parameters():
        if name.endswith("att.time_state"):  # the base has no state of its own: it starts from zeros
            base = states[name] if states is not None and name in states else torch.zeros_like(param)
            swapped.append((param, param.data))
            param.data = base.to(param.device, param.dtype)
    for layer in layers:
        layer.base_only = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.base_only = False
        for param, data in swapped:
            param.data = data


def set_frozen_weight(layer: AdaptedLinear, weight: torch.Tensor) -> None:
    """Replace an adapted layer's frozen weight (PiSSA's residual, on resume), quantized if it was."""
    with torch.no_grad():
        if isinstance(layer.weight, QuantizedWeight):
            old = layer.weight
            layer.weight = QuantizedWeight(weight, old.format, old.dtype).to(old.device)
        else:
            layer.weight.copy_(weight.to(layer.weight))
