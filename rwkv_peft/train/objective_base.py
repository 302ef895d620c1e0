"""What the objectives share: their figures per step, and DPO's (and GRPO's) reference model, in the
three forms objectives.py's docstring lists."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..peft.adapt import adapters_disabled


class Reference:
    """The reference model of DPO (and GRPO), as the module docstring lists its three forms."""

    def __init__(self, run):
        model = run.model
        changes_base = run.full or any(not k.endswith("att.time_state") for k in run.parts)
        self.copy = _frozen_copy(model) if changes_base else None
        self.initial = None
        if run.args.init_adapter and not changes_base:
            self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # the base's own initial state, taken before any training: zeros unless the base came with one
        self.states = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("att.time_state")}
        self.kind = "frozen copy" if self.copy is not None else ("initial adapter" if self.initial else "adapters off")

    @torch.no_grad()
    def logits(self, model, inputs: torch.Tensor) -> torch.Tensor:
        with self.active(model) as reference:
            return reference(inputs)

    @contextmanager
    def active(self, model):
        """The reference model, to call as model is called, for the duration of the with block."""
        if self.copy is not None:
            yield self.copy
        elif self.initial is not None:
            with _values_swapped(model, self.initial):
                yield model
        else:
            with adapters_disabled(model, self.states):
                yield model


def _frozen_copy(model):
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


@contextmanager
def _values_swapped(model, values: dict):
    params = dict(model.named_parameters())
    saved = {n: params[n].data for n in values}
    try:
        for n, v in values.items():
            params[n].data = v
        yield
    finally:
        for n, data in saved.items():
            params[n].data = data


class Figures:
    """An objective's figures: each micro batch adds its own, the step reports their means."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.calls = 0

    def add(self, metrics: dict) -> None:
        """One micro batch's figures (tensors; a figure of several values counts as their mean)."""
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float().mean().item()
        self.calls += 1

    def step_metrics(self) -> dict:
        """The step's figures, averaged over its micro batches and the processes; then reset."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] / max(self.calls, 1) for k in keys], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        self.sums, self.calls = {}, 0
        return {k: round(v, 6) for k, v in zip(keys, values.tolist())}
