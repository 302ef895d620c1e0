"""A quantized frozen base (--quant, issue 13): bytes, memory, quality.

    python bench/bench_quant.py bytes                 # frozen bytes of the adapted layers, 0.4B/1.5B/7B shapes
    python bench/bench_quant.py load                  # peak RAM of loading a 1.5B-shaped bf16 file
    python bench/bench_quant.py train [--ctx 512]     # peak RSS of 3 train.py steps, 1.5B shape, nf4 vs none
    python bench/bench_quant.py train --shape small   # the same on a 0.1B-shaped model (48M adapted weights)
    python bench/bench_quant.py quality [--seeds 0 1 2]   # the demo task, Bone r=64, nf4 vs none

bytes: one block's real quantized tensors (QuantizedWeight, i.e. torchao's) for the six adapted
  RWKV-7 layers, times the layer count, against the same weights in bf16.
load and train share one random 1.5B-shaped RWKV-7 in the official layout (L24, C2048, World
  vocabulary), written once as bf16 to --work. Each measurement is its own process; peak RSS is
  the kernel's VmHWM (ru_maxrss for train.py's own summary), which counts the memory-mapped
  checkpoint's resident pages too.
quality: the real train.py on the embedded demo (its defaults: 1 epoch, lr 1e-3) with
  --random_seed, then one rwkv_peft.eval call over every adapter: held-out loss and task score
  of the full-precision base + adapter (what a merge gives).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_state_tuning import eval_adapters  # noqa: E402
from rwkv_peft.peft.quant import QuantizedWeight  # noqa: E402
from tiny_workspace import clean_env  # noqa: E402

SHAPES = {"0.4B": (24, 1024), "1.5B": (24, 2048), "7B": (32, 4096)}  # RWKV-7 (layers, width)
TRAIN_SHAPES = {"1.5B": (24, 2048), "small": (12, 576)}  # small: 48M weights under the adapters
GOALS = {"nf4": 0.3, "int8": 0.55}  # the ceilings, as a fraction of bf16


def adapted_shapes(C: int) -> list[tuple[int, int]]:
    """The [out, in] weights of one RWKV-7 block's default adapter targets."""
    return [(C, C)] * 4 + [(4 * C, C), (C, 4 * C)]


def frozen_bytes() -> list[dict]:
    rows = []
    for name, (L, C) in SHAPES.items():
        bf16 = sum(2 * o * i for o, i in adapted_shapes(C))
        row = {"model": name, "layers": L, "bf16_GB": round(L * bf16 / 1e9, 2)}
        for fmt in GOALS:
            block = 0
            for o, i in adapted_shapes(C):
                block += QuantizedWeight(torch.randn(o, i) * 0.02, fmt).nbytes
            row[f"{fmt}_GB"] = round(L * block / 1e9, 3)
            row[f"{fmt}_ratio"] = round(block / bf16, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write_base(work: Path, shape: str = "1.5B") -> Path:
    path = work / f"base-{shape}-bf16.pth"
    if not path.exists():
        from official_layout import rwkv7_state_dict

        L, C = TRAIN_SHAPES[shape]
        sd = rwkv7_state_dict(n_layer=L, n_embd=C, head_size=64, vocab=65536, seed=0, dims=(96, 96, 64, 256),
                              dtype=torch.bfloat16)
        torch.save(sd, path)
    return path


LOAD_CHILD = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from rwkv_peft import load_model
from rwkv_peft.peft.adapt import plan_adapters, prepare_peft
quant, dtype = {quant!r}, {dtype}
model = load_model({path!r}, dtype=dtype, quantizing=quant is not None)
prepare_peft(model, plan_adapters(model, [], ("bone", {{"r": 64}})), quant=quant)
status = {{l.split(":")[0]: int(l.split()[1]) / 1024 for l in Path("/proc/self/status").read_text().splitlines()
          if l.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))}}
print(json.dumps(status))
"""


def load_peaks(work: Path) -> list[dict]:
    path = write_base(work)
    rows = []
    for quant, dtype in ((None, "torch.bfloat16"), (None, "torch.float32"), ("nf4", "torch.float32"),
                         ("int8", "torch.float32")):
        code = LOAD_CHILD.format(root=str(ROOT), quant=quant, dtype=dtype, path=str(path))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        row = {"quant": quant or "none", "dtype": dtype.removeprefix("torch."), "file_MB": round(path.stat().st_size / 2**20),
               **{k: round(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def train_peaks(work: Path, ctx: int, steps: int, quants: list[str], precision: str, shape: str) -> list[dict]:
    path = write_base(work, shape)
    data = work / "text.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(words[i] for i in torch.randint(0, len(words), (ctx,), generator=g))})
                    + "\n")
    rows = []
    for quant in quants:
        run = work / f"run-{quant}"
        cmd = [sys.executable, str(ROOT / "train.py"), "--load_model", str(path), "--data_file", str(data),
               "--ctx_len", str(ctx), "--micro_bsz", "1", "--max_steps", str(steps), "--precision", precision,
               "--peft", "bone", "--bone_r", "64", "--grad_cp", "1", "--quant", quant, "--proj_dir", str(run)]
        proc = subprocess.run(cmd, cwd=work, env=clean_env(), capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"train.py --quant {quant} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((run / "summary.json").read_text())
        row = {"quant": quant, "shape": shape, "precision": precision, "ctx": ctx, "steps": steps,
               "peak_rss_MB": summary["peak_memory_mb"], "tokens_per_s": summary["tokens_per_s"],
               "final_loss": summary["final_loss"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def quality(seeds: list[int]) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        for quant in ("none", "nf4"):
            for seed in seeds:
                out = Path(tmp) / f"{quant}-{seed}"
                cmd = [sys.executable, str(ROOT / "train.py"), "--peft", "bone", "--bone_r", "64", "--quant", quant,
                       "--random_seed", str(seed), "--proj_dir", str(out)]
                print(" ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                runs.append({"quant": quant, "seed": seed, "adapter": str(out / "adapter.safetensors")})
        by_adapter = eval_adapters([r["adapter"] for r in runs], Path(tmp))
    for r in runs:
        e = by_adapter[r.pop("adapter")]
        r.update(loss=e["loss"], task=e["task"] * e["items"], items=e["items"])
    print("\n| base in training | held-out loss (mean, range) | task score (mean, range) |\n|---|---|---|")
    for quant in ("none", "nf4"):
        group = [r for r in runs if r["quant"] == quant]
        loss, task = [r["loss"] for r in group], [r["task"] for r in group]
        print(f"| {quant} | {statistics.mean(loss):.3f} ({min(loss):.3f}-{max(loss):.3f}) | "
              f"{statistics.mean(task):.1f}/{group[0]['items']} ({min(task):.0f}-{max(task):.0f}) |")
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("bytes", "load", "train", "quality"))
    p.add_argument("--work", default="/tmp/bench_quant", help="where the 1.5B-shaped checkpoint and runs go")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quants", nargs="+", default=["nf4", "none"])
    p.add_argument("--shape", default="1.5B", choices=TRAIN_SHAPES, help="train: the model's shape")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = {"bytes": frozen_bytes, "load": lambda: load_peaks(work),
            "train": lambda: train_peaks(work, args.ctx, args.steps, args.quants, args.precision, args.shape),
            "quality": lambda: quality(args.seeds)}[args.part]()
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
