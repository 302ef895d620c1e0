"""--grad_cp / --cpu_malloc auto against the fast setting: LoRA r=32 on the RWKV-7 0.1B shape,
ctx 512, batch 1, fp32, the real train.py (one process, ZeRO-1), and Hugging Face peft on rwkv7-hf.

    python bench/bench_memory_auto.py [--steps 5] [--rounds 3] [--hf_steps N] [--no_hf] [--json out.json]

Settings, in turn for --rounds rounds (interleaved: the machine's load drifts):
  fast      --grad_cp 0 --cpu_malloc default
  default   no memory flag: auto decides from the memory free
  capped    --max_memory 2.5G: auto decides within 2.5 GiB
  lowmem    --grad_cp 1 --cpu_malloc compact (on tcmalloc or jemalloc where installed)
  hf-peft   the same base exported by merge.py --format hf, loaded by rwkv7-hf, peft LoRA r=32
            alpha 32 on the layers --peft lora adapts, AdamW lr 1e-4, fp32, the same
            samples of the same data, the same torch threads (one process of its own)
For each run: tokens/s over the steps after the first (from metrics.jsonl), peak RSS
(summary.json / the HF process's own: ru_maxrss) and the line in which train.py says what it chose.
Runs go one at a time: the HF one peaks near 17 GB.
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
            "capped": ["--max_memory", "2.5G"], "lowmem": ["--grad_cp", "1", "--cpu_malloc", "compact"]}
HF = "hf-peft"


def run(work: Path, args, name: str, flags: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--load_model", "base.pth", "--data_file", "text.jsonl",
           "--ctx_len", str(args.ctx), "--micro_bsz", "1", "--max_steps", str(args.steps), "--precision", "fp32",
           "--peft", "lora", "--lora_r", "32", "--lora_alpha", "32", "--proj_dir", name, *flags]
    env = {k: v for k, v in clean_env().items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"train.py failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if "est. peak" in x)
    malloc = [x.strip() for x in proc.stdout.splitlines() if "malloc" in x.lower() and x not in line]
    line += f" [{malloc[0]}]" if malloc else ""
    records = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    step_s = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:]))
    peak = json.loads((work / name / "summary.json").read_text())["peak_memory_mb"]
    return {"tokens_per_s": args.ctx / step_s, "peak_rss_mb": peak, "chosen": line,
            "losses": [r["loss"] for r in records]}


def run_hf(work: Path, args, steps: int) -> dict:
    """The HF row in a process of its own, so that its peak RSS is its own."""
    if not (work / "base-hf").exists():
        cmd = [sys.executable, str(ROOT / "merge.py"), "--base", "base.pth", "--format", "hf", "--output", "base-hf"]
        proc = subprocess.run(cmd, cwd=work, env=clean_env(), capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"merge.py --format hf failed:\n{proc.stderr[-3000:]}")
    cmd = [sys.executable, __file__, "--hf_worker", str(work), "--steps", str(steps), "--ctx", str(args.ctx)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the hf-peft run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def hf_worker(work: Path, steps: int, ctx: int) -> None:
    """LoRA r=32 with Hugging Face peft on rwkv7-hf's RWKV-7: prints one JSON line."""
    import resource
    import time

    import rwkv7_hf
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from rwkv_peft.data.datasets import load_training_data
    from rwkv_peft.data.tokenizer import load_tokenizer
    from rwkv_peft.model.hf_names import linear_to_hf
    from rwkv_peft.peft.adapt import DEFAULT_TARGETS

    threads = torch.get_num_threads()  # what train.py's set_threads keeps for a model of 20M+ parameters
    model = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(work / "base-hf", dtype=torch.float32)
    # --peft lora's default targets, by their HF module names (the same in every block)
    targets = sorted({linear_to_hf(f"blocks.0.{kind}").split(".", 3)[3] for kind in DEFAULT_TARGETS[7]})
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = load_training_data(str(work / "text.jsonl"), load_tokenizer("world"), ctx, seed=42, progress=False)
    ends, losses = [], []
    for i in range(steps):
        sample = data.sample(i)
        logits = model(input_ids=torch.as_tensor(sample["input_ids"])[None]).logits
        loss = F.cross_entropy(logits[0].float(), torch.as_tensor(sample["targets"]), reduction="none")
        mask = torch.as_tensor(sample["loss_mask"])
        loss = (loss * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ends.append(time.perf_counter())
    step_s = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"tokens_per_s": ctx / step_s, "losses": losses,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "chosen": f"peft LoRA on {', '.join(targets)}: {trainable} trainable, {threads} threads"}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--hf_steps", type=int, help="steps of the hf-peft row (default: --steps)")
    p.add_argument("--no_hf", action="store_true", help="leave out the hf-peft row")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--hf_worker", help=argparse.SUPPRESS)  # internal: the hf-peft row's process
    args = p.parse_args()
    if args.hf_worker:
        return hf_worker(Path(args.hf_worker), args.steps, args.ctx)
    names = [*SETTINGS, *([] if args.no_hf else [HF])]
    results = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        work = Path(tmp)
        write_workspace(work, args.layers, args.width, dims=(64, 64, 32, 128), records=64, words=args.ctx)
        for r in range(args.rounds):
            for name in names:
                out = (run_hf(work, args, args.hf_steps or args.steps) if name == HF
                       else run(work, args, f"{name}-{r}", SETTINGS[name]))
                results[name].append(out)
                print(f"round {r + 1} {name}: {out['tokens_per_s']:.0f} tokens/s, peak RSS {out['peak_rss_mb']:.0f} MB"
                      f" | {out['chosen']} (load average {os.getloadavg()[0]:.1f})", flush=True)
    print("\n| setting | tokens/s per round | vs fast, same round | peak RSS MB | chosen |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        speed = ", ".join(f"{x['tokens_per_s']:.0f}" for x in rows)
        ratios = ", ".join(f"{x['tokens_per_s'] / f['tokens_per_s']:.2f}x" for x, f in zip(rows, results["fast"]))
        peaks = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in rows)
        print(f"| {name} {' '.join(SETTINGS.get(name, []))} | {speed} | {ratios} | {peaks} | {rows[0]['chosen']} |")
    same = all(x["losses"] == results["fast"][0]["losses"] for name in SETTINGS for x in results[name])
    print(f"\nloss sequences identical across our settings: {same}; ours {results['fast'][0]['losses']}")
    if HF in results:
        print(f"hf-peft losses: {results[HF][0]['losses']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
