"""Prompt data for GRPO: `.jsonl` records of a prompt, an optional answer, and any other fields.

    {"prompt": "Capital of Varnholm?", "answer": "Lumen Bay"}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "level": 2}

A string prompt is one user turn; a message list is rendered as it stands. Either way the prompt
is the World chat format of SFT (chat_format.py) followed by "Assistant:", which is where the
sampled completions begin, as in chat and eval. Every field but `prompt` goes to the reward
function (train/rewards.py), `answer` included.

`PromptData.batch([i, ...])` gives the prompts' token ids, their records and their sample
indices (which seed the rollouts). Prompt i is position i % len of epoch i // len, in a
permutation drawn from (seed, epoch): stateless, as TrainingData and PreferenceData.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rwkv_peft.errors import RWKVPeftError

from .chat_format import CHAT_ASSISTANT, chat_segments, encode_segments
from .preference import EpochOrder, _messages
from .sources import jsonl_records

__all__ = ["PromptData", "load_prompt_data", "prompt_text"]


def prompt_text(record: dict, where: str) -> str:
    """The rendered prompt of one record, ending in "Assistant:"."""
    if "prompt" not in record:
        raise RWKVPeftError(f"{where}: a GRPO prompt record needs 'prompt' (a string, or a list of "
                            f"{{\"role\", \"content\"}} messages); this one has {sorted(record)[:8]}")
    segments = chat_segments(_messages(record["prompt"], "user", f"{where} 'prompt'"), f"{where} 'prompt'")
    if segments and segments[-1][1]:
        raise RWKVPeftError(f"{where}: 'prompt' ends with an assistant message; end it with a user turn, the "
                            "completion is the assistant's reply to it")
    return "".join(text for text, _ in segments) + CHAT_ASSISTANT


class PromptData:
    """The prompts of one file, tokenized (see the module docstring)."""

    kind = "prompts"

    def __init__(self, prompts: list, records: list, *, ctx_len: int, seed: int, tokenizer, source: str):
        self.prompts, self.records, self.ctx_len, self.seed = prompts, records, ctx_len, seed
        self.tokenizer, self.source = tokenizer, source
        self.tokens_total = sum(len(p) for p in prompts)
        self._order = EpochOrder(len(prompts), seed, stream=2)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: Sequence[int]) -> dict:
        """{"prompt_ids": [ids, ...], "records": [record, ...], "index": [sample index, ...]}."""
        positions = [self._order(i) for i in indices]
        return {"prompt_ids": [self.prompts[p] for p in positions], "records": [self.records[p] for p in positions],
                "index": [int(i) for i in indices]}

    def render(self, index: int) -> str:
        """Prompt `index` as the model reads it, and the fields its reward sees (the dry run shows it)."""
        p = self._order(index)
        fields = {k: v for k, v in self.records[p].items() if k != "prompt"}
        return (f"--- prompt {index} of {self.source} ({len(self.prompts[p])} tokens; the completions are "
                f"sampled after it) ---\n{self.tokenizer.decode(self.prompts[p])}\n[fields for the reward: {fields}]")

    def describe(self) -> str:
        return f"{self.source}: {len(self):,} prompts, {self.tokens_total:,} tokens"


def load_prompt_data(path: str, tokenizer, ctx_len: int, max_completion_length: int, seed: int = 0) -> PromptData:
    """Read and tokenize a prompts `.jsonl` file; every bad record is an RWKVPeftError naming its line.
    A prompt and its completion must fit --ctx_len tokens."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".json"):
        raise RWKVPeftError(f"{p}: GRPO prompts must be a .jsonl file of records with a 'prompt' field")
    prompts, records = [], []
    for lineno, record in jsonl_records(p, f"GRPO prompt file {p} not found"):
        where = f"{p} line {lineno}"
        ids, _ = encode_segments([(prompt_text(record, where), False)], tokenizer)
        if len(ids) + max_completion_length > ctx_len:
            raise RWKVPeftError(f"{where}: the prompt's {len(ids)} tokens and --max_completion_length "
                                f"{max_completion_length} exceed --ctx_len {ctx_len}; raise --ctx_len or "
                                "shorten the prompt")
        prompts.append(ids)
        records.append(record)
    if not prompts:
        raise RWKVPeftError(f"{p} holds no prompt records")
    return PromptData(prompts, records, ctx_len=ctx_len, seed=seed, tokenizer=tokenizer, source=str(p))
