"""SIGKILL a training run at random moments, then check what survives and that --resume
continues with the loss sequence of an uninterrupted run.

    python bench/kill_resume.py [--trials 10] [--steps 12] [--seed 0]

Per trial: start train.py (checkpoint every step), kill -9 it at a random moment of its
training loop, then
check that 'latest' names a complete checkpoint and that every surviving checkpoint's files
load (weights_only), resume (or start over if nothing was saved yet) and compare the final
metrics with the uninterrupted run's. Prints a markdown table.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from rwkv_peft.train.engine import weights_only_load  # noqa: E402
from tiny_workspace import COMMON, clean_env, losses, make_workspace  # noqa: E402


def start(work, run, steps, resume=False):
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, "--peft", "lora", "--lora_dropout", "0.1",
           "--micro_bsz", "2", "--max_steps", str(steps), "--save_every", "1", "--keep_last", "3",
           "--proj_dir", run] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, cwd=work, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def check_survivors(run: Path) -> tuple[str, int]:
    """'latest' names a complete checkpoint; every complete checkpoint's files load."""
    root = run / "checkpoints"
    if not (root / "latest").exists():
        return "none", 0
    latest = (root / "latest").read_text()
    assert (root / latest / "trainer.json").exists(), f"latest names incomplete {latest}"
    complete = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-")]
    for d in complete:
        json.loads((d / "trainer.json").read_text())
        for f in d.glob("*.pt"):
            weights_only_load(f)
    return latest, len(complete)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = make_workspace(Path(tempfile.mkdtemp(prefix="kill-resume-")))

    t0 = time.perf_counter()
    ref = start(work, "reference", args.steps)
    assert ref.wait() == 0, ref.stderr.read()
    full_time = time.perf_counter() - t0
    reference = losses(work / "reference")
    loop_time = json.loads((work / "reference/summary.json").read_text())["time_s"]
    print(f"uninterrupted run: {args.steps} steps in {full_time:.1f} s, {loop_time:.1f} s of them training\n")
    print("| trial | killed after (s of training) | latest at kill | complete checkpoints | resumed | same losses |")
    print("|---|---|---|---|---|---|")
    failures = 0
    for trial in range(args.trials):
        run = f"trial-{trial}"
        proc = start(work, run, args.steps)
        while not (work / run / "metrics.jsonl").exists() and proc.poll() is None:
            time.sleep(0.05)  # the kill lands inside the training loop, where checkpoints are written
        delay = rng.uniform(0.0, loop_time)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        latest, complete = check_survivors(work / run)
        resumed = start(work, run, args.steps, resume=latest != "none")
        ok_run = resumed.wait() == 0
        same = ok_run and losses(work / run) == reference
        failures += not same
        print(f"| {trial} | {delay:.1f} | {latest} | {complete} | {'yes' if latest != 'none' else 'started over'}"
              f"{'' if ok_run else ' (FAILED: ' + resumed.stderr.read()[-200:] + ')'} | {'yes' if same else 'NO'} |")
    print(f"\n{args.trials - failures}/{args.trials} trials continued with the uninterrupted loss sequence")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
