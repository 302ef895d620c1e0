"""RWKV-7 ("x070") block: TimeMix (decay, in-context learning rate a, value residual, gate)
and ChannelMix (squared ReLU), one line per step of the maths in docs/formats.md section 2.

The official checkpoint's names and shapes (docs/formats.md section 1), so `state_dict()`
has an official `.pth` file's keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import matrix, token_shift, vector
from .config import RWKVConfig
from .wkv_dispatch import wkv7


class TimeMix7(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        self.x_r, self.x_w, self.x_k = vector(C), vector(C), vector(C)
        self.x_v, self.x_a, self.x_g = vector(C), vector(C), vector(C)
        self.w0, self.w1, self.w2 = vector(C), matrix(C, cfg.d_decay), matrix(cfg.d_decay, C)
        self.a0, self.a1, self.a2 = vector(C), matrix(C, cfg.d_aaa), matrix(cfg.d_aaa, C)
        # Block 0 produces v_first instead of mixing it in, so its v0/v1/v2 are unused.
        if layer_id > 0 or cfg.block0_v_mix:
            self.v0, self.v1, self.v2 = vector(C), matrix(C, cfg.d_mv), matrix(cfg.d_mv, C)
        self.g1, self.g2 = matrix(C, cfg.d_gate), matrix(cfg.d_gate, C)
        self.k_k, self.k_a = vector(C), vector(C)
        self.r_k = matrix(H, N)
        if cfg.time_state:  # state tuning: a learned initial WKV state, [H, value, key] as the recurrence
            self.time_state = nn.Parameter(torch.empty(H, N, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def initial_wkv_state(self, batch_size: int) -> torch.Tensor | None:
        """The WKV state before the first token: time_state, or None (zeros)."""
        if not hasattr(self, "time_state"):
            return None
        return self.time_state.float().expand(batch_size, -1, -1, -1)

    def forward(self, x, v_first, shift=None, wkv_state=None):
        """x [B, T, C] (normed block input) -> (out, last x, new wkv state, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size

        def heads(t):
            return t.view(B, T, H, N)

        xx = token_shift(x, shift) - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        # log(-log(decay)) in fp32; <= -0.5, so the decay lies in (0.545, 1)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float()) - 0.5
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        if self.layer_id == 0:
            v_first = v
        else:  # value residual towards layer 0's value
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        kk = F.normalize(heads(k * self.k_k), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)

        if wkv_state is None:
            wkv_state = self.initial_wkv_state(B)
        y, wkv_state = wkv7(heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a), wkv_state)

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state, v_first


class ChannelMix7(nn.Module):
    def __init__(self, cfg: RWKVConfig):
        super().__init__()
        C = cfg.n_embd
        self.x_k = vector(C)
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x, shift=None):
        xx = token_shift(x, shift) - x
        k = torch.relu(self.key(x + xx * self.x_k)) ** 2
        return self.value(k), x[:, -1]

