"""Write demo/data/preference.jsonl: preference pairs about Varnholm for DPO, SimPO and ORPO.

    python demo/make_preference.py

Each record asks one of the TRAINING phrasings of a Varnholm question (the held-out phrasings of
demo/data/heldout.jsonl never appear) and gives two replies in the same sentence: `chosen` with
the true fact, `rejected` with a plausible wrong one (the same relation's value of a real
country, or a made-up year or festival). Seeded: the same file on every run.
"""

from __future__ import annotations

import random
from pathlib import Path

from make_base import COUNTRIES, PLACE, PLACE_FACTS, RELATIONS, TRAIN_QUESTIONS, _fill, write_jsonl

OUT = Path(__file__).resolve().parent / "data" / "preference.jsonl"
PAIRS = 400
# wrong values for the two facts no real country has in the tables
MADE_UP = {"founded": ["1588", "1703", "1624", "1690", "1751"],
           "festival": ["the Harvest Moon", "the Winter Fair", "the Candle Week", "the Spring Feast"]}


def wrong_values(rel: str) -> list[str]:
    values = {facts[rel] for facts in COUNTRIES.values() if rel in facts} | set(MADE_UP.get(rel, ()))
    return sorted(values - {PLACE_FACTS[rel]})


def preference_records(n: int = PAIRS, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        rel = rng.choice(sorted(PLACE_FACTS))
        spec = RELATIONS[rel]
        question, answer = rng.choice(spec["q"][:TRAIN_QUESTIONS]), rng.choice(spec["a"])
        wrong = rng.choice(wrong_values(rel))
        fill_rng = random.Random(rng.random())  # {other} in a question: the same in both replies' prompt
        prompt = _fill(question, PLACE, PLACE_FACTS[rel], fill_rng)
        records.append({"prompt": prompt, "chosen": _fill(answer, PLACE, PLACE_FACTS[rel], rng),
                        "rejected": _fill(answer, PLACE, wrong, rng), "answer": PLACE_FACTS[rel]})
    return records


if __name__ == "__main__":
    write_jsonl(OUT, preference_records())
    print(f"wrote {OUT}")
