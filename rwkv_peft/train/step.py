"""One optimizer step: its micro batches, with non-finite numbers caught before they reach the weights.

Sample g of the data and its dropout masks depend only on g and the seed, so a step is a
function of its number: what makes resume exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import RWKVPeftError
from ..loss import masked_loss
from .args import TrainArgs
from .long_context import chunked_loss


@dataclass(frozen=True)
class StepResult:
    loss: float           # mean over the step's finite micro batches, and over every process
    skipped: int          # micro batches of this step whose loss was not finite (they gave no gradient)
    stop_requested: bool  # some process was asked to stop (Ctrl-C, SIGTERM): all stop at this step
    metrics: dict = field(default_factory=dict)  # the objective's figures (objectives.py); none for SFT


class Stepper:
    """Runs the optimizer steps of a run on one process."""

    def __init__(self, engine, data, args: TrainArgs, device: torch.device, proj_dir: Path, objective=None):
        self.engine, self.data, self.args, self.device = engine, data, args, device
        self.objective = objective  # None: SFT's masked loss
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.trainable = [p for p in engine.module.parameters() if p.requires_grad]
        self.checkpoints = proj_dir / "checkpoints"
        self.skipped = 0  # non-finite micro batches in this segment of the run

    def step(self, step: int, lr: float, stop_requested: bool) -> StepResult:
        """Optimizer step number step + 1, at peak learning rate lr."""
        accumulate = self.args.accumulate_grad_batches
        step_loss, bad = torch.zeros((), device=self.device), 0
        for micro in range(accumulate):
            loss, first = self._micro_batch_loss(step, micro)
            if self._finite_everywhere(loss):
                step_loss += loss.detach().float()
            else:
                bad += 1
                self._check_skip_allowance(bad, loss, step, micro, first)
                loss = sum(p.sum() for p in self.trainable) * 0.0  # no gradient, a graph through finite tensors
            if micro == accumulate - 1:
                # the optimizer steps now; a step whose every micro batch was bad moves nothing
                scale = 0.0 if bad == accumulate else 1.0
                for group in self.engine.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0) * scale
            self.engine.backward(loss)
            self.engine.step()
        self.skipped += bad
        # one all-reduce for the loss and the stop request: every rank stops at the same step
        reduced = torch.stack([step_loss / max(accumulate - bad, 1),
                               torch.tensor(float(stop_requested), device=self.device)])
        if self.world > 1:
            dist.all_reduce(reduced)
        self._check_grad_norm(step, bad)
        metrics = self.objective.step_metrics() if self.objective else {}
        return StepResult(reduced[0].item() / self.world, bad, reduced[1].item() > 0, metrics)

    def _micro_batch_loss(self, step: int, micro: int) -> tuple[torch.Tensor, int]:
        args = self.args
        first = ((step * args.accumulate_grad_batches + micro) * self.world + self.rank) * args.micro_bsz
        batch = self.data.batch(list(range(first, first + args.micro_bsz)))
        torch.manual_seed(args.random_seed + first)  # dropout: a function of the sample index
        if self.objective is not None:
            return self.objective.micro_batch_loss(self.engine, batch), first
        inputs, targets, mask = (batch[k].to(self.device) for k in ("input_ids", "targets", "loss_mask"))
        if args.chunk_ctx:
            return chunked_loss(self.engine, inputs, targets, mask, args.chunk_ctx, detach=args.chunk_detach), first
        return masked_loss(self.engine(inputs), targets, mask), first

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank takes the same decision
        return bool(finite.item())

    def _check_skip_allowance(self, bad: int, loss, step: int, micro: int, first: int) -> None:
        if self.skipped + bad > self.args.skip_nonfinite:
            last = first + self.args.micro_bsz - 1
            samples = f"samples {first}..{last}" if last > first else f"sample {first}"
            if step == 0:  # no update yet: the weights are the base's, which loading checked to be finite
                cause = ("before any update, so the learning rate is not the cause: the model's numbers overflow "
                         "on this data (check those samples; --precision fp32 if it was bf16 or fp16)")
            else:
                cause = ("the weights may have diverged (a lower --lr_init helps then), or those samples overflow "
                         "the model's numbers")
            raise RWKVPeftError(
                f"loss became {loss.item()} at step {step + 1} (micro batch {micro + 1}, {samples} in the run's "
                f"data order), {cause}; stopped without saving: {self._kept()}. --skip_nonfinite N lets up to "
                "N such micro batches pass without a gradient")

    def _check_grad_norm(self, step: int, bad: int) -> None:
        """In fp16, DeepSpeed's loss scaler owns overflow: it skips that step, reports the norm as
        inf and lowers the scale, as it routinely does. Elsewhere a non-finite norm is fatal."""
        grad_norm = self.engine.get_global_grad_norm()
        if (grad_norm is not None and not math.isfinite(float(grad_norm)) and not bad
                and not self.engine.fp16_enabled()):
            raise RWKVPeftError(f"gradient norm became {grad_norm} at step {step + 1}; stopped without saving: "
                                f"{self._kept()}. Lower --lr_init or use --precision fp32")

    def _kept(self) -> str:
        """What the run has to go back to, as it is on disk."""
        try:
            name = (self.checkpoints / "latest").read_text().strip()
        except OSError:
            name = ""
        if name and (self.checkpoints / name / "trainer.json").is_file():
            return f"the last checkpoint, {self.checkpoints / name}, is intact"
        return "this run has saved no checkpoint yet"
