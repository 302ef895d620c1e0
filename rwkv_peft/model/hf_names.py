"""Official RWKV-7 tensor names <-> the Hugging Face layout of the published RWKV-7 checkpoints
(flash-linear-attention's `rwkv7` model type, also read by rwkv7-hf and llama.cpp's converter).

The HF layout renames modules, stores each low-rank pair (w1/w2, a1/a2, v1/v2, g1/g2) as two
nn.Linear weights (so transposed), the offsets w0/a0/v0 as the second one's bias, and keeps
some [1, 1, C] vectors flat. Block 0 has no value-residual mixer there (unused in block 0).
"""

from __future__ import annotations

import re

import torch

_ATT = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_NORMS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
        "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_LOW_RANK = re.compile(r"^([wavg])([012])$")  # w0/w1/w2 ...: offset, down, up
_FLAT = ("k_k", "k_a")  # [1, 1, C] officially, [C] in the HF layout


def linear_to_hf(module: str) -> str:
    """'blocks.3.att.key' -> 'model.layers.3.attn.k_proj' (a linear layer's module name)."""
    return _rename(module, ("head", "lm_head"), r"blocks\.(\d+)\.(att|ffn)\.(\w+)", "model.layers",
                   {"att": "attn", "ffn": "ffn"}, _ATT)


def linear_from_hf(module: str) -> str:
    """The inverse of linear_to_hf."""
    return _rename(module, ("lm_head", "head"), r"model\.layers\.(\d+)\.(attn|ffn)\.(\w+)", "blocks",
                   {"attn": "att", "ffn": "ffn"}, {v: k for k, v in _ATT.items()})


def _rename(module: str, head: tuple[str, str], pattern: str, blocks: str, parts: dict, att_names: dict) -> str:
    if module == head[0]:
        return head[1]
    m = re.fullmatch(pattern, module)
    if not m:
        raise KeyError(module)
    i, part, name = m.groups()
    return f"{blocks}.{i}.{parts[part]}.{att_names.get(name, name) if parts[part] != 'ffn' else name}"


def hf_key(key: str) -> tuple[str | None, bool]:
    """(HF name or None when the HF layout drops it, whether the tensor is transposed)."""
    if key in _TOP:
        return _TOP[key], False
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", key)
    if not m:
        raise KeyError(key)
    i, part, rest = m.groups()
    if part in _NORMS:
        return f"model.layers.{i}.{_NORMS[part]}.{rest}", False
    if part == "ffn":
        return f"model.layers.{i}.ffn.{rest}", False
    name, _, suffix = rest.partition(".")
    low = _LOW_RANK.match(name)
    if low:
        if i == "0" and low.group(1) == "v":
            return None, False
        which = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}[low.group(2)]
        return f"model.layers.{i}.attn.{low.group(1)}_lora.{which}", low.group(2) != "0"
    return f"model.layers.{i}.attn.{_ATT.get(name, name)}{'.' + suffix if suffix else ''}", False


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official RWKV-7 state dict in HF names and shapes (contiguous tensors, ready to save)."""
    out = {}
    for key, t in sd.items():
        name, transposed = hf_key(key)
        if name is None:
            continue
        if transposed:
            t = t.T
        elif name.endswith(("lora.2.bias", "ffn.x_k")) or name.rsplit(".", 1)[-1] in _FLAT:
            t = t.reshape(-1)
        out[name] = t.contiguous()
    return out


def from_hf(hf: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-layout tensors back to the official keys and shapes of template (an official state dict
    or its meta-device twin); a key the HF layout drops keeps the template's tensor."""
    out = {}
    for key, ref in template.items():
        name, transposed = hf_key(key)
        if name is None:
            out[key] = ref
            continue
        if name not in hf:
            raise KeyError(name)
        t = hf[name].T if transposed else hf[name]
        out[key] = t.reshape(ref.shape)
    return out
