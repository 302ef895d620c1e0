"""How long a run is and its learning rate: a function of the step alone, so resuming needs no
scheduler state."""

from __future__ import annotations

import math
from dataclasses import dataclass

SHORT_RUN_STEPS = 50  # fewer optimizer steps than this: say so, and how to train more


@dataclass(frozen=True)
class Schedule:
    global_batch: int  # samples per optimizer step, over every process
    total_steps: int
    warmup: int
    lr_init: float
    lr_final: float
    shape: str  # cos, wsd or const

    def lr(self, step: int) -> float:
        return learning_rate(step, self.total_steps, lr_init=self.lr_init, lr_final=self.lr_final,
                             warmup=self.warmup, schedule=self.shape)


def plan_schedule(args, n_samples: int, world: int, log) -> Schedule:
    """The schedule of a run over n_samples on world processes (--max_steps or --epochs)."""
    global_batch = args.micro_bsz * args.accumulate_grad_batches * world
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * n_samples / global_batch))
    warmup = args.warmup_steps if args.warmup_steps is not None else min(10, total_steps // 10)
    if not args.max_steps and total_steps < SHORT_RUN_STEPS:
        log(f"note: {args.epochs:g} epoch(s) of {n_samples} samples of {args.ctx_len} tokens make only {total_steps} "
            f"optimizer steps; for more training pass --epochs N or --max_steps N")
    return Schedule(global_batch, total_steps, warmup, args.lr_init, args.lr_final, args.lr_schedule)


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
