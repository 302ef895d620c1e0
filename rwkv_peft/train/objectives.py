"""Training objectives beyond SFT: what one micro batch computes for --objective dpo, simpo, orpo
(and grpo, in grpo_objective.py).

The Stepper calls `objective.micro_batch_loss(engine, batch)` instead of its SFT loss when the
run has an objective (`make_objective` returns None for sft, so SFT runs exactly as before);
each call also records the micro batch's figures, which `step_metrics` averages over the step
(and the processes) for metrics.jsonl, the progress bar, TensorBoard and wandb.

The reference model of DPO costs no second copy of the base weights:
- adapters (and a learned state) on a base: the same model with its adapters switched off
  (peft.adapt.adapters_disabled), once per micro batch under torch.no_grad;
- --init_adapter (continuing an SFT adapter): the policy as it started, i.e. the same model
  with its trainable tensors swapped for a copy of their initial values (adapter-sized);
- --peft full, or --train_parts that change base tensors (ln, time, emb, head): a frozen copy
  of the model, taken before training (the one case that holds the weights twice).
SimPO and ORPO have no reference model; GRPO's is DPO's, and only with --beta > 0.

With --chunk_ctx N the pairwise objectives run each sequence as pieces of N tokens with the
RNN state carried (long_context.chunked_sum), policy and reference alike. Their losses are
functions of per-sequence sums only (each row's summed log-probability and its token count),
so the pieces compute each row's sum, summed over the pieces, the loss is taken of those sums
as of the whole-sequence ones, and backward hands each row sum its gradient, which flows
through the pieces (each rerun once with autograd, the state's gradient carried back) as it
would through one whole-sequence pass: the loss and gradients are the unchunked ones up to
float rounding, with one piece's activations held at a time.
"""

from __future__ import annotations

import torch

from ..data.preference import load_preference_data
from ..data.prompts import load_prompt_data
from ..errors import RWKVPeftError
from ..preference import dpo_loss, orpo_loss, sequence_logps, simpo_loss
from .args import TrainArgs
from .grpo_objective import GRPO
from .long_context import chunked_sum
from .objective_base import Figures, Reference

OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "grpo")
# TRL's DPO default; SimPO's paper (and TRL's SimPO example); TRL's GRPO default (no KL term, no reference)
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "grpo": 0.0}
# shown in the progress bar, by objective, with their labels (everything goes to metrics.jsonl)
BAR = {"rewards/accuracies": "acc", "rewards/margins": "margin", "reward": "reward",
       "completions/mean_length": "len"}


def check_objective_args(args: TrainArgs) -> None:
    """Flag combinations an objective cannot run with, each as one line."""
    if args.init_adapter and (args.peft == "full" or args.peft_rules or args.n_layer):
        raise RWKVPeftError("--init_adapter continues that adapter's own layers and methods; drop "
                            "--peft full / --peft_rules / --n_layer")
    if args.reward and args.objective != "grpo":
        raise RWKVPeftError("--reward scores GRPO's completions; drop it, or use --objective grpo")
    if args.objective == "sft":
        return
    if args.objective in ("dpo", "simpo") and args.beta == 0:
        raise RWKVPeftError(f"--beta must be positive for --objective {args.objective}, got 0")
    if args.objective == "grpo" and not args.reward:
        raise RWKVPeftError("--objective grpo needs --reward: exact, contains, regex (with --reward_regex), "
                            "module:function or file.py:function (README 'GRPO')")
    if args.val_split:
        raise RWKVPeftError(f"--val_split splits SFT data; with --objective {args.objective} give held-out chat "
                            "or SFT data as --val_file instead")
    if args.chunk_ctx and args.objective == "grpo":
        raise RWKVPeftError("--chunk_ctx is not supported with --objective grpo yet; its completions are "
                            "short, drop --chunk_ctx")
    if args.data_type not in ("auto", "jsonl"):
        records = "prompt" if args.objective == "grpo" else "prompt/chosen/rejected"
        raise RWKVPeftError(f"--objective {args.objective} trains on a .jsonl file of {records} "
                            f"records; drop --data_type {args.data_type}")


