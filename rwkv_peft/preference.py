"""Preference objectives (DPO, SimPO, ORPO) as pure functions of per-sequence log-probabilities.

A batch of B preference pairs runs as 2B sequences, the B chosen first, then the B rejected.
`sequence_logps` turns the logits of those sequences into, per sequence, the sum of the
log-probabilities of its trained (reply) tokens and their count. The losses then need only
these numbers:

    DPO    -log sigmoid(beta * ((pc - rc) - (pr - rr)))       p: policy sums, r: reference sums
    SimPO  -log sigmoid(beta * (mc - mr) - gamma)             m: per-token means (no reference)
    ORPO   NLL(chosen) - lambda * log sigmoid(log odds(mc) - log odds(mr)),  odds(m) = e^m / (1 - e^m)

each averaged over the pairs. These are the formulas of Rafailov et al. 2023, Meng et al. 2024
and Hong et al. 2024 as TRL 1.16 implements them (DPO loss_type sigmoid, CPO loss_type simpo
with cpo_alpha 0, ORPO); tests/test_preference.py checks them against TRL's own code.
The "rewards" are what TRL logs: beta * (policy - reference) for DPO, beta * the mean
log-probability for SimPO and ORPO (ORPO's beta being its lambda).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import VocabCrossEntropy


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over each sequence's positions with mask 1 [N], those positions' count [N]).

    The per-position cross entropy is the slice-by-slice fp32 one of the SFT loss (loss.py), so
    no [N, T, V] log-softmax is ever held whole.
    """
    ce = VocabCrossEntropy.apply(logits, targets, 0.0)  # -log p, fp32 [N, T]
    mask = mask.to(ce.dtype)
    return -(ce * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> tuple[torch.Tensor, dict]:
    """(mean DPO loss, per-pair rewards) from per-sequence summed log-probabilities."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses.mean(), _rewards(chosen_rewards, rejected_rewards)


def simpo_loss(chosen_mean, rejected_mean, beta: float, gamma: float) -> tuple[torch.Tensor, dict]:
    """(mean SimPO loss, per-pair rewards) from per-token mean log-probabilities; gamma is the target margin."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return losses.mean(), _rewards(beta * chosen_mean, beta * rejected_mean)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    near_zero = x > -0.6931471805599453
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean, rejected_mean, chosen_nll, lam: float) -> tuple[torch.Tensor, dict]:
    """(ORPO loss, per-pair rewards and log odds): chosen_nll is the SFT loss on the chosen replies
    (mean over their tokens), chosen/rejected_mean the per-token mean log-probabilities."""
    c, r = chosen_mean.float(), rejected_mean.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    metrics = _rewards(lam * c, lam * r)
    metrics.update({"log_odds_ratio": ratio, "log_odds_chosen": log_odds, "nll_loss": chosen_nll.reshape(1)})
    return chosen_nll - lam * ratio.mean(), metrics


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracies": (chosen > rejected).float(), "rewards/margins": chosen - rejected}
