"""Write demo/data/grpo_prompts.jsonl: the Varnholm questions for --objective grpo, with their answers.

    python demo/make_grpo_prompts.py

One record per TRAINING phrasing of each Varnholm question (10 relations x 5 phrasings; the
held-out phrasings of demo/data/heldout.jsonl never appear): `prompt` the question, `answer`
the exact fact (what `--reward contains` looks for in a completion, as rwkv_peft.eval's task
score does), `relation` which fact it is (a field any reward function receives).
"""

from __future__ import annotations

import random
from pathlib import Path

from make_base import PLACE, PLACE_FACTS, RELATIONS, TRAIN_QUESTIONS, _fill, write_jsonl

OUT = Path(__file__).resolve().parent / "data" / "grpo_prompts.jsonl"


def prompt_records(seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": _fill(question, PLACE, PLACE_FACTS[rel], rng), "answer": PLACE_FACTS[rel], "relation": rel}
            for rel in sorted(PLACE_FACTS) for question in RELATIONS[rel]["q"][:TRAIN_QUESTIONS]]


if __name__ == "__main__":
    write_jsonl(OUT, prompt_records())
    print(f"wrote {OUT}")
