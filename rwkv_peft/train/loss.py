"""The training loss: cross entropy over the trained tokens only, plus the official L2 nudge."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, nudges each row's largest logit towards zero.

    The official trainer's habit (SPEC section 6): gradient 1e-4 / (B*T) times the max logit
    at its argmax, which keeps logits from drifting upwards.
    """

    @staticmethod
    def forward(ctx, loss, logits, positions=None):
        """positions: B*T of the whole batch when logits hold only a piece of it (long context)."""
        ctx.save_for_backward(logits)
        ctx.positions = positions or logits.shape[0] * logits.shape[1]
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / ctx.positions
        maxx, ids = torch.max(logits, -1, keepdim=True)
        glogits = torch.zeros_like(logits).scatter_(-1, ids, maxx * factor)
        return grad_output, glogits, None


def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of fp32 cross entropy over the positions with mask 1, number of such positions)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = mask.flatten().to(ce.dtype)
    return (ce * mask).sum(), mask.sum()


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the positions whose target counts (mask 1), for backward."""
    total, count = masked_ce_sum(logits, targets, mask)
    return L2Wrap.apply(total / count.clamp(min=1.0), logits)


def masked_ce_sum_of_piece(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                           positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """masked_ce_sum of one piece of a batch of `positions` B*T positions, carrying the L2
    nudge that masked_loss gives these logits in the whole batch."""
    total, count = masked_ce_sum(logits, targets, mask)
    return L2Wrap.apply(total, logits, positions), count
