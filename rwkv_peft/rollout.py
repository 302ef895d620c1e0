"""GRPO's rollouts through the RNN: prefill the prompt once, copy its state G times, decode the G
completions as one batch.

A transformer samples G completions of one prompt by re-reading (or caching per completion) the
prompt; an RNN's whole past is its state, so the prompt is read once and its state copied: the G
completions then advance together, one token per step for all of them, in a state whose size does
not grow with length. Each step runs model(tokens [G, 1], state), so its logits are by
construction those of the model.

Sampling is Gumbel-max with one random stream per completion (seeded by (seed, g)): completion g
draws the same noise whether it is decoded alone or in the batch, which is what lets
tests/test_grpo.py compare the batch with G separate prefills token for token. top_p < 1 samples
from the smallest set of tokens whose probability reaches top_p (nucleus sampling), by masking the
others before the same Gumbel-max draw. Decoding ends once every completion has produced `stop`;
the positions after a completion's stop hold `stop` again.
"""

from __future__ import annotations

import torch

from .model.common import RWKVState


def _noise(generators: list, vocab: int, device) -> torch.Tensor:
    """One row of Gumbel noise per completion, each from its own stream."""
    u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in generators])
    return (-torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))).to(device)


def _pick(logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.double() / temperature
    if top_p < 1.0:  # drop the tail: tokens after the first whose cumulative probability reaches top_p
        probs, order = scaled.softmax(-1).sort(-1, descending=True)
        tail = probs.cumsum(-1) - probs >= top_p
        scaled = scaled.scatter(-1, order, torch.where(tail, float("-inf"), scaled.gather(-1, order)))
    return (scaled + noise).argmax(-1)


def _generators(seed: int, ids) -> list:
    return [torch.Generator().manual_seed(seed * 1_000_003 + g) for g in ids]


def repeat_state(state: RWKVState, group: int) -> RWKVState:
    """A batch-1 state copied to `group` rows."""
    return RWKVState(*(t.expand(t.shape[0], group, *t.shape[2:]).contiguous()
                       for t in (state.att_shift, state.wkv, state.ffn_shift)))


@torch.no_grad()
def rollout(model, prompt: list[int], group: int, max_new: int, *, temperature: float = 1.0, top_p: float = 1.0,
            seed: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [group, max_new], lengths [group]): G completions of one prompt, sampled together.
    A completion ends after the token `stop` (counted in its length); later positions hold `stop`."""
    device = next(model.parameters()).device
    logits, state = model(torch.tensor([prompt], device=device), model.zero_state(1), last_only=True)
    state = repeat_state(state, group)
    logits = logits[:, -1].expand(group, -1)
    generators = _generators(seed, range(group))
    out = torch.zeros(group, max_new, dtype=torch.long, device=device)
    ended = torch.zeros(group, dtype=torch.bool, device=device)
    for t in range(max_new):
        out[:, t] = _pick(logits.float(), _noise(generators, logits.shape[-1], device), temperature, top_p)
        if stop is not None:
            ended |= out[:, t] == stop
            if ended.all():
                break
        if t + 1 < max_new:
            logits, state = model(out[:, t:t + 1], state, last_only=True)
            logits = logits[:, -1]
    return _ended(out, stop)


@torch.no_grad()
def rollout_separately(model, prompt: list[int], group: int, max_new: int, *, temperature: float = 1.0,
                       top_p: float = 1.0, seed: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same completions, each from its own prefill and decoded alone: the reference (and the
    baseline of bench/bench_rollout.py)."""
    device = next(model.parameters()).device
    rows = []
    for g in range(group):
        (generator,) = _generators(seed, [g])
        logits, state = model(torch.tensor([prompt], device=device), model.zero_state(1), last_only=True)
        logits, row = logits[:, -1], []
        for t in range(max_new):
            row.append(_pick(logits.float(), _noise([generator], logits.shape[-1], device), temperature, top_p))
            if row[-1].item() == stop:
                break
            if t + 1 < max_new:
                logits, state = model(row[-1].view(1, 1), state, last_only=True)
                logits = logits[:, -1]
        rows.append(torch.cat(row + [row[-1].new_full((max_new - len(row),), stop or 0)]))
    return _ended(torch.stack(rows), stop)


def _ended(tokens: torch.Tensor, stop: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens with `stop` after each completion's first stop, the completions' lengths)."""
    full = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
    if stop is None:
        return tokens, full
    hit = tokens == stop
    lengths = torch.where(hit.any(-1), hit.float().argmax(-1) + 1, full)
    after = torch.arange(tokens.shape[1], device=tokens.device)[None] >= lengths[:, None]
    return tokens.masked_fill(after, stop), lengths
