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
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, -1, keepdim=True)
        glogits = torch.zeros_like(logits).scatter_(-1, ids, maxx * factor)
        return grad_output, glogits


def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of fp32 cross entropy over the positions with mask 1, number of such positions)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = mask.flatten().to(ce.dtype)
    return (ce * mask).sum(), mask.sum()


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the positions whose target counts (mask 1), for backward."""
    total, count = masked_ce_sum(logits, targets, mask)
    return L2Wrap.apply(total / count.clamp(min=1.0), logits)
