"""CPU training throughput per PEFT method on a small RWKV-7, through the real train.py.

    python bench/bench_train_cpu.py [--steps 12] [--layers 6] [--width 256] [--ctx 256] [--rounds 2]

A random official-layout RWKV-7 (World vocabulary) is fine-tuned by train.py with each
method, at matching trainable parameters on the square layers (Bone r=64, Bat r=64,
LoRA r=32, PiSSA r=32), fp32, ZeRO stage 1, one process. tokens/s is taken over the steps
after the first two (start-up and warm-up excluded). Methods run in turn, for --rounds
rounds, and each method's best round is reported, which damps noise from other load.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from official_layout import rwkv7_state_dict  # noqa: E402
from tiny_workspace import clean_env  # noqa: E402

METHODS = {"bone": ["--peft", "bone", "--bone_r", "64"], "bat": ["--peft", "bat", "--bat_r", "64"],
           "lora": ["--peft", "lora", "--lora_r", "32", "--lora_alpha", "32"],
           "pissa": ["--peft", "pissa", "--pissa_r", "32"], "full": ["--peft", "none"]}


def write_workspace(work: Path, layers: int, width: int, dims: tuple, records: int, words: int) -> None:
    """base.pth (a random official-layout RWKV-7, World vocabulary) and text.jsonl in work."""
    sd = rwkv7_state_dict(n_layer=layers, n_embd=width, head_size=64, vocab=65536, seed=0, dims=dims)
    torch.save(sd, work / "base.pth")
    vocab = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    g = torch.Generator().manual_seed(0)
    with open(work / "text.jsonl", "w") as f:
        for _ in range(records):
            ids = torch.randint(0, len(vocab), (words,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(vocab[i] for i in ids)}) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--micro_bsz", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        write_workspace(work, args.layers, args.width, dims=(32, 32, 32, 64), records=400, words=200)

        results = {m: None for m in METHODS}
        for _ in range(args.rounds):
            for method, flags in METHODS.items():
                run = work / f"{method}-run"
                cmd = [sys.executable, str(ROOT / "train.py"), "--load_model", "base.pth", "--data_file", "text.jsonl",
                       "--ctx_len", str(args.ctx), "--micro_bsz", str(args.micro_bsz), "--max_steps", str(args.steps),
                       "--precision", "fp32", "--proj_dir", run.name, *flags]
                proc = subprocess.run(cmd, cwd=work, env=clean_env(), capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{method} failed:\n{proc.stderr[-2000:]}")
                table = proc.stdout
                trainable = next(line for line in table.splitlines() if line.startswith("trainable"))
                records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                a, b = records[1], records[-1]  # steps 3.. onwards
                tps = (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])
                summary = json.loads((run / "summary.json").read_text())
                entry = {"tokens_per_s": round(tps, 1), "trainable": trainable.split()[1],
                         "peak_rss_mb": summary["peak_memory_mb"], "final_loss": round(records[-1]["loss"], 3)}
                if results[method] is None or tps > results[method]["tokens_per_s"]:
                    results[method] = entry
                shutil.rmtree(run)
    finally:
        shutil.rmtree(work)  # the base checkpoint alone is ~155 MB

    torch_threads = torch.get_num_threads()
    print(f"RWKV-7 L{args.layers} C{args.width} V65536, ctx {args.ctx}, micro batch {args.micro_bsz}, fp32, "
          f"ZeRO-1, 1 process, {torch_threads} torch threads, best of {args.rounds} rounds\n")
    print("| method | trainable | tokens/s | vs LoRA | peak RSS MB |")
    print("|---|---|---|---|---|")
    lora = results["lora"]["tokens_per_s"]
    for method, r in results.items():
        print(f"| {method} | {r['trainable']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / lora:.2f}x | "
              f"{r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
