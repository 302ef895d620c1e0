"""Learning-rate schedules: a function of the step alone, so resuming needs no scheduler state."""

from __future__ import annotations

import math


def learning_rate(step: int, total: int, *, lr_init: float, lr_final: float, warmup: int, schedule: str) -> float:
    """lr for optimizer step `step` (0-based) of `total`.

    Warm-up rises linearly from 1% of lr_init. Then: cos decays to lr_final; wsd holds
    lr_init and decays linearly to lr_final over the last 20% of the steps; const holds.
    """
    if warmup and step < warmup:
        return lr_init * (0.01 + 0.99 * step / warmup)
    if schedule == "const":
        return lr_init
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "cos":
        return lr_final + (lr_init - lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_from = 0.8
        if progress < decay_from:
            return lr_init
        return lr_init + (lr_final - lr_init) * (progress - decay_from) / (1 - decay_from)
    raise ValueError(f"unknown schedule {schedule}")
