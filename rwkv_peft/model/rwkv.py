"""The RWKV language model (RWKV-6 or RWKV-7): embedding, blocks, output head.

One API for training, chat and tests:
    logits = model(tokens)                         # tokens [B, T] -> logits [B, T, V]
    logits, state = model(tokens, state)           # RNN mode, state from model.zero_state(B)
Feeding a sequence in pieces with the carried state gives the logits of feeding it whole.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .common import RWKVState
from .config import RWKVConfig
from .decode import Decoder
from .rwkv6 import ChannelMix6, TimeMix6
from .rwkv7 import ChannelMix7, TimeMix7


class Block(nn.Module):
    """x += TimeMix(ln1(x)); x += ChannelMix(ln2(x)); block 0 first applies ln0."""

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        TimeMix, ChannelMix = (TimeMix7, ChannelMix7) if cfg.version == 7 else (TimeMix6, ChannelMix6)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)

    def forward(self, x, v_first, state=None):
        """state: None or (att_shift [B,C], wkv [B,H,N,N], ffn_shift [B,C]); returns the new one."""
        att_shift, wkv, ffn_shift = state if state is not None else (None, None, None)
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        dx, att_shift, wkv, v_first = self.att(self.ln1(x), v_first, att_shift, wkv)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        x = x + dx
        return x, v_first, (att_shift, wkv, ffn_shift)


class RWKV(nn.Module):
    def __init__(self, config: RWKVConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Recompute each block in the backward pass instead of storing its activations.
        self.grad_checkpointing = False

    def zero_state(self, batch_size: int) -> RWKVState:
        """The state before any token: zeros, with the learned initial WKV state (att.time_state)
        where the model has one. Not detached: under autograd, time_state gets its gradient
        through a state passed to forward, as through forward(tokens) alone."""
        cfg = self.config
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        ref = self.emb.weight
        zeros = torch.zeros(batch_size, H, N, N, device=ref.device, dtype=torch.float32)
        learned = [block.att.initial_wkv_state(batch_size) for block in self.blocks]
        wkv = torch.stack([zeros if s is None else s for s in learned])
        shift = torch.zeros(L, batch_size, C, device=ref.device, dtype=ref.dtype)
        return RWKVState(shift, wkv, shift.clone())

    def decoder(self):
        """A one-token RNN-mode Decoder for generation (rwkv_peft/model/decode.py): faster than
        forward() on one token; it keeps copies of some weights, so build one per session."""
        return Decoder(self)

    def forward(self, tokens: torch.Tensor, state: RWKVState | None = None, *, last_only: bool = False):
        """tokens [B, T] -> logits [B, T, V]; with a state, (logits, new_state).

        last_only: compute logits for the last position only ([B, 1, V]), as chat prefill needs.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {list(tokens.shape)}")
        x = self.emb(tokens)
        v_first = None
        use_cp = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        new_states = []
        for i, block in enumerate(self.blocks):
            layer_state = None if state is None else state.layer(i)
            if use_cp:
                # Non-reentrant: the reentrant kind drops adapter gradients when the block
                # input does not require grad, which is exactly the frozen-base case.
                x, v_first, layer_state = checkpoint(block, x, v_first, layer_state, use_reentrant=False)
            else:
                x, v_first, layer_state = block(x, v_first, layer_state)
            new_states.append(layer_state)
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.ln_out(x))
        if state is None:
            return logits
        return logits, RWKVState.stack(new_states)
