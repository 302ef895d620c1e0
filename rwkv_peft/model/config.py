"""Model configuration, and inferring it from an official checkpoint's state dict.

Every size comes from tensor shapes (docs/formats.md section 1), never from a formula, because the
low-rank widths differ between official model sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import RWKVPeftError


@dataclass
class RWKVConfig:
    """Sizes of an RWKV-6 ("x060") or RWKV-7 ("x070") model.

    RWKV-7 low-rank widths: d_decay (w1/w2), d_aaa (a1/a2), d_mv (v1/v2), d_gate (g1/g2).
    RWKV-6 low-rank widths: d_mix (time_maa_w1 is [C, 5*d_mix]), d_decay (time_decay_w1).
    """

    version: int
    n_layer: int
    n_embd: int
    vocab_size: int
    dim_ffn: int
    head_size: int = 64
    d_decay: int = 64
    d_aaa: int = 64
    d_mv: int = 32
    d_gate: int = 128
    d_mix: int = 32
    # RWKV-7 checkpoints may or may not carry the (unused) value-residual mixer in block 0;
    # we keep whatever the file had so that state_dict() keys equal the file's keys.
    block0_v_mix: bool = False
    # State-tuned checkpoints carry att.time_state [H, value, key], the learned initial WKV state.
    time_state: bool = False

    def __post_init__(self):
        if self.version not in (6, 7):
            raise RWKVPeftError(f"model version must be 6 or 7, got {self.version}")
        for name in ("n_layer", "n_embd", "vocab_size", "dim_ffn", "head_size"):
            if getattr(self, name) <= 0:
                raise RWKVPeftError(f"model size {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.head_size:
            raise RWKVPeftError(
                f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


# Below this many parameters a model's per-token ops are too small to gain from a second CPU
# thread (generate.set_threads) and its training steps need little memory (train/cpu_memory.py).
SMALL_MODEL_PARAMS = 20_000_000

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise RWKVPeftError(f"checkpoint is missing key '{key}'")
    return tuple(sd[key].shape)


def detect_version(sd: Mapping[str, torch.Tensor]) -> int:
    """7 if block 0 has att.r_k, 6 if it has att.time_maa_x; otherwise a clear error."""
    if "blocks.0.att.r_k" in sd:
        return 7
    if "blocks.0.att.time_maa_x" in sd:
        return 6
    if "emb.weight" not in sd:
        some = ", ".join(list(sd)[:5]) or "no keys at all"
        raise RWKVPeftError(f"not an RWKV checkpoint: no 'emb.weight' key (found {some})")
    if "blocks.0.att.time_mix_k" in sd or "blocks.0.att.time_decay" in sd:
        raise RWKVPeftError(
            "this is an older RWKV checkpoint (RWKV-4/5: found 'blocks.0.att.time_mix_k' or "
            "'time_decay' without 'time_maa_x'); only RWKV-6 (x060) and RWKV-7 (x070) are supported")
    raise RWKVPeftError(
        "unknown RWKV layout: neither 'blocks.0.att.r_k' (RWKV-7) nor "
        "'blocks.0.att.time_maa_x' (RWKV-6) is in the checkpoint")


def infer_config(sd: Mapping[str, torch.Tensor]) -> RWKVConfig:
    """Read every size of the model from the shapes in an official state dict."""
    version = detect_version(sd)
    vocab_size, n_embd = _shape(sd, "emb.weight")
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    if not layers:
        raise RWKVPeftError("checkpoint has no 'blocks.<i>.' keys: not an RWKV model")
    n_layer = max(layers) + 1
    dim_ffn = _shape(sd, "blocks.0.ffn.key.weight")[0]

    if version == 7:
        n_head, head_size = _shape(sd, "blocks.0.att.r_k")
        # Block 0 may lack v1; any later block has it. A 1-layer model without it needs none.
        v1_key = next((f"blocks.{i}.att.v1" for i in range(n_layer) if f"blocks.{i}.att.v1" in sd), None)
        return RWKVConfig(
            version=7, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, dim_ffn=dim_ffn,
            head_size=head_size,
            d_decay=_shape(sd, "blocks.0.att.w1")[1],
            d_aaa=_shape(sd, "blocks.0.att.a1")[1],
            d_mv=_shape(sd, v1_key)[1] if v1_key else 1,
            d_gate=_shape(sd, "blocks.0.att.g1")[1],
            block0_v_mix="blocks.0.att.v0" in sd,
            time_state="blocks.0.att.time_state" in sd,
        )

    n_head = _shape(sd, "blocks.0.att.time_faaaa")[0]
    if n_embd % n_head:
        raise RWKVPeftError(
            f"'blocks.0.att.time_faaaa' has {n_head} heads, which does not divide n_embd {n_embd}")
    maa_w1 = _shape(sd, "blocks.0.att.time_maa_w1")
    if len(maa_w1) != 2 or maa_w1[1] % 5:
        raise RWKVPeftError(
            f"'blocks.0.att.time_maa_w1' has shape {list(maa_w1)}, expected [C, 5*D]")
    return RWKVConfig(
        version=6, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, dim_ffn=dim_ffn,
        head_size=n_embd // n_head,
        d_mix=maa_w1[1] // 5,
        d_decay=_shape(sd, "blocks.0.att.time_decay_w1")[1],
        time_state="blocks.0.att.time_state" in sd,
    )
