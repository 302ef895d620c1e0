"""A tiny training workspace for end-to-end tests: a word-level tokenizer, a random base in
the official layout whose vocabulary matches it, and a repetitive corpus that a few dozen
steps learn."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from official_layout import rwkv7_state_dict

ROOT = Path(__file__).parent.parent
WORDS = "the cat sat on a mat and saw one red bird fly over green hills while rain fell softly".split()
VOCAB = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(WORDS)))}}
COMMON = ["--load_model", "base.pth", "--tokenizer", "tok.json", "--data_file", "text.jsonl", "--ctx_len", "32",
          "--lr_init", "3e-2", "--lr_final", "3e-3", "--warmup_steps", "0", "--precision", "fp32",
          "--bone_r", "16", "--bat_r", "16", "--lora_r", "8", "--pissa_r", "8"]


def make_workspace(d: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(d / "tok.json"))
    torch.save(rwkv7_state_dict(vocab=len(VOCAB), n_layer=2, n_embd=64, head_size=16, seed=0), d / "base.pth")
    rng = random.Random(0)
    pattern = WORDS[:11]
    with open(d / "text.jsonl", "w") as f:
        for _ in range(64):
            k = rng.randrange(len(pattern))
            f.write(json.dumps({"text": " ".join((pattern[k:] + pattern) * 3)}) + "\n")
    with open(d / "chat.jsonl", "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "red bird"},
                                         {"role": "assistant", "content": "fly over green hills"}]}) + "\n")
    return d


def clean_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_cases(work: Path, cases: list, *, files: Path | None = None, timeout: int = 600) -> dict:
    """Every case [name, script, [args]] through tests/script_cases.py in ONE Python process started
    in work (cases.json and results.json go to files, default work); the results by case name."""
    files = files or work
    (files / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, str(ROOT / "tests" / "script_cases.py"), str(files / "cases.json"),
                    str(files / "results.json")], cwd=work, env=clean_env(), check=True, timeout=timeout)
    return json.loads((files / "results.json").read_text())


def run_script(work: Path, script: str, *args, nproc: int = 1, check: bool = True, timeout: int = 600):
    """Run train.py / merge.py (or torchrun with nproc processes) in work; returns the process."""
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / script)]
    else:  # --standalone: torchrun binds a free port itself (a port probed here could be taken before it)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script)]
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=work, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(run_dir: Path) -> list[float]:
    """The training loss per step (validation records, which have val_loss instead, left out)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]
