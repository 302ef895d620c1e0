"""The training loss: cross entropy over the trained tokens only, plus the official L2 nudge.

The vocabulary is wide (65536 for World models), so every [positions, vocabulary] temporary
is as large as the logits themselves (128 MB at ctx 512, fp32). The cross entropy and its
gradient are therefore computed a slice of positions at a time: besides the logits and
their gradient, nothing vocabulary-sized lives longer than one slice (log_softmax's output,
fp32 copies of bf16 logits, the zero-filled gradient buffers of cross entropy and of the L2
nudge are all slice-sized). The values are those of F.cross_entropy on the whole tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Positions per slice: 64 x 65536 fp32 is 16 MB, large enough for full-speed vectorised rows.
ROWS_PER_SLICE = 64


def _slices(n: int):
    return (slice(lo, min(lo + ROWS_PER_SLICE, n)) for lo in range(0, n, ROWS_PER_SLICE))


class VocabCrossEntropy(torch.autograd.Function):
    """Per-position fp32 cross entropy [B, T] of logits [B, T, V], computed slice by slice.

    Backward, per slice: d ce / d logits = softmax - onehot (scaled by the incoming gradient),
    written into the one gradient buffer. With l2_factor > 0 the backward also adds
    the official L2Wrap nudge (docs/formats.md section 6): l2_factor times each position's largest
    logit at its argmax, for every position, whatever the incoming gradient.
    """

    @staticmethod
    def forward(ctx, logits, targets, l2_factor: float):
        rows, ids = logits.flatten(0, 1), targets.flatten()
        ce = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        for s in _slices(rows.shape[0]):
            ce[s] = F.cross_entropy(rows[s].float(), ids[s], reduction="none")
        ctx.save_for_backward(logits, targets)
        ctx.l2_factor = l2_factor
        return ce.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_ce):
        logits, targets = ctx.saved_tensors
        rows, ids, weight = logits.flatten(0, 1), targets.flatten(), grad_ce.flatten()
        grad = torch.empty_like(rows)
        for s in _slices(rows.shape[0]):
            # (softmax - onehot) * weight, by cross_entropy's own backward on this slice:
            # the same kernels, so the same bits, as differentiating the whole tensor
            with torch.enable_grad():
                x = rows[s].detach().float().requires_grad_()
                ce = F.cross_entropy(x, ids[s], reduction="none")
                (grad[s],) = torch.autograd.grad(ce, x, weight[s])
            if ctx.l2_factor:
                top, top_ids = torch.max(rows[s], -1, keepdim=True)
                grad[s].scatter_add_(-1, top_ids, top * ctx.l2_factor)
        return grad.view_as(logits), None, None


def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of fp32 cross entropy over the positions with mask 1, number of such positions)."""
    return _masked_sum(VocabCrossEntropy.apply(logits, targets, 0.0), mask)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the positions whose target counts (mask 1), for backward.

    Its backward carries the official L2 nudge: gradient 1e-4 / (B*T) times the max logit
    at each position's argmax, which keeps logits from drifting upwards.
    """
    total, count = masked_ce_sum_of_piece(logits, targets, mask, logits.shape[0] * logits.shape[1])
    return total / count.clamp(min=1.0)


def masked_ce_sum_of_piece(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                           positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """masked_ce_sum of one piece of a batch of `positions` B*T positions, carrying the L2
    nudge that masked_loss gives these logits in the whole batch (long-context pieces)."""
    return _masked_sum(VocabCrossEntropy.apply(logits, targets, 1e-4 / positions), mask)


def _masked_sum(ce: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ce, mask = ce.flatten(), mask.flatten().to(ce.dtype)
    return (ce * mask).sum(), mask.sum()
