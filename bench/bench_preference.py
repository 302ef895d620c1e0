"""Preference and reward tuning on the embedded demo, over seeds: from a weak SFT adapter, does
DPO / ORPO / SimPO / GRPO raise the held-out task score?

    python bench/bench_preference.py                          # dpo and orpo, seeds 0 1 2 (~20 min on 2 cores)
    python bench/bench_preference.py --objectives simpo --seeds 0
    python bench/bench_preference.py --objectives grpo dpo dpo-low --json bench/results/grpo.json

Per seed: the weak SFT adapter (Bone r=64, lr 1e-4, one epoch of demo/data/train.jsonl, the
README's 20/30 row), then each setup of SETUPS from it with `--init_adapter` on its demo data
(demo/data/preference.jsonl; GRPO: demo/data/grpo_prompts.jsonl), 200 steps, all the real
train.py with --random_seed set; one `rwkv_peft.eval` call then scores every adapter (held-out
loss, and the task: greedy replies that contain the answer). Prints mean and range per row,
writes --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SFT = ["--peft", "bone", "--bone_r", "64", "--lr_init", "1e-4"]
SETUPS = {  # name: its train.py flags; the rates tried on seed 0 that did best (bench/README.md)
    "dpo": ["--objective", "dpo", "--lr_init", "2e-5", "--lr_final", "2e-6"],
    "dpo-low": ["--objective", "dpo", "--lr_init", "5e-6", "--lr_final", "5e-7"],
    "orpo": ["--objective", "orpo", "--lr_init", "1e-4", "--lr_final", "1e-5"],
    "simpo": ["--objective", "simpo", "--lr_init", "1e-4", "--lr_final", "1e-5"],
    "grpo": ["--objective", "grpo", "--reward", "contains", "--max_completion_length", "32", "--temperature", "0.7",
             "--lr_init", "1e-4", "--lr_final", "1e-6"],
}
STEPS = 200


def train(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "--proj_dir", str(out)]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", nargs="+", default=["dpo", "orpo"], choices=list(SETUPS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--json", default=str(ROOT / "bench/results/preference.json"))
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_pref_") as tmp:
        for seed in args.seeds:
            sft = Path(tmp) / f"sft-{seed}"
            s = train([*SFT, "--random_seed", str(seed)], sft)
            runs.append({"setup": "sft (bone lr 1e-4)", "seed": seed, "adapter": str(sft / "adapter.safetensors"),
                         "train_s": s["time_s"]})
            for setup in args.objectives:
                out = Path(tmp) / f"{setup}-{seed}"
                s = train([*SETUPS[setup], "--init_adapter", str(sft / "adapter.safetensors"),
                           "--max_steps", str(STEPS), "--random_seed", str(seed)], out)
                runs.append({"setup": f"sft + {' '.join(SETUPS[setup])}", "seed": seed,
                             "adapter": str(out / "adapter.safetensors"), "train_s": s["time_s"]})
        scores = Path(tmp) / "eval.json"
        subprocess.run([sys.executable, "-m", "rwkv_peft.eval", "--adapter", *[r["adapter"] for r in runs],
                        "--json", str(scores)], check=True, capture_output=True, text=True, cwd=ROOT)
        by_adapter = {r["model"]: r for r in json.loads(scores.read_text())}
    for r in runs:
        e = by_adapter[r.pop("adapter")]
        r.update(loss=e["loss"], task=e["task"], items=e["items"])
    print("\n| setup | held-out loss (mean, range) | task score (mean, range) | per seed |")
    print("|---|---|---|---|")
    for setup in dict.fromkeys(r["setup"] for r in runs):
        group = [r for r in runs if r["setup"] == setup]
        loss, task = [r["loss"] for r in group], [round(r["task"] * r["items"]) for r in group]
        print(f"| {setup} | {statistics.mean(loss):.2f} ({min(loss):.2f}-{max(loss):.2f}) | "
              f"{statistics.mean(task):.1f}/{group[0]['items']} ({min(task)}-{max(task)}) | "
              f"{', '.join(map(str, task))} |")
    Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
