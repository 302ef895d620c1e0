"""Long-context training: each sample runs as consecutive pieces of chunk_ctx tokens, with
the model's whole RNN state (token shifts and WKV states of every layer) carried from piece
to piece, so that activation memory is one piece's whatever the sample length.

A piece is one function (tokens, targets, mask, carried state) -> (sum of the masked cross
entropy over the piece, new state). Every piece but the last runs as a _Piece: its forward
pass runs without autograd and keeps only the state it started from; its backward pass
reruns the piece with autograd and returns the gradients of its input state (to the piece
before it) and of the trainable parameters. The sum is divided by the trained tokens of
the whole batch, as masked_loss divides, so the loss and every gradient equal those of one
whole-sequence pass up to float rounding. detach=True cuts the gradient at every boundary
instead (truncated BPTT).

Why not torch.utils.checkpoint: its non-reentrant form builds the autograd graph of every
piece in the forward pass only to drop it, and packs every saved tensor through hooks on
the rerun, which cost 15% of a CPU step (bench/README.md); its reentrant form accumulates
parameter gradients in a nested backward per piece, which DeepSpeed's ZeRO gradient hooks
refuse (a parameter reduced twice in one step). _Piece hands the parameter gradients to
autograd as ordinary outputs, so each parameter is accumulated once per backward. Under
ZeRO stage 3 a parameter has its shape only inside its module's forward, so pieces there
fall back to the non-reentrant checkpoint.

chunked_sum generalises the piece's sum: any function of (logits, targets, mask) summed
over the pieces, e.g. each row's summed log-probability for the preference objectives,
whose losses are functions of those row sums (objectives.py): the gradient a loss gives
each row sum flows back through the pieces as it would through one whole-sequence pass.
Under torch.no_grad (the reference model of DPO) the pieces simply run one after another.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..model.common import RWKVState
from ..loss import masked_ce_sum_of_piece


def _piece_sum(model, tokens, targets, mask, state: RWKVState, piece_sum):
    logits, state = model(tokens, state)
    return piece_sum(logits, targets, mask), state


class _Piece(torch.autograd.Function):
    """run(state) -> (sum, new state), rerun in backward instead of stored. params: the
    trainable parameters run uses, inputs here so that their gradients come back as outputs."""

    @staticmethod
    def forward(ctx, run, att_shift, wkv, ffn_shift, *params):
        ctx.run, ctx.params = run, params  # leaf parameters: held, not saved (no copy, no version check)
        ctx.save_for_backward(att_shift, wkv, ffn_shift)
        piece_total, state = run(RWKVState(att_shift, wkv, ffn_shift))  # autograd is off in forward
        return piece_total, state.att_shift, state.wkv, state.ffn_shift

    @staticmethod
    def backward(ctx, *grads):
        state_in = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            piece_total, state = ctx.run(RWKVState(*state_in))
        outputs = [piece_total, state.att_shift, state.wkv, state.ffn_shift]
        used = [i for i, (out, grad) in enumerate(zip(outputs, grads)) if grad is not None and out.requires_grad]
        return (None, *torch.autograd.grad([outputs[i] for i in used], state_in + list(ctx.params), [grads[i] for i in used],
                                           allow_unused=True))


def _run_piece(run, state: RWKVState, params):
    if not torch.is_grad_enabled():  # nothing to rerun: no backward will come
        return run(state)
    if params is None:  # ZeRO-3: see the module docstring
        return checkpoint(run, state, use_reentrant=False)
    piece_total, *carried = _Piece.apply(run, state.att_shift, state.wkv, state.ffn_shift, *params)
    return piece_total, RWKVState(*carried)


def chunked_loss(model, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, chunk_ctx: int, *,
                 state: RWKVState | None = None, detach: bool = False) -> torch.Tensor:
    """The masked_loss of model on tokens [B, T], computed in pieces of chunk_ctx tokens.

    model: the RWKV model or the DeepSpeed engine around it. state: the state before the
    first token (default model.zero_state(B)); it may require grad (state tuning).
    """
    positions = tokens.numel()  # each piece carries the L2 nudge of the whole batch's masked_loss

    def ce_sum(logits, targets, mask):
        return masked_ce_sum_of_piece(logits, targets, mask, positions)[0]

    total = chunked_sum(model, tokens, targets, mask, chunk_ctx, ce_sum, state=state, detach=detach)
    return total / mask.sum().to(total.dtype).clamp(min=1.0)


def chunked_sum(model, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, chunk_ctx: int, piece_sum,
                *, state: RWKVState | None = None, detach: bool = False) -> torch.Tensor:
    """The sum over the pieces of chunk_ctx tokens of piece_sum(logits, targets, mask) (a tensor
    of any fixed shape), the logits being those of model on tokens [B, T] with the state carried.

    model: the RWKV model or the DeepSpeed engine around it. state: the state before the
    first token (default model.zero_state(B)); it may require grad (state tuning).
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    B, T = tokens.shape
    if state is None:
        state = module.zero_state(B)
    params = [p for p in module.parameters() if p.requires_grad]
    if any(hasattr(p, "ds_tensor") for p in params):  # partitioned by ZeRO-3
        params = None
    starts = list(range(0, T, chunk_ctx))
    total = 0.0
    for start in starts[:-1]:
        piece = slice(start, start + chunk_ctx)

        def run(state, piece=piece):
            return _piece_sum(module, tokens[:, piece], targets[:, piece], mask[:, piece], state, piece_sum)

        piece_total, state = _run_piece(run, state, params)
        total = total + piece_total
        if detach:
            state = state.detach()
    # The last piece runs once through `model` itself, unrecomputed (its activations are one
    # piece's): a DeepSpeed engine wants one forward call per backward, on the outputs that
    # receive the gradient first.
    last = slice(starts[-1], T)
    piece_total, _ = _piece_sum(model, tokens[:, last], targets[:, last], mask[:, last], state, piece_sum)
    return total + piece_total
