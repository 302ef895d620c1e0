"""GRPO's loss as a pure function of per-token log-probabilities, rewards and masks.

For the G completions of one prompt with rewards r_g, the advantage of each is its reward minus
the group's mean, divided by the group's standard deviation (+1e-4) for loss_type grpo and left
unscaled for dr_grpo (Liu et al. 2025). Per completion token, with ratio = exp(logp - logp_old):

    loss_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta kl_t,
    kl_t   = exp(ref - logp) - (ref - logp) - 1           (the k3 estimator of KL(policy || ref))

grpo averages loss_t over each completion's tokens, then over the completions; dr_grpo sums over
every token and divides by (completions x max completion length). These are TRL 1.16's formulas
(GRPOTrainer._compute_loss, token-level importance sampling); tests/test_grpo.py checks them
against a float64 transcription.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """Advantages [P*G] of rewards [P*G] ordered prompt by prompt (G completions each)."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + 1e-4)  # unbiased std, as TRL's nanstd
    return centred.reshape(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, loss_type: str = "grpo", max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """(loss, figures) for per-token log-probs [N, T] of N completions; mask [N, T] marks their tokens."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype)[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    figures = {"clip_ratio": ((ratio - ratio.clamp(1 - eps_low, 1 + eps_high)).abs() > 0).to(logps.dtype)}
    if beta:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
        figures["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        loss = (per_token * mask).sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))
    figures["clip_ratio"] = (figures["clip_ratio"] * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {k: v.detach() for k, v in figures.items()}
