"""Scoring a model on held-out chat data, shared by `rwkv_peft.eval` and training's validation.

- loss: cross entropy per trained token over the assistant replies (rendered and masked as
  for training), summed so that shards scored apart (one per process) add up exactly;
- task: each assistant turn answered greedily from the conversation before it, matched
  against the record's "answer" (last turn) or the message itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data.chat_format import CHAT_ASSISTANT, chat_segments, encode_segments
from .data.sources import jsonl_records
from .errors import RWKVPeftError
from .generate import Sampling, generate_text
from .loss import masked_ce_sum


def read_records(path: str) -> list[dict]:
    """The chat records of a .jsonl file (blank lines skipped); one line naming what is wrong."""
    records = []
    for n, rec in jsonl_records(Path(path), f"--data {path} not found; pass a chat .jsonl file"):
        if not isinstance(rec.get("messages"), list):
            raise RWKVPeftError(f"{path} line {n}: expected a chat record {{\"messages\": [...]}}")
        records.append(rec)
    if not records:
        raise RWKVPeftError(f"{path} holds no records")
    return records


@torch.inference_mode()
def heldout_sums(model, data, indices, batch_size: int = 8) -> tuple[float, int]:
    """(sum of CE over the trained tokens, number of trained tokens) of data's samples at indices.
    Sums rather than a mean, so that shards evaluated apart (one per process) add up exactly."""
    device = model.emb.weight.device
    indices = list(indices)
    total, count = 0.0, 0
    for start in range(0, len(indices), batch_size):
        batch = data.batch(indices[start:start + batch_size])
        logits = model(batch["input_ids"].to(device))
        ce_sum, n_trained = masked_ce_sum(logits, batch["targets"].to(device), batch["loss_mask"].to(device))
        total += float(ce_sum)
        count += int(n_trained)
    return total, count


def heldout_loss(model, data, batch_size: int = 8) -> tuple[float, int]:
    """(mean CE per trained token, number of trained tokens) over every sample of data."""
    total, count = heldout_sums(model, data, range(len(data)), batch_size)
    return total / max(count, 1), count


def task_items(records: list[dict], tokenizer) -> list[dict]:
    """One item per assistant turn: prompt ids, the expected reply, how it is matched."""
    items = []
    for r, rec in enumerate(records):
        msgs = rec["messages"]
        turns = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"]
        for i in turns:
            segments = chat_segments(msgs[:i], f"record {r + 1}") if i else []
            if segments and not segments[-1][1]:
                segments[-1] = (segments[-1][0] + CHAT_ASSISTANT, False)
            else:
                segments.append((CHAT_ASSISTANT, False))
            ids, _ = encode_segments(segments, tokenizer)
            expected = str(msgs[i]["content"]).strip()
            answer = rec.get("answer") if i == turns[-1] else None
            items.append({"prompt_ids": ids, "question": str(msgs[i - 1]["content"]) if i else "",
                          "expected": expected, "answer": None if answer is None else str(answer)})
    return items


def expected_reply(item: dict, width: int = 80) -> str:
    """What a reply must be to hit: the record's answer somewhere in it, else exactly the message."""
    if item["answer"] is not None:
        return f"a reply containing {item['answer'][:width]!r}"
    return f"exactly {item['expected'][:width]!r} (the record has no 'answer' field)"


def task_score(model, tokenizer, items: list[dict], max_tokens: int) -> dict:
    greedy = Sampling(temperature=0.0)
    decoder = model.decoder()  # its weight copies, built once for every item
    hits = exact = 0
    replies = []
    for item in items:
        reply = generate_text(model, tokenizer, item["prompt_ids"], None, max_tokens=max_tokens,
                              stop=("\n\n",), sampling=greedy, decoder=decoder).text.strip()
        is_exact = reply == item["expected"]
        hit = item["answer"].lower() in reply.lower() if item["answer"] is not None else is_exact
        hits += hit
        exact += is_exact
        replies.append((item, reply, hit))
    n = max(len(items), 1)
    return {"task": hits / n, "exact": exact / n, "items": len(items), "replies": replies}
