"""A fresh RWKV-7 model with the official x070 initialisation (docs/formats.md section 6)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import RWKVPeftError
from .config import RWKVConfig
from .rwkv import RWKV


def create_model(config: RWKVConfig, *, seed: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> RWKV:
    """A new RWKV-7 model for training from scratch, initialised as the official recipe does."""
    if config.version != 7:
        raise RWKVPeftError("only RWKV-7 models can be created from scratch; load an official "
                            "RWKV-6 (x060) checkpoint to fine-tune RWKV-6")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model = RWKV(config)
    init_rwkv7_(model, generator)
    return model.to(device=device, dtype=dtype)


def rwkv7_config(n_layer: int, n_embd: int, head_size: int, vocab_size: int) -> RWKVConfig:
    """The sizes of a new RWKV-7 as the official x070 recipe derives them from its width:
    ffn 4C, and the low-rank mixers' dimensions rounded to multiples of 32."""
    def low_rank(scale, power=0.5):
        return max(32, int(round(scale * n_embd ** power / 32)) * 32)

    return RWKVConfig(version=7, n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab_size,
                      dim_ffn=4 * n_embd, d_decay=low_rank(1.8), d_aaa=low_rank(1.8), d_mv=low_rank(1.3),
                      d_gate=low_rank(0.6, 0.8))


def _orthogonal(shape, gain: float, generator) -> torch.Tensor:
    w = torch.empty(shape)
    nn.init.orthogonal_(w, gain=gain, generator=generator)
    return w


@torch.no_grad()
def init_rwkv7_(model: RWKV, generator: torch.Generator | None = None) -> None:
    cfg = model.config
    L, C, N, V = cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size
    n = torch.arange(C, dtype=torch.float64)
    ddd = (n / C).view(1, 1, C)
    linear = (n / (C - 1) - 0.5).view(1, 1, C) if C > 1 else torch.zeros(1, 1, C)
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros(C)
    zigzag = (z * z.abs()).view(1, 1, C)

    for l, block in enumerate(model.blocks):
        r0 = l / (L - 1) if L > 1 else 0.0  # 0 -> 1 over depth
        r1 = 1.0 - l / L                    # 1 -> ~0 over depth
        www = (-6 + 6 * (n / max(C - 1, 1)) ** (1 + r0 ** 0.3)).view(1, 1, C)
        att, ffn = block.att, block.ffn
        vectors = {
            att.x_r: 1 - ddd ** (0.2 * r1), att.x_g: 1 - ddd ** (0.2 * r1),
            att.x_w: 1 - ddd ** (0.9 * r1), att.x_a: 1 - ddd ** (0.9 * r1),
            att.x_k: 1 - ddd ** (0.7 * r1), att.x_v: 1 - ddd ** (0.7 * r1),
            att.w0: www + 0.5 + 2.5 * zigzag,
            att.a0: -0.19 + 0.3 * zigzag + 0.4 * linear,
            att.k_k: 0.71 - 0.1 * linear,
            att.k_a: torch.full((1, 1, C), 1.02),
            att.r_k: torch.full((cfg.n_head, N), -0.04),
            ffn.x_k: 1 - ddd ** (r1 ** 4),
        }
        low_rank = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
        if hasattr(att, "v0"):
            vectors[att.v0] = 0.73 - 0.4 * linear
            low_rank.append((att.v1, att.v2))
        for p, value in vectors.items():
            p.copy_(value)
        for down, up in low_rank:
            down.zero_()
            up.copy_(_orthogonal(up.shape, 0.1, generator))
        att.receptance.weight.copy_(_orthogonal((C, C), 1.0, generator))
        att.key.weight.copy_(_orthogonal((C, C), 0.1, generator))
        att.value.weight.copy_(_orthogonal((C, C), 1.0, generator))
        att.output.weight.zero_()
        ffn.key.weight.copy_(_orthogonal(ffn.key.weight.shape, 1.0, generator))
        ffn.value.weight.zero_()
        att.ln_x.weight.fill_(((l + 1) / L) ** 0.7)
        att.ln_x.bias.zero_()
        for norm in (getattr(block, "ln0", None), block.ln1, block.ln2):
            if norm is not None:
                norm.weight.fill_(1.0)
                norm.bias.zero_()

    model.ln_out.weight.fill_(1.0)
    model.ln_out.bias.zero_()
    model.emb.weight.uniform_(-1e-4, 1e-4, generator=generator)
    # the official recipe scales the head by sqrt(V/C) only when the vocabulary is wider
    head_gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
    model.head.weight.copy_(_orthogonal((V, C), head_gain, generator))
