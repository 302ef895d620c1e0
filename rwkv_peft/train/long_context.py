"""Long-context training: each sample runs as consecutive pieces of chunk_ctx tokens, with
the model's whole RNN state (token shifts and WKV states of every layer) carried from piece
to piece, so that activation memory is one piece's whatever the sample length.

A piece is one function (tokens, targets, mask, carried state) -> (sum of the masked cross
entropy over the piece, new state), run under non-reentrant activation checkpointing: the
forward pass keeps only the state at each piece boundary and a scalar; the backward pass
recomputes one piece at a time and hands the gradient of its input state to the piece
before it. The sum is divided by the trained tokens of the whole batch, as masked_loss
divides, so the loss and every gradient equal those of one whole-sequence pass up to float
rounding. detach=True cuts the gradient at every boundary instead (truncated BPTT).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..model.common import RWKVState
from .loss import masked_ce_sum_of_piece


def _piece_loss(model, tokens, targets, mask, state: RWKVState, positions: int):
    logits, state = model(tokens, state)
    ce_sum, _ = masked_ce_sum_of_piece(logits, targets, mask, positions)
    return ce_sum, state


def chunked_loss(model, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, chunk_ctx: int, *,
                 state: RWKVState | None = None, detach: bool = False) -> torch.Tensor:
    """The masked_loss of model on tokens [B, T], computed in pieces of chunk_ctx tokens.

    model: the RWKV model or the DeepSpeed engine around it. state: the state before the
    first token (default model.zero_state(B)); it may require grad (state tuning).
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    B, T = tokens.shape
    if state is None:
        state = module.zero_state(B)
    starts = list(range(0, T, chunk_ctx))
    total = 0.0
    for start in starts[:-1]:
        piece = slice(start, start + chunk_ctx)
        ce_sum, state = checkpoint(_piece_loss, module, tokens[:, piece], targets[:, piece], mask[:, piece], state,
                                   B * T, use_reentrant=False)
        total = total + ce_sum
        if detach:
            state = state.detach()
    # The last piece runs once through `model` itself, unrecomputed (its activations are one
    # piece's): a DeepSpeed engine wants one forward call per backward, on the outputs that
    # receive the gradient first.
    last = slice(starts[-1], T)
    ce_sum, _ = _piece_loss(model, tokens[:, last], targets[:, last], mask[:, last], state, B * T)
    return (total + ce_sum) / mask.sum().to(ce_sum.dtype).clamp(min=1.0)