def load_objective_data(args: TrainArgs, path: str, tokenizer):
    """The training data of a non-SFT objective: GRPO's prompts, or the preference pairs."""
    if args.objective == "grpo":
        return load_prompt_data(path, tokenizer, args.ctx_len, args.max_completion_length, seed=args.random_seed)
    return load_preference_data(path, tokenizer, args.ctx_len, seed=args.random_seed)


def make_objective(run):
    """The run's objective (None for SFT). Call before DeepSpeed starts and before a resume
    loads trained values: a reference taken here is the model as training starts from it."""
    args = run.args
    if args.objective == "sft":
        return None
    if args.objective == "grpo":
        return GRPO(run)
    pieces = {"chunk_ctx": args.chunk_ctx, "chunk_detach": args.chunk_detach}
    if args.objective == "dpo":
        return DPO(args.beta, Reference(run), **pieces)
    if args.objective == "simpo":
        return SimPO(args.beta, args.gamma, **pieces)
    return ORPO(args.orpo_lambda, **pieces)


class _Preference(Figures):
    """Shared by the pairwise objectives: per-sequence log-probs of the batch's chosen and rejected replies.

    chunk_ctx: run the sequences in pieces of that many tokens (0: whole); chunk_detach: cut
    the gradient between pieces (--chunk_detach, not exact)."""

    def __init__(self, chunk_ctx: int = 0, chunk_detach: bool = False):
        super().__init__()
        self.chunk_ctx, self.chunk_detach = chunk_ctx, chunk_detach

    def micro_batch_loss(self, engine, batch: dict) -> torch.Tensor:
        device = next(engine.module.parameters()).device
        inputs, targets, mask = (batch[k].to(device) for k in ("input_ids", "targets", "loss_mask"))
        loss, metrics = self.loss(engine, inputs, targets, mask)
        self.add(metrics)
        return loss

    def policy_logps(self, engine, inputs, targets, mask):
        logps, counts = self.sequence_logps(engine, inputs, targets, mask)
        return logps.chunk(2), counts.chunk(2)

    def sequence_logps(self, model, inputs, targets, mask):
        """preference.sequence_logps of model on the batch, in one pass or in pieces (module docstring)."""
        if not self.chunk_ctx:
            return sequence_logps(model(inputs), targets, mask)
        logps = chunked_sum(model, inputs, targets, mask, self.chunk_ctx, _row_logps, detach=self.chunk_detach)
        return logps, mask.to(logps.dtype).sum(-1)


def _row_logps(logits, targets, mask):
    return sequence_logps(logits, targets, mask)[0]


class DPO(_Preference):
    def __init__(self, beta: float, reference: Reference, **pieces):
        super().__init__(**pieces)
        self.beta, self.reference = beta, reference

    def loss(self, engine, inputs, targets, mask):
        with torch.no_grad(), self.reference.active(engine.module) as reference:
            ref_logps, _ = self.sequence_logps(reference, inputs, targets, mask)
        (chosen, rejected), _ = self.policy_logps(engine, inputs, targets, mask)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return loss, {**metrics, "logps/chosen": chosen, "logps/rejected": rejected}


class SimPO(_Preference):
    def __init__(self, beta: float, gamma: float, **pieces):
        super().__init__(**pieces)
        self.beta, self.gamma = beta, gamma

    def loss(self, engine, inputs, targets, mask):
        (chosen, rejected), (n_chosen, n_rejected) = self.policy_logps(engine, inputs, targets, mask)
        loss, metrics = simpo_loss(chosen / n_chosen, rejected / n_rejected, self.beta, self.gamma)
        return loss, {**metrics, "logps/chosen": chosen, "logps/rejected": rejected}


class ORPO(_Preference):
    def __init__(self, lam: float, **pieces):
        super().__init__(**pieces)
        self.lam = lam

    def loss(self, engine, inputs, targets, mask):
        (chosen, rejected), (n_chosen, n_rejected) = self.policy_logps(engine, inputs, targets, mask)
        nll = -chosen.sum() / n_chosen.sum()  # the SFT loss of the chosen replies, over their tokens
        loss, metrics = orpo_loss(chosen / n_chosen, rejected / n_rejected, nll, self.lam)
        return loss, {**metrics, "logps/chosen": chosen, "logps/rejected": rejected}
