"""The malloc of CPU training (rwkv_peft/train/allocator.py): a compact-mode run really runs on
jemalloc where it is installed (seen in the process's own mappings from outside), falls back to
glibc where it is not, gets the same losses either way, and executes itself again at most once."""

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rwkv_peft.train import allocator
from tiny_workspace import COMMON, ROOT, clean_env, losses, make_workspace

# train.py as a program, with the library lookup pointed at nothing: jemalloc "not installed"
NO_JEMALLOC = ("import ctypes.util, sys; ctypes.util.find_library = lambda name: None; "
               "from rwkv_peft.commands import train; sys.exit(train())")


def run_watched(work: Path, cmd: list[str]) -> tuple[str, set[str]]:
    """Run cmd in work; returns its output and the mallocs seen in /proc/PID/maps while it ran
    (the process id stays the same across exec)."""
    env = {k: v for k, v in clean_env().items() if k not in (allocator.GUARD, "LD_PRELOAD", "MALLOC_CONF")}
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            break
        seen |= {name for name in allocator.KNOWN if f"/lib{name}" in maps}
        time.sleep(0.02)
    out = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    assert proc.returncode == 0, out[-3000:]
    return out, seen


@pytest.mark.slow
@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="jemalloc not installed (apt install libjemalloc2)")
def test_compact_runs_on_jemalloc_and_falls_back_to_glibc_with_the_same_losses(tmp_path):
    pytest.importorskip("deepspeed")
    work = make_workspace(tmp_path)
    args = [*COMMON, "--peft", "lora", "--max_steps", "3", "--micro_bsz", "2", "--cpu_malloc", "compact"]
    out, seen = run_watched(work, [sys.executable, str(ROOT / "train.py"), *args, "--proj_dir", "je"])
    assert seen == {"jemalloc"}
    assert [x for x in out.splitlines() if "malloc:" in x] == [
        f"malloc: jemalloc ({allocator.JEMALLOC_CONF})"]  # one line, from one process: no second re-exec
    out, seen = run_watched(work, [sys.executable, "-c", NO_JEMALLOC, *args, "--proj_dir", "glibc"])
    assert not seen
    assert "malloc: glibc with a fixed mmap threshold" in out and "apt install libjemalloc2" in out
    assert losses(work / "je") == losses(work / "glibc") and len(losses(work / "je")) == 3


def _args(cpu_malloc="compact", load_model=None, n_layer=0, n_embd=0):
    return SimpleNamespace(cpu_malloc=cpu_malloc, load_model=load_model, n_layer=n_layer, n_embd=n_embd)


@pytest.fixture
def execs(monkeypatch):
    """The exec calls preload_jemalloc makes (recorded, not made), with jemalloc 'found' and the
    environment clear of malloc settings."""
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda path, argv, env: calls.append(env))
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "libjemalloc.so.2")
    monkeypatch.setattr(allocator, "malloc_in_use", lambda: "glibc")
    for k in [k for k in allocator.os.environ if k.startswith("MALLOC_") or k in (allocator.GUARD, "LD_PRELOAD")]:
        monkeypatch.delenv(k)
    return calls


def test_reexecutes_once_with_jemalloc_for_compact_cpu_runs(execs, monkeypatch):
    allocator.preload_jemalloc(_args(), on_gpu=False)
    assert len(execs) == 1
    env = execs[0]
    assert env["LD_PRELOAD"] == "libjemalloc.so.2" and env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    # the new process carries the guard: it does not execute itself again
    monkeypatch.setenv(allocator.GUARD, env[allocator.GUARD])
    allocator.preload_jemalloc(_args(), on_gpu=False)
    assert len(execs) == 1


def test_no_reexec_where_jemalloc_is_not_wanted_or_the_user_chose(execs, monkeypatch, tmp_path):
    allocator.preload_jemalloc(_args("default"), on_gpu=False)
    allocator.preload_jemalloc(_args(), on_gpu=True)  # GPU tensors do not use malloc
    allocator.preload_jemalloc(_args("auto", n_layer=2, n_embd=64), on_gpu=False)  # a tiny model
    small = tmp_path / "small.pth"
    small.write_bytes(b"\0" * 1000)
    allocator.preload_jemalloc(_args("auto", load_model=str(small)), on_gpu=False)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)  # not installed: glibc it is
    allocator.preload_jemalloc(_args(), on_gpu=False)
    assert execs == []
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "libjemalloc.so.2")
    for name, value in (("MALLOC_CONF", "narenas:1"), (allocator.GUARD, "glibc")):  # the user's word wins
        monkeypatch.setenv(name, value)
        allocator.preload_jemalloc(_args(), on_gpu=False)
        monkeypatch.delenv(name)
    assert execs == []


def test_auto_reexecutes_for_large_models(execs, tmp_path):
    large = tmp_path / "large.pth"
    with open(large, "wb") as f:
        f.truncate(2 * 20_000_000)  # 20M weights in 16 bits (sparse: no disk used)
    allocator.preload_jemalloc(_args("auto", load_model=str(large)), on_gpu=False)
    allocator.preload_jemalloc(_args("auto", n_layer=12, n_embd=768), on_gpu=False)
    assert len(execs) == 2
