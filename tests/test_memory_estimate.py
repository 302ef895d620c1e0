"""--grad_cp / --cpu_malloc auto decide from an estimate of a step's peak memory
(rwkv_peft/train/memory_estimate.py): here the estimate a real train.py run logs is held
against the peak RSS that run then reached (its summary.json: ru_maxrss), within 15%, over
shapes, methods, --quant, --chunk_ctx, state tuning and both --grad_cp settings. Widths are
small and contexts long, so that the activations, not the Python process, make the peak."""

import json
import re

import pytest
import torch

from official_layout import rwkv7_state_dict
from tiny_workspace import ROOT, run_script

pytest.importorskip("deepspeed")

DEMO_TOKENIZER = str(ROOT / "demo" / "tokenizer.json")  # 1024 tokens; the demo data is the training data
NEW = ["--n_layer", "2", "--n_embd", "512", "--tokenizer", DEMO_TOKENIZER]
BASE = ["--load_model", "base.pth", "--tokenizer", DEMO_TOKENIZER]
CASES = {
    "lora, grad_cp 0": [*NEW, "--peft", "lora", "--ctx_len", "1024", "--grad_cp", "0", "--cpu_malloc", "default"],
    "bone, grad_cp 1": [*BASE, "--peft", "bone", "--ctx_len", "1024", "--grad_cp", "1", "--cpu_malloc", "default"],
    "full, World vocabulary, compact": ["--n_layer", "2", "--n_embd", "256", "--peft", "full", "--ctx_len", "512",
                                        "--grad_cp", "0", "--cpu_malloc", "compact"],
    "lora on nf4, auto": [*BASE, "--peft", "lora", "--quant", "nf4", "--ctx_len", "1024"],
    "chunk_ctx, grad_cp 1 compact": [*BASE, "--peft", "lora", "--ctx_len", "2048", "--chunk_ctx", "512",
                                     "--grad_cp", "1", "--cpu_malloc", "compact"],
    "state tuning": [*BASE, "--peft", "none", "--train_parts", "state", "--ctx_len", "1024", "--grad_cp", "0"],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("estimate")
    torch.save(rwkv7_state_dict(n_layer=3, n_embd=512, head_size=64, vocab=1024, seed=0), d / "base.pth")
    return d


def logged_estimate(stdout: str) -> float:
    """Bytes of the 'est. peak 1.23 GiB' / '456 MiB' in the run's memory line."""
    value, unit = re.search(r"est\. peak ([\d.]+) (MiB|GiB)", stdout).groups()
    return float(value) * (2**30 if unit == "GiB" else 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_estimate_is_within_15_percent_of_the_measured_peak(work, case):
    run = f"run-{list(CASES).index(case)}"
    proc = run_script(work, "train.py", *CASES[case], "--max_steps", "2", "--precision", "fp32", "--proj_dir", run)
    peak = json.loads((work / run / "summary.json").read_text())["peak_memory_mb"] * 2**20
    estimate = logged_estimate(proc.stdout)
    assert abs(estimate - peak) <= 0.15 * peak, (case, estimate / 1e6, peak / 1e6)
