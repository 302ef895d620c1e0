"""Pieces shared by the RWKV-6 and RWKV-7 blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_shift(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """x_{t-1} for every t of x [B, T, C]: the carried last token (zeros if None), then x[:, :-1]."""
    if prev is None:
        return F.pad(x, (0, 0, 1, -1))
    return torch.cat([prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


def vector(n_embd: int) -> torch.nn.Parameter:
    """A per-channel parameter in the official [1, 1, C] shape (values come from a load or init)."""
    return torch.nn.Parameter(torch.empty(1, 1, n_embd))


def matrix(rows: int, cols: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(rows, cols))


@dataclass
class RWKVState:
    """The recurrent state of a whole model, the official package's three tensors per layer.

    att_shift: [L, B, C]        last normed input of each TimeMix (token shift)
    wkv:       [L, B, H, N, N]  WKV state, fp32 (RWKV-7: [value, key]; RWKV-6: [key, value])
    ffn_shift: [L, B, C]        last normed input of each ChannelMix
    """

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.att_shift[i], self.wkv[i], self.ffn_shift[i]

    @classmethod
    def stack(cls, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> "RWKVState":
        att, wkv, ffn = zip(*layers)
        return cls(torch.stack(att), torch.stack(wkv), torch.stack(ffn))

    def detach(self) -> "RWKVState":
        return RWKVState(self.att_shift.detach(), self.wkv.detach(), self.ffn_shift.detach())

    def clone(self) -> "RWKVState":
        return RWKVState(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())
