"""CPU training memory: --cpu_malloc compact gives freed blocks back (measured from /proc),
'auto' picks the lean settings for large models only, and neither changes the losses."""

import json
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rwkv_peft.train import cpu_memory
from tiny_workspace import COMMON, clean_env, losses, make_workspace, run_script

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates 200 blocks of 1.5 MB (an activation of ctx 512 x 768, fp32) and frees every other one,
# as a training step's forward does with temporaries; prints the MB the free gave back to the system.
# glibc's threshold is first set where it ends up by itself during training (see cpu_memory.py).
RETAINED = """
import ctypes
import sys
from pathlib import Path
import torch
from rwkv_peft.train.cpu_memory import M_MMAP_THRESHOLD, map_large_blocks

def rss_mb():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

# where glibc's own thresholds drift after a few large frees in a training step (their maximum)
ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 32 << 20)
ctypes.CDLL(None).mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: twice the mmap threshold
if sys.argv[1] == "compact":
    assert map_large_blocks()
kept, freed = [], []
for i in range(200):  # activations kept for backward, temporaries freed at once, in turn
    (kept if i % 2 else freed).append(torch.ones(512 * 768))
before = rss_mb()
del freed
print(before - rss_mb())
"""


def released_mb(mode: str) -> float:
    env = {k: v for k, v in clean_env().items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", RETAINED, mode], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_compact_malloc_gives_freed_activations_back():
    assert released_mb("default") < 20  # 150 MB freed between the kept blocks stay resident
    assert released_mb("compact") > 140


def test_malloc_settings_in_the_environment_win(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert not cpu_memory.map_large_blocks()
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert not cpu_memory.map_large_blocks()


GB = 2**30
# stand-in estimates of the four settings' step memory, so that the choice alone is tested
STEP = {(0, "default"): 3 * GB, (1, "default"): 2 * GB, (0, "compact"): 1.8 * GB, (1, "compact"): 1 * GB}


def _choose(monkeypatch, free_gb, grad_cp=None, cpu_malloc="auto", max_memory=None, device="cpu"):
    """choose_cpu_memory on a tiny model, with 0.5 GB held, `free_gb` free and STEP as the estimates."""
    from rwkv_peft.model import create_model
    from rwkv_peft.model.init import rwkv7_config
    from rwkv_peft.train import memory_estimate as est

    applied = []
    monkeypatch.setattr(cpu_memory, "map_large_blocks", lambda: applied.append(True))
    for name, value in {"rss_bytes": 0.5 * GB, "peak_rss_bytes": 0.5 * GB, "weights_to_come": 0,
                        "cpu_free_bytes": free_gb * GB}.items():
        monkeypatch.setattr(est, name, lambda *a, value=value: value)
    monkeypatch.setattr(est, "trainer_state_bytes", lambda shape: 0)
    monkeypatch.setattr(est, "cpu_step_bytes", lambda shape, cp, malloc: STEP[cp, malloc])
    args = SimpleNamespace(grad_cp=grad_cp, cpu_malloc=cpu_malloc, max_memory=max_memory, micro_bsz=1, ctx_len=64,
                           chunk_ctx=0, objective="sft", precision="fp32")
    model = create_model(rwkv7_config(1, 64, 32, 97), seed=0, dtype=torch.float32)
    choice = cpu_memory.choose_cpu_memory(args, model, torch.device(device))
    return choice.grad_cp, choice.cpu_malloc, bool(applied), choice.note


def test_auto_takes_the_fastest_setting_that_fits(monkeypatch):
    # held 0.5 GB + step; fits when at most 90% of free + held
    assert _choose(monkeypatch, 20)[:3] == (0, "default", False)
    assert _choose(monkeypatch, 3)[:3] == (1, "default", False)   # 3.5 GB > 0.9 x 3.5; 2.5 GB fits
    assert _choose(monkeypatch, 2.2)[:3] == (0, "compact", True)  # 2.3 GB fits 0.9 x 2.7, 2.5 GB does not
    assert _choose(monkeypatch, 1.5)[:3] == (1, "compact", True)
    grad_cp, malloc, applied, note = _choose(monkeypatch, 0.5)     # nothing fits: the smallest, with a warning
    assert (grad_cp, malloc, applied) == (1, "compact", True) and note.startswith("warning: ")
    # the line says what was chosen and from what
    assert _choose(monkeypatch, 20)[3] == "--grad_cp 0 --cpu_malloc default: est. peak 3.5 GiB of 20.5 GiB " \
                                          "(20 GiB free + 512 MiB this process holds)"
    # --max_memory replaces the memory free
    grad_cp, malloc, _, note = _choose(monkeypatch, 20, max_memory="2G")
    assert (grad_cp, malloc) == (1, "compact") and note.endswith("est. peak 1.5 GiB of 2 GiB (--max_memory)")
    # what the user asked for wins; auto chooses the other among what is left
    assert _choose(monkeypatch, 20, grad_cp=1)[:3] == (1, "default", False)
    assert _choose(monkeypatch, 2.2, grad_cp=0)[:3] == (0, "compact", True)
    assert _choose(monkeypatch, 20, cpu_malloc="compact")[:3] == (0, "compact", True)
    grad_cp, malloc, _, note = _choose(monkeypatch, 1, grad_cp=0, cpu_malloc="default")
    assert (grad_cp, malloc) == (0, "default") and note.startswith("warning: --grad_cp 0 --cpu_malloc default (given)")


@pytest.mark.slow
def test_lean_settings_leave_the_losses_unchanged(tmp_path):
    """train.py with gradient checkpointing and the compact malloc: the same losses, bit for bit,
    as the defaults, which for this tiny model are neither (recorded in args.json)."""
    pytest.importorskip("deepspeed")
    work = make_workspace(tmp_path)
    args = [*COMMON, "--peft", "lora", "--max_steps", "3", "--micro_bsz", "2"]
    run_script(work, "train.py", *args, "--proj_dir", "defaults")
    run_script(work, "train.py", *args, "--grad_cp", "1", "--cpu_malloc", "compact", "--proj_dir", "lean")
    recorded = json.loads((work / "defaults" / "args.json").read_text())
    assert (recorded["grad_cp"], recorded["cpu_malloc"]) == (0, "default")
    assert losses(work / "lean") == losses(work / "defaults") and len(losses(work / "lean")) == 3


def test_auto_on_a_gpu_decides_grad_cp_from_its_free_memory(monkeypatch):
    """A GPU's free memory (stubbed: no GPU here) decides --grad_cp alone; malloc is left alone."""
    from rwkv_peft.model import create_model
    from rwkv_peft.model.init import rwkv7_config

    applied = []
    monkeypatch.setattr(cpu_memory, "map_large_blocks", lambda: applied.append(True))
    model = create_model(rwkv7_config(2, 128, 64, 256), seed=0, dtype=torch.float32)
    weights = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: weights)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: weights)
    args = SimpleNamespace(grad_cp=None, cpu_malloc="auto", max_memory=None, micro_bsz=8, ctx_len=16384,
                           chunk_ctx=0, objective="sft", precision="bf16")
    # 8 x 16384 tokens keep 2 blocks x 50 values of n_embd 128 in bf16 without checkpointing
    # (3.4 GB), 2 x 1 with it, besides two blocks' backward (3.4 GB)
    for free_gib, expected in ((80, 0), (6, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free_gib: (f * 2**30, 80 * 2**30))
        choice = cpu_memory.choose_cpu_memory(args, model, torch.device("cuda"))
        assert (choice.grad_cp, choice.cpu_malloc, applied) == (expected, "default", [])
        assert choice.note.startswith(f"--grad_cp {expected}: est. peak")
