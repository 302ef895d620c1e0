"""The malloc of CPU training (rwkv_peft/train/allocator.py): a compact-mode run really runs on
the preferred malloc where it is installed (seen in the process's own mappings from outside),
falls back to glibc where it is not, gets the same losses either way, and executes itself again
at most once."""

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rwkv_peft.train import allocator
from tiny_workspace import COMMON, ROOT, clean_env, losses, make_workspace

# train.py as a program, with the library lookup pointed at nothing: no malloc "installed"
NO_MALLOC = ("import ctypes.util, sys; ctypes.util.find_library = lambda name: None; "
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
@pytest.mark.skipif(allocator.find_malloc() is None, reason=f"no malloc to preload ({allocator.INSTALL})")
def test_compact_runs_on_the_preferred_malloc_and_falls_back_to_glibc_with_the_same_losses(tmp_path):
    pytest.importorskip("deepspeed")
    name = allocator.find_malloc()[0]
    work = make_workspace(tmp_path)
    args = [*COMMON, "--peft", "lora", "--max_steps", "3", "--micro_bsz", "2", "--cpu_malloc", "compact"]
    out, seen = run_watched(work, [sys.executable, str(ROOT / "train.py"), *args, "--proj_dir", "preloaded"])
    assert seen == {name}
    lines = [x for x in out.splitlines() if "malloc:" in x]
    assert len(lines) == 1 and lines[0].startswith(f"malloc: {name}")  # from one process: no second re-exec
    out, seen = run_watched(work, [sys.executable, "-c", NO_MALLOC, *args, "--proj_dir", "glibc"])
    assert not seen
    assert "malloc: glibc with a fixed mmap threshold" in out and allocator.INSTALL in out
    assert losses(work / "preloaded") == losses(work / "glibc") and len(losses(work / "glibc")) == 3


FOUND = ("somemalloc", "libsomemalloc.so.1", {"SOMEMALLOC_CONF": "x"})


def _args(cpu_malloc="compact", load_model=None, n_layer=0, n_embd=0):
    return SimpleNamespace(cpu_malloc=cpu_malloc, load_model=load_model, n_layer=n_layer, n_embd=n_embd)


@pytest.fixture
def execs(monkeypatch):
    """The exec calls preload_malloc makes (recorded, not made), with a malloc 'found' and the
    environment clear of malloc settings."""
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda path, argv, env: calls.append(env))
    monkeypatch.setattr(allocator, "find_malloc", lambda: FOUND)
    monkeypatch.setattr(allocator, "malloc_in_use", lambda: "glibc")
    for k in [k for k in allocator.os.environ if k.startswith("MALLOC_") or k in (allocator.GUARD, "LD_PRELOAD")]:
        monkeypatch.delenv(k)
    return calls


def test_reexecutes_once_with_the_malloc_for_compact_cpu_runs(execs, monkeypatch):
    allocator.preload_malloc(_args(), on_gpu=False)
    assert len(execs) == 1
    env = execs[0]
    assert env["LD_PRELOAD"] == "libsomemalloc.so.1" and env["SOMEMALLOC_CONF"] == "x"
    # the new process carries the guard: it does not execute itself again
    monkeypatch.setenv(allocator.GUARD, env[allocator.GUARD])
    allocator.preload_malloc(_args(), on_gpu=False)
    assert len(execs) == 1


def test_no_reexec_where_jemalloc_is_not_wanted_or_the_user_chose(execs, monkeypatch, tmp_path):
    allocator.preload_malloc(_args("default"), on_gpu=False)
    allocator.preload_malloc(_args(), on_gpu=True)  # GPU tensors do not use malloc
    allocator.preload_malloc(_args("auto", n_layer=2, n_embd=64), on_gpu=False)  # a tiny model
    small = tmp_path / "small.pth"
    small.write_bytes(b"\0" * 1000)
    allocator.preload_malloc(_args("auto", load_model=str(small)), on_gpu=False)
    monkeypatch.setattr(allocator, "find_malloc", lambda: None)  # none installed: glibc it is
    allocator.preload_malloc(_args(), on_gpu=False)
    assert execs == []
    monkeypatch.setattr(allocator, "find_malloc", lambda: FOUND)
    for name, value in (("MALLOC_CONF", "narenas:1"), (allocator.GUARD, "glibc")):  # the user's word wins
        monkeypatch.setenv(name, value)
        allocator.preload_malloc(_args(), on_gpu=False)
        monkeypatch.delenv(name)
    assert execs == []


def test_auto_reexecutes_for_large_models(execs, tmp_path):
    large = tmp_path / "large.pth"
    with open(large, "wb") as f:
        f.truncate(2 * 20_000_000)  # 20M weights in 16 bits (sparse: no disk used)
    allocator.preload_malloc(_args("auto", load_model=str(large)), on_gpu=False)
    allocator.preload_malloc(_args("auto", n_layer=12, n_embd=768), on_gpu=False)
    assert len(execs) == 2


def test_the_first_malloc_installed_is_taken(monkeypatch):
    installed = {"jemalloc": "libjemalloc.so.2"}  # tcmalloc missing: the next in the list
    monkeypatch.setattr(allocator.ctypes.util, "find_library", installed.get)
    name, library, settings = allocator.find_malloc()
    assert (name, library) == ("jemalloc", "libjemalloc.so.2") and "MALLOC_CONF" in settings
    installed.clear()
    assert allocator.find_malloc() is None
