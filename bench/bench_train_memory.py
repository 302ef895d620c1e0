"""Where the peak RSS of CPU training goes: LoRA r=32 on the RWKV-7 0.1B shape, ctx 512, batch 1, fp32.

    python bench/bench_train_memory.py [--steps 3] [--ctx 512] [--grad_cp 0 1] [--malloc compact default]

Two parts, one run:
  1. the real train.py (one process, ZeRO-1, fp32) for --steps steps, with the defaults a user
     gets and then once per setting (--grad_cp x --malloc), in turn: its peak RSS (summary.json), its loss sequence
     (metrics.jsonl: the same in every setting) and the median time of the steps after the
     first. --malloc compact / default is train.py's --cpu_malloc (rwkv_peft/train/cpu_memory.py);
     NAME=VALUE puts that variable in train.py's environment instead (then the trainer leaves
     malloc alone), e.g. MALLOC_MMAP_THRESHOLD_=1048576;
  2. the same model and step in this process, without DeepSpeed: the weights, the
     activations autograd keeps (saved_tensors_hooks), the logits, and the peak of the loss
     and the whole backward (VmHWM, reset through /proc/self/clear_refs, above the resident
     set after the forward). Skip it with --no-breakdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_train_cpu import write_workspace  # noqa: E402
from tiny_workspace import clean_env  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _status_mb(pid: int) -> dict:
    """VmRSS and its anonymous / file-backed parts (a memory-mapped checkpoint is file-backed), MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def setting(grad_cp: int | None, malloc: str | None) -> tuple[list[str], dict]:
    """train.py's extra flags and environment for one setting (None: the user's default)."""
    flags = [] if grad_cp is None else ["--grad_cp", str(grad_cp)]
    env = {k: v for k, v in clean_env().items() if not k.startswith("MALLOC_")}
    if malloc and "=" in malloc:
        name, value = malloc.split("=", 1)
        env[name] = value
    elif malloc:
        flags += ["--cpu_malloc", malloc]
    return flags, env


def run_train_py(work: Path, args, run_dir: str, flags: list[str], env: dict) -> dict:
    """train.py with its resident set sampled every 50 ms: the peak before the first step
    (start-up: load, adapters, DeepSpeed, data) and during the steps, from the outside."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--load_model", "base.pth", "--data_file", "text.jsonl",
           "--ctx_len", str(args.ctx), "--micro_bsz", "1", "--max_steps", str(args.steps), "--precision", "fp32",
           "--peft", "lora", "--lora_r", "32", "--lora_alpha", "32", "--proj_dir", run_dir, *flags]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []  # (time, stdout line): "training N steps" marks the end of start-up
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), x) for x in proc.stdout))
    reader.start()
    err = []
    threading.Thread(target=lambda: err.extend(proc.stderr)).start()
    samples = []
    while proc.poll() is None:
        try:
            status = _status_mb(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        if "VmRSS" in status:  # (not while the process exits)
            samples.append((time.monotonic(), status))
        time.sleep(0.05)
    proc.wait()
    reader.join()
    if proc.returncode:
        sys.exit(f"train.py failed:\n{''.join(err)[-3000:]}")
    start_steps = next(t for t, x in lines if x.startswith("training "))
    startup = [m for t, m in samples if t < start_steps]
    steps = [m for t, m in samples if t >= start_steps]
    peak = lambda ms: max(ms, key=lambda m: m["VmRSS"])  # noqa: E731
    summary = json.loads((work / run_dir / "summary.json").read_text())
    records = [json.loads(x) for x in (work / run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    step_s = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:])) if len(elapsed) > 1 else float("nan")
    return {"peak_rss_mb": summary["peak_memory_mb"], "losses": [r["loss"] for r in records],
            "startup": peak(startup), "steps": peak(steps), "step_s": step_s}


def breakdown(work: Path, args) -> list[tuple[str, float]]:
    """(part of a training step, MB): sizes counted from tensors, and the loss's peak from the RSS."""
    from rwkv_peft import load_model
    from rwkv_peft.peft.adapt import attach_adapters, plan_adapters
    from rwkv_peft.loss import masked_loss

    model = load_model(str(work / "base.pth"), dtype=torch.float32)
    attach_adapters(model, plan_adapters(model, [], ("lora", {"r": 32, "alpha": 32})))
    model.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.randint(0, 65536, (1, args.ctx + 1), generator=torch.Generator().manual_seed(0))
    x, y, mask = tokens[:, :-1], tokens[:, 1:], torch.ones(1, args.ctx)

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # storage -> bytes of what autograd keeps for backward (weights excluded)

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        hidden = model.ln_out(_blocks(model, x))
    activations = sum(saved.values())
    logits = model.head(hidden)
    resident = rss_mb()
    reset_peak()
    loss = masked_loss(logits, y, mask)
    loss.backward()
    loss_peak = rss_mb("VmHWM") - resident
    mb = 2 ** 20
    return [("fp32 weights (LoRA r=32 attached)", weights / mb),
            ("activations the 12 blocks keep for backward", activations / mb),
            ("logits [ctx, 65536] fp32", logits.numel() * 4 / mb),
            ("loss + the whole backward: peak above the resident set after the forward", loss_peak)]


