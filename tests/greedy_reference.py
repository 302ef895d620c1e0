"""Greedy decoding by whole-sequence forwards: each new token re-reads the whole text (no
RNN state), so it is independent of rwkv_peft.generate's stateful decode loop."""

import torch


def greedy_tokens(model, ids: list[int], max_tokens: int, eos: int = 0, stop=None) -> list[int]:
    """Up to max_tokens argmax tokens after ids; stops before eos, or after stop(tokens) is true."""
    out: list[int] = []
    for _ in range(max_tokens):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        if stop is not None and stop(out):
            break
    return out
