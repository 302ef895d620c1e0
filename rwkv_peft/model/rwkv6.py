"""RWKV-6 ("x060") block, as docs/formats.md section 2 writes its maths: TimeMix with the
data-dependent token-shift mixes (time_maa_*) and decay, the bonus u (time_faaaa), and a
ChannelMix gated by a receptance. Names and shapes are those of official x060 files.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import matrix, token_shift, vector
from .config import RWKVConfig
from .wkv_dispatch import wkv6


class TimeMix6(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        self.time_maa_x, self.time_maa_w, self.time_maa_k = vector(C), vector(C), vector(C)
        self.time_maa_v, self.time_maa_r, self.time_maa_g = vector(C), vector(C), vector(C)
        self.time_maa_w1 = matrix(C, 5 * cfg.d_mix)
        self.time_maa_w2 = nn.Parameter(torch.empty(5, cfg.d_mix, C))
        self.time_decay = vector(C)
        self.time_decay_w1, self.time_decay_w2 = matrix(C, cfg.d_decay), matrix(cfg.d_decay, C)
        self.time_faaaa = matrix(H, N)  # the bonus u of the current token
        if cfg.time_state:  # state tuning: a learned initial WKV state, stored [H, value, key]
            self.time_state = nn.Parameter(torch.empty(H, N, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def initial_wkv_state(self, batch_size: int) -> torch.Tensor | None:
        """The WKV state before the first token: time_state, or None (zeros).

        Files store it [value, key]; the RWKV-6 recurrence runs on [key, value].
        """
        if not hasattr(self, "time_state"):
            return None
        return self.time_state.float().transpose(1, 2).expand(batch_size, -1, -1, -1)

    def forward(self, x, v_first, shift=None, wkv_state=None):
        """x [B, T, C] (normed block input) -> (out, last x, new wkv state, v_first).

        v_first is passed through untouched: RWKV-6 has no value residual; the shared
        signature lets one Block class serve both versions.
        """
        B, T, C = x.shape
        H, N = self.n_head, self.head_size

        def heads(t):
            return t.view(B, T, H, N)

        xx = token_shift(x, shift) - x
        # data-dependent token-shift amounts for w, k, v, r, g from one shared low-rank mixer
        xxx = x + xx * self.time_maa_x
        xxx = torch.tanh(xxx @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(xxx, self.time_maa_w2).view(5, B, T, C).unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        # log(-log(decay)) in fp32
        w = (self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).float()

        if wkv_state is None:
            wkv_state = self.initial_wkv_state(B)
        y, wkv_state = wkv6(heads(r), heads(w), heads(k), heads(v), self.time_faaaa, wkv_state)

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state, v_first


class ChannelMix6(nn.Module):
    def __init__(self, cfg: RWKVConfig):
        super().__init__()
        C = cfg.n_embd
        self.time_maa_k, self.time_maa_r = vector(C), vector(C)
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x, shift=None):
        xx = token_shift(x, shift) - x
        k = torch.relu(self.key(x + xx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(k), x[:, -1]

