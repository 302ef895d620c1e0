"""Registers, spills and shared memory of every WKV kernel per GPU architecture, from ptxas.

    python bench/ptxas_resources.py                  # markdown table of the bf16 kernels
    python bench/ptxas_resources.py --json out.json  # every kernel and dtype

Compiles cuda/wkv7.cu and cuda/wkv6.cu with the extension's nvcc flags (rwkv_peft.model.
wkv_cuda._build_flags) and -Xptxas -v, once per head size with one -gencode per
architecture, two compiles at a time, and parses what ptxas prints for each kernel. No GPU
needed; about 30 s of CPU per file and head size. tests/test_cuda_checks.py checks the
shared memory against each architecture's opt-in limit with it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_peft.model import wkv_cuda  # noqa: E402

ARCHS = (75, 80, 86, 89, 90, 100, 120)
HEAD_SIZES = (32, 64, 128)
# Dynamic shared memory a block may opt in to, bytes (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability": 64 KB on 7.5; 163 KB on 8.0 and 8.7; 99 KB on 8.6,
# 8.9 and 12.0; 227 KB on 9.0 and 10.0).
OPTIN_LIMIT = {75: 64 << 10, 80: 163 << 10, 86: 99 << 10, 87: 163 << 10, 89: 99 << 10, 90: 227 << 10,
               100: 227 << 10, 120: 99 << 10}
DTYPES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}


def supported_archs(nvcc: str) -> tuple[list[int], list[int]]:
    """(ARCHS this nvcc compiles for, those it does not)."""
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    known = {int(a) for a in re.findall(r"compute_(\d+)", out)}
    return [a for a in ARCHS if a in known], [a for a in ARCHS if a not in known]


def compile_command(nvcc: str, source: Path, head_size: int, archs: list[int], out: Path) -> list[str]:
    _, flags = wkv_cuda._build_flags(archs[0], head_size, None)
    flags = [f for f in flags if "arch=" not in f] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [nvcc, "-c", "-std=c++17", *flags, "-Xptxas", "-v", f"-I{source.parent}", str(source), "-o", str(out)]


def parse(ptxas: str, head_size: int) -> list[dict]:
    """One row per (kernel, dtype, arch) from ptxas -v's output."""
    rows, row = [], None
    for line in ptxas.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            name = re.search(r"(wkv[67]_(?:forward|backward))_kernelI(\w+?)Li\d+E", m.group(1))
            row = {"kernel": name.group(1), "dtype": DTYPES[name.group(2)], "arch": int(m.group(2)),
                   "head_size": head_size}
            rows.append(row)
            continue
        if row is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            row["stack"], row["spill_stores"], row["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            row["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            row["static_smem"] = int(m.group(1)) if m else 0
    return rows


def resources(nvcc: str, out_dir: Path, head_sizes=HEAD_SIZES, archs=None, jobs: int = 2) -> list[dict]:
    """Rows for every kernel, dtype, architecture and head size, with the dynamic shared
    memory each launch asks for (wkv_cuda.shared_memory_bytes) beside ptxas's figures."""
    archs = archs or supported_archs(nvcc)[0]
    jobs_list = [(src, n) for n in head_sizes for src in ("wkv7.cu", "wkv6.cu")]

    def run(job):
        src, n = job
        cmd = compile_command(nvcc, wkv_cuda.CUDA_DIR / src, n, archs, out_dir / f"{src}.n{n}.o")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return parse(done.stderr + done.stdout, n)

    with ThreadPoolExecutor(jobs) as pool:
        rows = [row for part in pool.map(run, jobs_list) for row in part]
    for row in rows:
        version = int(row["kernel"][3])
        row["dynamic_smem"] = wkv_cuda.shared_memory_bytes(version, row["head_size"])[row["kernel"].split("_")[1]]
    return rows


def markdown(rows: list[dict], dtype: str = "bf16") -> str:
    """registers / spill stores (bytes) per kernel and head size (rows) and arch (columns)."""
    archs = sorted({r["arch"] for r in rows})
    lines = ["| kernel | N | " + " | ".join(f"sm_{a}" for a in archs) + " |", "|---|---:|" + "---:|" * len(archs)]
    by = {(r["kernel"], r["head_size"], r["arch"]): r for r in rows if r["dtype"] == dtype}
    for kernel in ("wkv7_forward", "wkv7_backward", "wkv6_forward", "wkv6_backward"):
        for n in sorted({r["head_size"] for r in rows}):
            cells = [f"{by[kernel, n, a]['registers']} / {by[kernel, n, a]['spill_stores']}" for a in archs]
            lines.append(f"| {kernel} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write every row here")
    p.add_argument("--head-sizes", default="32,64,128", help="comma list (default: %(default)s)")
    args = p.parse_args(argv)
    nvcc = wkv_cuda._nvcc()
    if nvcc is None:
        print("error: nvcc not found (install the CUDA toolkit or set CUDA_HOME)", file=sys.stderr)
        return 2
    archs, missing = supported_archs(nvcc)
    with tempfile.TemporaryDirectory() as tmp:
        rows = resources(nvcc, Path(tmp), [int(n) for n in args.head_sizes.split(",")], archs)
    print(f"registers / spill stores in bytes per thread, bf16 kernels, {Path(nvcc).resolve()}"
          + (f" (cannot compile for sm_{', sm_'.join(map(str, missing))})" if missing else ""))
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
