"""--objective grpo: what one micro batch of prompts computes.

Per prompt of the micro batch:
1. sample --num_generations (G) completions from the current policy, in eval mode (no dropout)
   and without autograd, through the RNN rollout (rollout.py: the prompt read once, its state
   copied G times). The random streams are seeded from --random_seed and the prompt's sample
   index, so a step's completions are a function of the step: resume is exact;
2. score them with the reward function (rewards.py) and normalise within the group
   (grpo.group_advantages: divided by the group's std for loss_type grpo, not for dr_grpo);
3. run prompt + completion through the policy with autograd: per-token log-probabilities of
   the completion tokens, and with --beta > 0 the reference's (the model with its adapters
   off, objectives.Reference) without autograd;
4. grpo.grpo_loss: the clipped ratio to the log-probs at sampling time, plus beta x KL.

One optimizer update follows each sampling (TRL's num_iterations=1), so the log-probs at
sampling time equal the policy's in the loss: they are its values, detached, as in TRL; the
ratio is 1, the clip never binds (clip_ratio logs 0) and the gradient is A x grad log p.

ZeRO stage 3 partitions the parameters, which the rollout's plain forward cannot read: GRPO
refuses it with one line (stage 1 or 2 hold each process's full copy; adapters are small).
"""

from __future__ import annotations

import torch

from ..errors import RWKVPeftError
from ..grpo import group_advantages, grpo_loss
from ..loss import VocabCrossEntropy
from ..rollout import rollout
from .objective_base import Figures, Reference
from .rewards import call_reward, load_reward

PAD_MULTIPLE = 16  # the CUDA WKV kernel runs whole chunks of 16 tokens


class GRPO(Figures):
    def __init__(self, run):
        super().__init__()
        args = run.args
        if run.ds_config["zero_optimization"]["stage"] == 3:
            raise RWKVPeftError("--objective grpo samples with the whole model on each process, which ZeRO stage 3 "
                                "partitions; use --strategy deepspeed_stage_2 (or _1)")
        self.args, self.tokenizer = args, run.tokenizer
        self.reward_name = args.reward
        self.reward = load_reward(args.reward, args.reward_regex)
        self.reference = Reference(run) if args.beta else None  # beta 0: no reference pass at all
        turn_end = run.tokenizer.encode("\n\n")  # a reply ends with a blank line (chat_format.py)
        self.stop = turn_end[0] if len(turn_end) == 1 else None

    def micro_batch_loss(self, engine, batch: dict) -> torch.Tensor:
        args, group = self.args, self.args.num_generations
        completions, lengths = self.sample(engine.module, batch)
        prompts = [r["prompt"] for r in batch["records"] for _ in range(group)]
        keys = sorted({k for r in batch["records"] for k in r} - {"prompt"})
        fields = {k: [r.get(k) for r in batch["records"] for _ in range(group)] for k in keys}
        texts = [self.text(c[:n]) for c, n in zip(completions, lengths.tolist())]
        rewards = call_reward(self.reward, self.reward_name, prompts, texts, fields)
        advantages = group_advantages(rewards, group, scale=args.loss_type == "grpo")

        inputs, targets, positions, mask = self.sequences(batch["prompt_ids"], completions, lengths)
        logps = -VocabCrossEntropy.apply(engine(inputs), targets, 0.0).gather(1, positions)
        ref_logps = None
        if self.reference is not None:
            with torch.no_grad():
                ref_ce = VocabCrossEntropy.apply(self.reference.logits(engine.module, inputs), targets, 0.0)
            ref_logps = -ref_ce.gather(1, positions)
        loss, figures = grpo_loss(logps, logps.detach(), mask, advantages.to(logps.device), ref_logps=ref_logps,
                                  beta=args.beta, eps_low=args.epsilon, eps_high=args.epsilon,
                                  loss_type=args.loss_type, max_len=args.max_completion_length)
        self.add({"reward": rewards.mean(), "reward_std": rewards.view(-1, group).std(-1).mean(),
                  "completions/mean_length": lengths.double().mean(), **figures})
        return loss

    @torch.no_grad()
    def sample(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B*G, max_completion_length], lengths [B*G]), the G completions of each prompt in turn."""
        args, was_training = self.args, model.training
        model.eval()
        try:
            drawn = [rollout(model, ids, args.num_generations, args.max_completion_length,
                             temperature=args.temperature, top_p=args.top_p, stop=self.stop,
                             seed=(args.random_seed * 1_000_003 + index) % 2**40)
                     for ids, index in zip(batch["prompt_ids"], batch["index"])]
        finally:
            model.train(was_training)
        return torch.cat([t for t, _ in drawn]), torch.cat([n for _, n in drawn])

    def text(self, tokens: torch.Tensor) -> str:
        """A completion as the reward sees it: the reply without its end-of-turn blank line, stripped."""
        return self.tokenizer.decode(tokens.tolist()).split("\n\n")[0].strip()

    def sequences(self, prompts: list, completions: torch.Tensor, lengths: torch.Tensor):
        """Inputs and targets [N, W] of prompt + completion (right-padded), and per completion token
        its position in them [N, L] with its mask [N, L] (0 past the completion's length)."""
        group = self.args.num_generations
        rows = [prompts[n // group] + completions[n, :int(lengths[n])].tolist() for n in range(len(completions))]
        width = -(-max(len(r) - 1 for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros(len(rows), width, dtype=torch.long)
        for n, r in enumerate(rows):
            inputs[n, :len(r) - 1] = torch.tensor(r[:-1])
            targets[n, :len(r) - 1] = torch.tensor(r[1:])
        steps = torch.arange(completions.shape[1])
        starts = torch.tensor([len(prompts[n // group]) - 1 for n in range(len(rows))])
        positions = (starts[:, None] + steps).clamp(max=width - 1)
        mask = (steps[None] < lengths.cpu()[:, None]).float()
        device = completions.device
        return inputs.to(device), targets.to(device), positions.to(device), mask.to(device)
