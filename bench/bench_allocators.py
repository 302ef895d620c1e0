"""CPU training speed and peak RSS under each malloc: glibc's (as it comes, with the trainer's
compact setting, with tunables), jemalloc, tcmalloc and mimalloc with their own settings for
giving memory back. LoRA r=32 on the RWKV-7 0.1B shape, ctx 512, batch 1, fp32.

    python bench/bench_allocators.py [--steps 4] [--rounds 2] [--grad_cp 0 1] [--threads N] [--only NAME ...]

CPU s a step is the process's user + system time over the steps after the first (read from
/proc while it runs), a measure that load from other processes disturbs far less than the wall
time; its ratio is the fast mode's over the row's (higher: faster). CPU s is the whole
process's, start-up included. Every setting is the real train.py (one process, ZeRO-1) started with --cpu_malloc default
(the trainer then leaves malloc alone) and its allocator in the environment: LD_PRELOAD with
the Debian library (libjemalloc2, libtcmalloc-minimal4, libmimalloc2.0; a missing one is
skipped) and its variables. 'glibc compact' is train.py's own --cpu_malloc compact.
The settings run in turn, --rounds times over; tokens/s is ctx / the median step time after
the first step, peak RSS is the process's ru_maxrss (os.wait4), and each row's speed is a
ratio to the fast mode ('glibc default', --grad_cp 0) of the same round, so that load from
other processes cancels as far as it can. Losses must be the same in every setting.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_train_cpu import write_workspace  # noqa: E402
from rwkv_peft.train.allocator import GUARD  # noqa: E402
from tiny_workspace import clean_env  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
LIBS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4", "mimalloc": "libmimalloc.so.2"}

# name -> (train.py's --cpu_malloc, library to preload or None, extra environment)
SETTINGS = {
    "glibc default": ("default", None, {}),
    "glibc compact": ("compact", None, {}),
    "glibc mmap 1M+trim 0": ("default", None, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576:"
                                                                  "glibc.malloc.trim_threshold=0"}),
    "glibc mmap 64M, arena 1": ("default", None, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=67108864:"
                                                                     "glibc.malloc.arena_max=1"}),
    "jemalloc default": ("default", "jemalloc", {}),
    "jemalloc decay 1s": ("default", "jemalloc", {"MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:0"}),
    "jemalloc decay 1s, bg": ("default", "jemalloc", {"MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,"
                                                                   "muzzy_decay_ms:0"}),
    "jemalloc decay 0": ("default", "jemalloc", {"MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}),
    # blocks of 8 MB and more (the logits, the head's gradient) go to an arena that purges at once
    # unless oversize_threshold:0 turns that arena off
    "jemalloc decay 1s, one arena for all sizes": ("default", "jemalloc", {
        "MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:1000,muzzy_decay_ms:0"}),
    "jemalloc decay 1s, bg, one arena for all sizes": ("default", "jemalloc", {
        "MALLOC_CONF": "oversize_threshold:0,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"}),
    "jemalloc decay 1s, 1 arena": ("default", "jemalloc", {"MALLOC_CONF": "narenas:1,dirty_decay_ms:1000,"
                                                                        "muzzy_decay_ms:0"}),
    "tcmalloc default": ("default", "tcmalloc", {}),
    "tcmalloc release 10": ("default", "tcmalloc", {"TCMALLOC_RELEASE_RATE": "10"}),
    "tcmalloc aggressive": ("default", "tcmalloc", {"TCMALLOC_AGGRESSIVE_DECOMMIT": "true"}),
    "mimalloc default": ("default", "mimalloc", {}),
}


def library(name: str) -> str | None:
    """The allocator's file name when the dynamic linker knows it (ldconfig's cache; jemalloc cannot
    be loaded late to check, its thread-local storage must be set up at start), else None."""
    return LIBS[name] if ctypes.util.find_library(LIBS[name].split(".")[0][3:]) == LIBS[name] else None


def run(work: Path, args, run_dir: str, grad_cp: int, name: str) -> dict:
    cpu_malloc, lib, extra = SETTINGS[name]
    env = {k: v for k, v in clean_env().items()
           if not k.startswith(("MALLOC_", "TCMALLOC_", "MIMALLOC_")) and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    env |= extra | ({"LD_PRELOAD": library(lib)} if lib else {})
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env[GUARD] = "glibc"  # the trainer's own choice of malloc stays out of the way (allocator.py)
    cmd = [sys.executable, str(ROOT / "train.py"), "--load_model", "base.pth", "--data_file", "text.jsonl",
           "--ctx_len", str(args.ctx), "--micro_bsz", "1", "--max_steps", str(args.steps), "--precision", "fp32",
           "--peft", "lora", "--lora_r", "32", "--lora_alpha", "32", "--proj_dir", run_dir,
           "--grad_cp", str(grad_cp), "--cpu_malloc", cpu_malloc]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    metrics, marks = work / run_dir / "metrics.jsonl", {}  # steps done -> the process's CPU seconds then
    while True:
        try:
            stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        except (FileNotFoundError, ProcessLookupError):
            break
        if stat[0] == "Z":  # exited, not yet reaped
            break
        marks.setdefault(done, (int(stat[11]) + int(stat[12])) / TICKS)  # utime + stime
        time.sleep(0.05)
    reader.join()
    err = err[0]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"train.py ({name}, --grad_cp {grad_cp}) failed:\n{err.decode()[-3000:]}")
    records = [json.loads(x) for x in (work / run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    step_s = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:]))
    last = max(marks)
    steps_cpu = (marks[last] - marks[1]) / (last - 1) if 1 in marks and last > 1 else float("nan")
    return {"tokens_s": args.ctx / step_s, "step_cpu_s": steps_cpu, "peak_mb": usage.ru_maxrss / 1024,
            "sys_s": usage.ru_stime, "cpu_s": usage.ru_utime + usage.ru_stime,
            "faults_k": usage.ru_minflt / 1000, "losses": [r["loss"] for r in records]}


def spread(xs: list[float], fmt: str) -> str:
    return format(xs[0], fmt) if len(xs) == 1 else f"{format(min(xs), fmt)}-{format(max(xs), fmt)}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--grad_cp", type=int, nargs="+", default=[0, 1], choices=(0, 1))
    p.add_argument("--fast_too", nargs="+", choices=SETTINGS, metavar="NAME",
                   help="with --grad_cp 0 1: only these settings also run with --grad_cp 0 (default: all)")
    p.add_argument("--threads", type=int, help="torch's CPU threads in train.py (default: torch's choice); 1 "
                                                "keeps timings steadier on a loaded machine")
    p.add_argument("--only", nargs="+", choices=SETTINGS, metavar="NAME",
                   help="these settings only ('glibc default' always runs: the reference)")
    args = p.parse_args()

    names = [n for n in SETTINGS if (not args.only or n in args.only or n == "glibc default")
             and (SETTINGS[n][1] is None or library(SETTINGS[n][1]))]
    missing = [n for n in SETTINGS if SETTINGS[n][1] and not library(SETTINGS[n][1])]
    cases = [("glibc default", 0)] + [(n, cp) for cp in args.grad_cp for n in names if (n, cp) != ("glibc default", 0)
                                      and (cp == 1 or not args.fast_too or n in args.fast_too)]
    print(f"RWKV-7 L{args.layers} C{args.width} V65536, LoRA r=32, ctx {args.ctx}, batch 1, fp32, {args.steps} steps, "
          f"{args.rounds} rounds, {args.threads or 'default'} threads; load average {os.getloadavg()[0]:.1f}"
          + (f"; not installed: {', '.join(missing)}" if missing else ""), flush=True)
    results = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="bench-alloc-") as tmp:
        work = Path(tmp)
        write_workspace(work, args.layers, args.width, dims=(64, 64, 32, 128), records=64, words=args.ctx)
        for r in range(args.rounds):
            for i, (name, cp) in enumerate(cases):
                t0 = time.monotonic()
                results[(name, cp)].append(run(work, args, f"run-{r}-{i}", cp, name))
                x = results[(name, cp)][-1]
                print(f"  round {r + 1}: {name}, --grad_cp {cp}: {x['tokens_s']:.1f} tokens/s, "
                      f"{x['step_cpu_s']:.2f} CPU s a step, "
                      f"{x['peak_mb']:.0f} MB ({time.monotonic() - t0:.0f} s, load {os.getloadavg()[0]:.1f})",
                      flush=True)
    fast = results[("glibc default", 0)]
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    print("| malloc | --grad_cp | tokens/s | vs fast mode (same round) | CPU s a step | vs fast mode (CPU) "
          "| peak RSS MB | CPU s (user + system) | system s | minor faults (k) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, cp), xs in results.items():
        ratios = [x["tokens_s"] / f["tokens_s"] for x, f in zip(xs, fast)]
        cpu_ratios = [f["step_cpu_s"] / x["step_cpu_s"] for x, f in zip(xs, fast)]
        print(f"| {name} | {cp} | {spread([x['tokens_s'] for x in xs], '.0f')} | {spread(ratios, '.2f')}x "
              f"| {spread([x['step_cpu_s'] for x in xs], '.2f')} | {spread(cpu_ratios, '.2f')}x "
              f"| {spread([x['peak_mb'] for x in xs], '.0f')} | {spread([x['cpu_s'] for x in xs], '.0f')} "
              f"| {spread([x['sys_s'] for x in xs], '.0f')} "
              f"| {spread([x['faults_k'] for x in xs], '.0f')} |")
    same = all(x["losses"] == fast[0]["losses"] for xs in results.values() for x in xs)
    print(f"\nloss sequences identical in every run: {same}")


if __name__ == "__main__":
    main()
