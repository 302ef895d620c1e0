"""Where the chunked WKV forward spends its time, next to what these cores reach on matmuls.

    python bench/profile_wkv.py [--version 7] [--B 1] [--T 512] [--H 16]

Prints the fp32 matmul throughput of square products (the ceiling of any matmul-shaped
arrangement), the chunked forward's time under torch.no_grad(), and a torch.profiler table
of its ops (self CPU time). N = 64, inputs as in bench_wkv.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_wkv import make_inputs  # noqa: E402

from rwkv_peft.model.wkv import wkv6_chunked, wkv7_chunked  # noqa: E402


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", type=int, choices=(7, 6), default=7)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n in (256, 512, 1024):
        x, y = torch.randn(n, n), torch.randn(n, n)
        ms = best_ms(lambda: x @ y, args.repeats)
        print(f"matmul {n}x{n} fp32: {2 * n ** 3 / ms / 1e6:.1f} GFLOP/s")

    fn = wkv7_chunked if args.version == 7 else wkv6_chunked
    inputs = make_inputs(args.version, args.B, args.T, args.H)
    with torch.no_grad():
        ms = best_ms(lambda: fn(*inputs), args.repeats)
        print(f"\nwkv{args.version}_chunked forward, B={args.B} T={args.T} H={args.H} N=64: {ms:.1f} ms (best of "
              f"{args.repeats})\n")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                fn(*inputs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
