"""Benchmark: chunked WKV vs the per-token loop (rwkv_peft.model.wkv), fp32 on CPU.

    python bench/bench_wkv.py                 # full grid
    python bench/bench_wkv.py --quick         # smaller grid
    python bench/bench_wkv.py --json out.json # also write the results as JSON

For every (version, B, T, H) with N = 64 it times, in the same run and interleaved
(loop, chunked, loop, chunked, ...) so that background load hits both alike:

* ``fwd``: forward only, under ``torch.no_grad()``;
* ``fwd+bwd``: forward and backward of a fixed random projection of (y, state), all
  inputs requiring grad.

Each timing is the median of several runs; the correctness run before them (whose
results give the diffs) is the warm-up.  The speed-up is
loop / chunked.  "max abs diff" compares chunked against loop: y and the final state for
``fwd``, every input gradient for ``fwd+bwd``; "max rel diff" divides it by the largest magnitude of
the loop's values.  Threads are left at torch's default unless --threads is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rwkv_peft.model.wkv import (  # noqa: E402
    WKV6_CHUNK_LEN,
    WKV7_CHUNK_LEN,
    wkv6_chunked,
    wkv6_sequential,
    wkv7_chunked,
    wkv7_sequential,
)

N = 64


def make_inputs(version: int, B: int, T: int, H: int, seed: int = 0) -> list[torch.Tensor]:
    """Realistic fp32 inputs (as the models produce them)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return torch.randn(B, T, H, N, generator=g) * scale

    r, k, v = rnd(), rnd(), rnd()
    if version == 7:
        w = -F.softplus(-rnd(2.0) + 0.5) - 0.5  # w <= -0.5
        kk = F.normalize(rnd(), dim=-1)
        a, b = -kk, kk * torch.sigmoid(rnd(2.0))
        return [r, w, k, v, a, b]
    w = torch.rand(B, T, H, N, generator=g) * 10.0 - 8.0  # decays from ~1 to ~6e-4
    u = torch.randn(H, N, generator=g) * 0.5
    return [r, w, k, v, u]


def _time_pair(fns, warmup: int, min_runs: int, budget_s: float) -> list[list[float]]:
    """Wall times (ms) of each fn, runs interleaved; >= min_runs runs each, more (up
    to 9) while the pair costs less than budget_s in total."""
    for f in fns:
        for _ in range(warmup):
            f()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while True:
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        n = len(times[0])
        if n >= 9 or (n >= min_runs and time.perf_counter() - start > budget_s):
            break
    return [[t * 1e3 for t in ts] for ts in times]


def _timing(name: str, loop_ts: list[float], chk_ts: list[float]) -> dict:
    return dict(
        loop_ms=statistics.median(loop_ts),
        chunked_ms=statistics.median(chk_ts),
        loop_ms_all=loop_ts,
        chunked_ms_all=chk_ts,
        mode=name,
    )


def bench_case(version: int, B: int, T: int, H: int, min_runs: int, budget_s: float) -> list[dict]:
    seq, chk = (wkv7_sequential, wkv7_chunked) if version == 7 else (wkv6_sequential, wkv6_chunked)
    x = make_inputs(version, B, T, H)
    rows = []

    # forward only
    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(*x)

        return run

    y_loop, s_loop = fwd(seq)()
    y_chk, s_chk = fwd(chk)()
    diff = max((y_chk - y_loop).abs().max().item(), (s_chk - s_loop).abs().max().item())
    ref = max(y_loop.abs().max().item(), s_loop.abs().max().item())
    t_loop, t_chk = _time_pair([fwd(seq), fwd(chk)], 0, min_runs, budget_s)
    rows.append(dict(_timing("fwd", t_loop, t_chk), max_abs_diff=diff, ref_max=ref))

    # forward + backward
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(B, T, H, N, generator=g)
    gs = torch.randn(B, H, N, N, generator=g)
    xg = [t.clone().requires_grad_() for t in x]

    def fwd_bwd(fn):
        def run():
            for t in xg:
                t.grad = None
            y, s = fn(*xg)
            torch.autograd.backward([y, s], [gy, gs])
            return [t.grad.clone() for t in xg]

        return run

    g_loop = fwd_bwd(seq)()
    g_chk = fwd_bwd(chk)()
    diff = max((a - b).abs().max().item() for a, b in zip(g_chk, g_loop))
    ref = max(b.abs().max().item() for b in g_loop)
    t_loop, t_chk = _time_pair([fwd_bwd(seq), fwd_bwd(chk)], 0, min_runs, budget_s)
    rows.append(dict(_timing("fwd+bwd", t_loop, t_chk), max_abs_diff=diff, ref_max=ref))

    for row in rows:
        row.update(version=version, B=B, T=T, H=H, N=N, speedup=row["loop_ms"] / row["chunked_ms"])
        row["max_rel_diff"] = row["max_abs_diff"] / max(row["ref_max"], 1e-30)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| version | B | T | H | pass | loop ms | chunked ms | speed-up | max abs diff | max rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| RWKV-{r['version']} | {r['B']} | {r['T']} | {r['H']} | {r['mode']} "
            f"| {r['loop_ms']:.1f} | {r['chunked_ms']:.1f} | {r['speedup']:.1f}x "
            f"| {r['max_abs_diff']:.1e} | {r['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller grid: B=1, T=512, H in {4, 16}")
    ap.add_argument("--json", metavar="PATH", help="write results (and run metadata) as JSON")
    ap.add_argument("--versions", default="7,6", help="comma-separated subset of 7,6")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    ap.add_argument("--min-runs", type=int, default=3, help="timed runs per measurement, at least")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per measurement before stopping at min-runs")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    versions = [int(v) for v in args.versions.split(",")]
    if args.quick:
        grid = [(B, T, H) for B in (1,) for T in (512,) for H in (4, 16)]
    else:
        grid = [(B, T, H) for B in (1, 4) for T in (512, 1024, 2048) for H in (4, 16)]

    meta = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        loadavg_start=os.getloadavg(),
        chunk_len={7: WKV7_CHUNK_LEN, 6: WKV6_CHUNK_LEN},
        command="python " + " ".join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)),
    )
    print(f"torch {meta['torch']}, {meta['threads']} threads, N={N}, fp32, "
          f"chunk_len v7={WKV7_CHUNK_LEN} v6={WKV6_CHUNK_LEN}, load avg {meta['loadavg_start'][0]:.2f}",
          flush=True)
    rows = []
    t_start = time.perf_counter()
    for version in versions:
        for B, T, H in grid:
            new = bench_case(version, B, T, H, args.min_runs, args.budget)
            rows += new
            for r in new:
                print(f"  RWKV-{version} B={B} T={T} H={H} {r['mode']:>7}: loop {r['loop_ms']:9.1f} ms, "
                      f"chunked {r['chunked_ms']:8.1f} ms, {r['speedup']:5.1f}x, "
                      f"max abs diff {r['max_abs_diff']:.1e}", flush=True)
    meta["loadavg_end"] = os.getloadavg()
    meta["total_s"] = time.perf_counter() - t_start
    print()
    print(markdown_table(rows))
    print(f"\nload avg start {meta['loadavg_start'][0]:.2f}, end {meta['loadavg_end'][0]:.2f}; "
          f"total {meta['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
