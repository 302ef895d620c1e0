"""Preference data: `.jsonl` records of a prompt and two replies, for DPO, SimPO and ORPO.

One record per line, three fields, each a string or a list of chat messages (TRL's
"conversational" form):

    {"prompt": "Capital of Varnholm?", "chosen": "Lumen Bay.", "rejected": "Port Adder."}
    {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

A string prompt is one user turn, a string reply one assistant turn. Prompt and reply are
rendered in the World chat format of SFT (chat_format.py) and tokenized the same way; only
the reply's assistant text counts (its loss mask is 1), never the prompt, not even an
assistant turn inside a prompt. Extra fields (an `answer`, ids) are ignored.

`PreferenceData.batch([i, ...])` gives 2B sequences, the B chosen then the B rejected, padded
to the longest in the batch (rounded up to 16, at most ctx_len). Pair i is position i % len of
epoch i // len, in a permutation drawn from (seed, epoch): stateless, as TrainingData.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rwkv_peft.errors import RWKVPeftError

from .chat_format import RENDER_LOSS_END, RENDER_LOSS_START, chat_segments, encode_segments, merge_runs
from .sources import jsonl_records

__all__ = ["PreferenceData", "load_preference_data", "pair_segments"]

FIELDS = ("prompt", "chosen", "rejected")
PAD_MULTIPLE = 16  # the CUDA WKV kernel runs whole chunks of 16 tokens


def _messages(value, role: str, where: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise RWKVPeftError(f"{where} must be a string or a list of {{\"role\", \"content\"}} messages, "
                        f"got {type(value).__name__}")


def pair_segments(record: dict, where: str) -> tuple[list, list]:
    """([(text, trained)] of prompt + chosen, the same of prompt + rejected) for one record."""
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise RWKVPeftError(f"{where}: a preference record needs {', '.join(FIELDS)}; this one has no "
                            f"{' or '.join(repr(m) for m in missing)} (it has {sorted(record)[:8]})")
    prompt = [(text, False) for text, _ in chat_segments(_messages(record["prompt"], "user", f"{where} 'prompt'"),
                                                         f"{where} 'prompt'")]
    out = []
    for name in FIELDS[1:]:
        reply = chat_segments(_messages(record[name], "assistant", f"{where} {name!r}"), f"{where} {name!r}")
        if not any(trained for _, trained in reply):
            raise RWKVPeftError(f"{where}: {name!r} holds no assistant message, so nothing would be trained")
        out.append(merge_runs(prompt + reply))
    return out[0], out[1]


class EpochOrder:
    """Which item the sample `index` is, over epochs of n items: each epoch a permutation seeded
    by (seed, stream, epoch), so that any index is found without replaying those before it
    (what an exact resume needs). The current epoch's permutation is kept."""

    def __init__(self, n: int, seed: int, stream: int):
        self.n, self.seed, self.stream = n, seed, stream
        self._epoch, self._order = None, None

    def __call__(self, index: int) -> int:
        epoch, j = divmod(int(index), self.n)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed % 2**64, self.stream, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n)
        return int(self._order[j])


class PreferenceData:
    """The pairs of one preference file, tokenized (see the module docstring)."""

    kind = "preference"

    def __init__(self, pairs: list, *, ctx_len: int, seed: int, tokenizer, source: str):
        self.pairs, self.ctx_len, self.seed, self.tokenizer, self.source = pairs, ctx_len, seed, tokenizer, source
        self.tokens_total = sum(len(c[0]) + len(r[0]) for c, r in pairs)
        self.truncated = sum(len(c[0]) > ctx_len + 1 or len(r[0]) > ctx_len + 1 for c, r in pairs)
        self._order = EpochOrder(len(pairs), seed, stream=1)

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, index: int) -> tuple:
        """((chosen ids, mask), (rejected ids, mask)) of pair `index`, in the order of its epoch."""
        return self.pairs[self._order(index)]

    def batch(self, indices: Sequence[int]) -> dict:
        pairs = [self.pair(i) for i in indices]
        rows = [c for c, _ in pairs] + [r for _, r in pairs]
        longest = max(min(len(ids), self.ctx_len + 1) - 1 for ids, _ in rows)
        width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, self.ctx_len)
        out = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
               "targets": torch.zeros(len(rows), width, dtype=torch.long),
               "loss_mask": torch.zeros(len(rows), width, dtype=torch.float32)}
        for n, (ids, mask) in enumerate(rows):
            m = min(len(ids), self.ctx_len + 1) - 1
            out["input_ids"][n, :m] = torch.tensor(ids[:m])
            out["targets"][n, :m] = torch.tensor(ids[1:m + 1])
            out["loss_mask"][n, :m] = torch.tensor(mask[1:m + 1], dtype=torch.float32)
        return out

    def render(self, index: int) -> str:
        """Pair `index` as text, the trained tokens between ⟦ ⟧ (the dry run shows it)."""
        parts = [f"--- pair {index} of {self.source}: trained reply tokens shown between "
                 f"{RENDER_LOSS_START} {RENDER_LOSS_END} ---"]
        for name, (ids, mask) in zip(("chosen", "rejected"), self.pair(index)):
            ids, mask = ids[:self.ctx_len + 1], mask[:self.ctx_len + 1]
            runs, start = [], 0
            for k in range(1, len(ids) + 1):
                if k == len(ids) or mask[k] != mask[start]:
                    text = self.tokenizer.decode(ids[start:k])
                    runs.append(f"{RENDER_LOSS_START}{text}{RENDER_LOSS_END}" if mask[start] else text)
                    start = k
            parts.append(f"[{name}: {sum(mask[1:])} trained tokens]\n" + "".join(runs))
        return "\n".join(parts)

    def describe(self) -> str:
        line = f"{self.source}: {len(self):,} preference pairs, {self.tokens_total:,} tokens"
        return line + (f"; {self.truncated:,} pairs cut to ctx_len+1 tokens" if self.truncated else "")


def load_preference_data(path: str, tokenizer, ctx_len: int, seed: int = 0) -> PreferenceData:
    """Read and tokenize a preference `.jsonl` file; every bad record is an RWKVPeftError naming its line."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".json"):
        raise RWKVPeftError(f"{p}: preference data must be a .jsonl file of prompt/chosen/rejected records")
    pairs = []
    for lineno, record in jsonl_records(p, f"preference data file {p} not found"):
        where = f"{p} line {lineno}"
        chosen, rejected = (encode_segments(s, tokenizer) for s in pair_segments(record, where))
        for name, (ids, mask) in (("chosen", chosen), ("rejected", rejected)):
            if not any(mask[1:ctx_len + 1]):
                raise RWKVPeftError(f"{where}: the prompt fills --ctx_len {ctx_len}, so no token of the {name} "
                                    "reply would be trained; raise --ctx_len or shorten the prompt")
        pairs.append((chosen, rejected))
    if not pairs:
        raise RWKVPeftError(f"{p} holds no preference records")
    return PreferenceData(pairs, ctx_len=ctx_len, seed=seed, tokenizer=tokenizer, source=str(p))