def _blocks(model, tokens):
    """The blocks' forward (the model's own loop, without the head)."""
    h = model.emb(tokens)
    v_first = None
    for block in model.blocks:
        h, v_first, _ = block(h, v_first)
    return h


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--grad_cp", type=int, nargs="*", default=[], choices=(0, 1),
                   help="train.py's --grad_cp values to run besides the defaults (1: recompute each block)")
    p.add_argument("--malloc", nargs="+", default=["compact", "default"],
                   help="train.py's --cpu_malloc values to run (compact, default), or NAME=VALUE: that "
                        "variable in train.py's environment, e.g. MALLOC_MMAP_THRESHOLD_=1048576")
    p.add_argument("--skip-train", action="store_true", help="only the in-process breakdown")
    p.add_argument("--no-breakdown", action="store_true", help="only the train.py runs")
    args = p.parse_args()

    print(f"RWKV-7 L{args.layers} C{args.width} V65536, LoRA r=32, ctx {args.ctx}, batch 1, fp32, "
          f"load average {os.getloadavg()[0]:.1f}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        work = Path(tmp)
        write_workspace(work, args.layers, args.width, dims=(64, 64, 32, 128), records=64, words=args.ctx)
        if not args.skip_train:
            settings = [(None, None)] + [(cp, m) for cp in args.grad_cp for m in args.malloc]
            runs = {(cp, m): run_train_py(work, args, f"run-{i}", *setting(cp, m))
                    for i, (cp, m) in enumerate(settings)}
            first = next(iter(runs.values()))
            print(f"train.py, {args.steps} steps (load average now {os.getloadavg()[0]:.1f})\n")
            print("| --grad_cp | malloc | peak RSS MB (ru_maxrss) | peak in start-up MB (anon / file) "
                  "| peak in steps MB (anon / file) | step s (median) | vs first row | losses |")
            print("|---:|---|---:|---:|---:|---:|---:|---|")
            for (cp, m), r in runs.items():
                up, st = r["startup"], r["steps"]
                cp, m = ("(default)", "(default)") if cp is None else (cp, m)
                print(f"| {cp} | {m} | {r['peak_rss_mb']:.0f} | {up['VmRSS']:.0f} ({up['RssAnon']:.0f} / "
                      f"{up['RssFile']:.0f}) | {st['VmRSS']:.0f} ({st['RssAnon']:.0f} / {st['RssFile']:.0f}) | "
                      f"{r['step_s']:.2f} | {r['step_s'] / first['step_s']:.2f}x | "
                      f"{', '.join(str(x) for x in r['losses'])} |")
            same = all(r["losses"] == first["losses"] for r in runs.values())
            print(f"\nloss sequences identical across settings: {same}\n", flush=True)
        if not args.no_breakdown:
            rows = breakdown(work, args)
            print("| one training step, in this process (no DeepSpeed) | MB |")
            print("|---|---:|")
            for name, mb in rows:
                print(f"| {name} | {mb:.0f} |")


if __name__ == "__main__":
    main()
