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


def _choose(grad_cp, cpu_malloc, params, device, monkeypatch):
    applied = []
    monkeypatch.setattr(cpu_memory, "map_large_blocks", lambda: applied.append(True))
    args = SimpleNamespace(grad_cp=grad_cp, cpu_malloc=cpu_malloc)
    model = torch.nn.Linear(params // 1000, 1000, bias=False, device="meta")  # counted, never allocated
    choice = cpu_memory.choose_cpu_memory(args, model, torch.device(device))
    return choice.grad_cp, choice.cpu_malloc, bool(applied), choice.note


def test_auto_saves_memory_for_large_models_on_the_cpu_only(monkeypatch):
    grad_cp, malloc, applied, note = _choose(None, "auto", 20_000_000, "cpu", monkeypatch)
    assert (grad_cp, malloc, applied) == (1, "compact", True)
    assert "--grad_cp 1 and --cpu_malloc compact" in note and "--grad_cp 0 --cpu_malloc default" in note
    assert _choose(None, "auto", 19_000_000, "cpu", monkeypatch) == (0, "default", False, None)
    assert _choose(None, "auto", 20_000_000, "cuda", monkeypatch) == (0, "default", False, None)
    # what the user asked for wins
    assert _choose(0, "default", 20_000_000, "cpu", monkeypatch) == (0, "default", False, None)
    assert _choose(None, "compact", 1_000, "cpu", monkeypatch)[1:3] == ("compact", True)
    assert _choose(None, "compact", 20_000_000, "cuda", monkeypatch)[2] is False


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
