"""State tuning on the embedded demo: the learned state alone, Bone r=64, and both, over seeds.

    python bench/bench_state_tuning.py                                    # 3 setups x 3 seeds
    python bench/bench_state_tuning.py --setups state --seeds 0 --state_lr 1e-3 1e-2 1e-1 1   # a rate sweep

Each run is the real `train.py` on the demo (its defaults: demo/base.pth, 1 epoch, lr 1e-3),
with --random_seed (data order) set; then one `rwkv_peft.eval` call scores every adapter:
held-out loss and task score (greedy replies that contain the answer). Prints one row per
setup and rate (mean and range over the seeds) and writes every figure to --json.
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
SETUPS = {
    "state": ["--peft", "none", "--train_parts", "state"],
    "bone": ["--peft", "bone", "--bone_r", "64"],
    "bone+state": ["--peft", "bone", "--bone_r", "64", "--train_parts", "state"],
}


def eval_adapters(adapters: list[str], tmp: Path) -> dict[str, dict]:
    """One rwkv_peft.eval call scores every adapter: {adapter path: its row (loss, task, items, ...)}."""
    scores = tmp / "eval.json"
    subprocess.run([sys.executable, "-m", "rwkv_peft.eval", "--adapter", *adapters, "--json", str(scores)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    return {r["model"]: r for r in json.loads(scores.read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--state_lr", nargs="+", type=float, default=[None], help="rates to compare (default: train.py's)")
    p.add_argument("--json", default=str(ROOT / "bench/results/state_tuning.json"))
    args = p.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_state_") as tmp:
        for setup in args.setups:
            rates = args.state_lr if "state" in setup else [None]
            for rate in rates:
                for seed in args.seeds:
                    out = Path(tmp) / f"{setup}-{rate}-{seed}"
                    cmd = [sys.executable, str(ROOT / "train.py"), *SETUPS[setup], "--random_seed", str(seed),
                           "--proj_dir", str(out)] + (["--state_lr", str(rate)] if rate is not None else [])
                    print(" ".join(cmd[1:]), flush=True)
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                    summary = json.loads((out / "summary.json").read_text())
                    runs.append({"setup": setup, "state_lr": rate, "seed": seed,
                                 "adapter": str(out / "adapter.safetensors"), "train_s": summary.get("time_s")})
        by_adapter = eval_adapters([r["adapter"] for r in runs], Path(tmp))
    for r in runs:
        e = by_adapter[r.pop("adapter")]
        r.update(trainable=e["trainable"], loss=e["loss"], task=e["task"], items=e["items"])

    print("\n| setup | state_lr | trainable | held-out loss (mean, range) | task score (mean, range) |")
    print("|---|---|---|---|---|")
    keys = sorted({(r["setup"], r["state_lr"]) for r in runs}, key=lambda k: (args.setups.index(k[0]), k[1] or 0))
    for setup, rate in keys:
        group = [r for r in runs if (r["setup"], r["state_lr"]) == (setup, rate)]
        loss, task = [r["loss"] for r in group], [r["task"] * r["items"] for r in group]
        print(f"| {setup} | {rate if rate is not None else '-'} | {group[0]['trainable']:,} | "
              f"{statistics.mean(loss):.2f} ({min(loss):.2f}-{max(loss):.2f}) | "
              f"{statistics.mean(task):.1f}/{group[0]['items']} ({min(task):.0f}-{max(task):.0f}) |")
    Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
