"""--grad_cp / --cpu_malloc auto against the fast setting: LoRA r=32 on the RWKV-7 0.1B shape,
ctx 512, batch 1, fp32, the real train.py (one process, ZeRO-1).

    python bench/bench_memory_auto.py [--steps 5] [--rounds 3] [--json out.json]

Settings, in turn for --rounds rounds (interleaved: the machine's load drifts):
  fast      --grad_cp 0 --cpu_malloc default
  default   no memory flag: auto decides from the memory free
  capped    --max_memory 2.5G: auto decides within 2.5 GiB
For each run: tokens/s over the steps after the first (from metrics.jsonl), peak RSS
(summary.json: ru_maxrss) and the line in which train.py says what it chose.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_train_cpu import write_workspace  # noqa: E402
from tiny_workspace import clean_env  # noqa: E402

SETTINGS = {"fast": ["--grad_cp", "0", "--cpu_malloc", "default"], "default": [],
            "capped": ["--max_memory", "2.5G"]}


def run(work: Path, args, name: str, flags: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--load_model", "base.pth", "--data_file", "text.jsonl",
           "--ctx_len", str(args.ctx), "--micro_bsz", "1", "--max_steps", str(args.steps), "--precision", "fp32",
           "--peft", "lora", "--lora_r", "32", "--lora_alpha", "32", "--proj_dir", name, *flags]
    env = {k: v for k, v in clean_env().items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"train.py failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if "est. peak" in x)
    records = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    step_s = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:]))
    peak = json.loads((work / name / "summary.json").read_text())["peak_memory_mb"]
    return {"tokens_per_s": args.ctx / step_s, "peak_rss_mb": peak, "chosen": line,
            "losses": [r["loss"] for r in records]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        work = Path(tmp)
        write_workspace(work, 12, 768, dims=(64, 64, 32, 128), records=64, words=args.ctx)
        for r in range(args.rounds):
            for name, flags in SETTINGS.items():
                out = run(work, args, f"{name}-{r}", flags)
                results[name].append(out)
                print(f"round {r + 1} {name}: {out['tokens_per_s']:.0f} tokens/s, peak RSS {out['peak_rss_mb']:.0f} MB"
                      f" | {out['chosen']} (load average {os.getloadavg()[0]:.1f})", flush=True)
    print("\n| setting | tokens/s per round | vs fast, same round | peak RSS MB | chosen |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        speed = ", ".join(f"{x['tokens_per_s']:.0f}" for x in rows)
        ratios = ", ".join(f"{x['tokens_per_s'] / f['tokens_per_s']:.2f}x" for x, f in zip(rows, results["fast"]))
        peaks = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in rows)
        print(f"| {name} {' '.join(SETTINGS[name])} | {speed} | {ratios} | {peaks} | {rows[0]['chosen']} |")
    same = all(x["losses"] == results["fast"][0]["losses"] for rows in results.values() for x in rows)
    print(f"\nloss sequences identical across settings: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
