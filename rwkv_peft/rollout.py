"""GRPO's rollouts through the RNN: prefill the prompt once, copy its state G times, decode the G
completions as one batch.

A transformer samples G completions of one prompt by re-reading (or caching per completion) the
prompt; an RNN's whole past is its state, so the prompt is read once and its state copied: the G
completions then advance together, one token per step for all of them, in a state whose size does
not grow with length. Each step runs model(tokens [G, 1], state), so its logits are by
construction those of the model.

Sampling is Gumbel-max with one random stream per completion (seeded by (seed, g)): completion g
draws the same noise whether it is decoded alone or in the batch, which is what lets
tests/test_rollout.py compare the batch with G separate prefills token for token.
"""

from __future__ import annotations

import torch

from .model.common import RWKVState


def _noise(generators: list, vocab: int, device) -> torch.Tensor:
    """One row of Gumbel noise per completion, each from its own stream."""
    u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in generators])
    return (-torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))).to(device)


def _pick(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return (logits.double() / temperature + noise).argmax(-1)


def _generators(seed: int, ids) -> list:
    return [torch.Generator().manual_seed(seed * 1_000_003 + g) for g in ids]


def repeat_state(state: RWKVState, group: int) -> RWKVState:
    """A batch-1 state copied to `group` rows."""
    return RWKVState(*(t.expand(t.shape[0], group, *t.shape[2:]).contiguous()
                       for t in (state.att_shift, state.wkv, state.ffn_shift)))


@torch.no_grad()
def rollout(model, prompt: list[int], group: int, max_new: int, *, temperature: float = 1.0, seed: int = 0,
            stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [group, max_new], lengths [group]): G completions of one prompt, sampled together.
    A completion ends after the token `stop` (counted in its length); later tokens are filler."""
    device = next(model.parameters()).device
    logits, state = model(torch.tensor([prompt], device=device), model.zero_state(1), last_only=True)
    state = repeat_state(state, group)
    logits = logits[:, -1].expand(group, -1)
    generators = _generators(seed, range(group))
    out = torch.zeros(group, max_new, dtype=torch.long, device=device)
    for t in range(max_new):
        out[:, t] = _pick(logits.float(), _noise(generators, logits.shape[-1], device), temperature)
        if t + 1 < max_new:
            logits, state = model(out[:, t:t + 1], state, last_only=True)
            logits = logits[:, -1]
    return out, _lengths(out, stop)


@torch.no_grad()
def rollout_separately(model, prompt: list[int], group: int, max_new: int, *, temperature: float = 1.0,
                       seed: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same completions, each from its own prefill and decoded alone: the reference (and the
    baseline of bench/bench_rollout.py)."""
    device = next(model.parameters()).device
    rows = []
    for g in range(group):
        (generator,) = _generators(seed, [g])
        logits, state = model(torch.tensor([prompt], device=device), model.zero_state(1), last_only=True)
        logits, row = logits[:, -1], []
        for t in range(max_new):
            row.append(_pick(logits.float(), _noise([generator], logits.shape[-1], device), temperature))
            if t + 1 < max_new:
                logits, state = model(row[-1].view(1, 1), state, last_only=True)
                logits = logits[:, -1]
        rows.append(torch.cat(row))
    out = torch.stack(rows)
    return out, _lengths(out, stop)


def _lengths(tokens: torch.Tensor, stop: int | None) -> torch.Tensor:
    full = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
    if stop is None:
        return full
    hit = tokens == stop
    first = torch.where(hit.any(-1), hit.float().argmax(-1) + 1, full)
    return first
