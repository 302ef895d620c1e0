"""GRPO rollout throughput: G completions after one prompt, state-copy rollouts against separate prefills.

    python bench/bench_rollout.py                     # G=8, 64 new tokens after a 256-token prompt

state copy (rwkv_peft/rollout.py): the prompt is prefilled once, its RNN state copied G times, and
the G completions decoded as one batch. Separate prefills: each completion prefills the prompt
itself and decodes alone. Both sample the same tokens (tests/test_grpo.py); both are timed in this
one run, on the same model and threads, and the ratio of their tokens/s is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rwkv_peft.assets import DEMO_BASE  # noqa: E402
from rwkv_peft.generate import set_threads  # noqa: E402
from rwkv_peft.model.load import load_model  # noqa: E402
from rwkv_peft.rollout import rollout, rollout_separately  # noqa: E402


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_BASE))
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "bench/results/rollout.json"))
    args = p.parse_args()
    model = load_model(args.model, dtype=torch.float32).eval()
    set_threads(model)  # as chat and eval: one thread for a small model
    prompt = torch.randint(1, model.config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    a, _ = rollout(model, prompt, args.group, args.new, seed=1)
    b, _ = rollout_separately(model, prompt, args.group, args.new, seed=1)
    assert torch.equal(a, b), "the two rollouts sampled different tokens"
    tokens = args.group * args.new
    t_copy = timed(lambda: rollout(model, prompt, args.group, args.new, seed=1), args.repeats)
    t_sep = timed(lambda: rollout_separately(model, prompt, args.group, args.new, seed=1), args.repeats)
    result = {"model": args.model, "group": args.group, "prompt_len": args.prompt_len, "new": args.new,
              "threads": torch.get_num_threads(), "state_copy_s": round(t_copy, 3), "separate_s": round(t_sep, 3),
              "state_copy_tok_s": round(tokens / t_copy, 1), "separate_tok_s": round(tokens / t_sep, 1),
              "ratio": round(t_sep / t_copy, 2)}
    print(json.dumps(result, indent=1))
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
