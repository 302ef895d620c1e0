"""The extension build's lock and messages (rwkv_peft/model/wkv_cuda.py, load_extension), on the CPU.

torch.utils.cpp_extension.load is replaced by a stand-in with its locking: the lock file in
the build folder that torch's _jit_compile creates with O_EXCL and otherwise waits on, with
no timeout, through torch's own FileBaton; the stand-in's "build" writes the module file.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from rwkv_peft.model import wkv_cuda


@pytest.fixture
def builds(tmp_path, monkeypatch):
    """A GPU with compute capability 8.6, nvcc 13.0, a cache folder under tmp_path; returns the
    list of module names actually built."""
    monkeypatch.setenv("RWKV_PEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(wkv_cuda, "_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(wkv_cuda, "_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(wkv_cuda, "_nvcc_info", lambda nvcc: ("13.0", frozenset({75, 80, 86, 89, 90})))
    monkeypatch.setattr(wkv_cuda, "_modules", {})
    built = []

    def torch_like_load(name, build_directory, **kwargs):
        baton = FileBaton(os.path.join(build_directory, "lock"))  # as torch's _jit_compile
        so = Path(build_directory, f"{name}.so")
        if baton.try_acquire():
            try:
                if not so.exists():  # ninja: nothing to do when the module is up to date
                    built.append(name)
                    so.write_bytes(b"")
            finally:
                baton.release()
        else:
            baton.wait()
        return SimpleNamespace(__file__=str(so))

    monkeypatch.setattr(cpp_extension, "load", torch_like_load)
    return built


def _build_dir() -> Path:
    return wkv_cuda._build_name(86, 64)[1]


def _load_in_thread(timeout: float):
    """load_extension(64) in a thread; (finished, result or exception)."""
    out = []

    def target():
        try:
            out.append(wkv_cuda.load_extension(64))
        except Exception as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    thread = threading.Thread(target=target, daemon=True)  # a hung one must not keep pytest alive
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), (out[0] if out else None)


def test_a_build_says_so_in_one_line_once(builds, capsys):
    wkv_cuda.load_extension(64)
    err = capsys.readouterr().err
    assert err == f"building the WKV kernel for sm_86, head size 64: about a minute, once (into {_build_dir()})\n"
    wkv_cuda._modules.clear()  # a later run: loads the built module, says nothing
    wkv_cuda.load_extension(64)
    assert capsys.readouterr().err == "" and len(builds) == 1


def test_a_lock_left_by_a_killed_build_is_removed(builds, capsys):
    """Reproduces the hang: torch's lock file left behind by a build killed with SIGKILL. Before
    the fix load_extension waited on it for ever."""
    _build_dir().mkdir(parents=True)
    (_build_dir() / "lock").write_bytes(b"")
    finished, result = _load_in_thread(timeout=15)
    assert finished, "load_extension still waits on the stale lock"
    assert not isinstance(result, Exception), result
    assert f"removed {_build_dir() / 'lock'}, left by a build that was interrupted\n" in capsys.readouterr().err
    assert len(builds) == 1 and not (_build_dir() / "lock").exists()


def _hold_build_lock(pid: str = "4242"):
    _build_dir().mkdir(parents=True, exist_ok=True)
    f = open(_build_dir() / "build.lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(pid)
    f.flush()
    return f


def test_a_running_build_is_waited_for_with_one_line(builds, capsys):
    """Another process building the same module (a second rank): wait for it, say so once, then
    load what it built instead of building again."""
    holder = _hold_build_lock()
    name = wkv_cuda._build_name(86, 64)[0]
    (_build_dir() / "lock").write_bytes(b"")  # torch's, of the live build

    def finish_build():
        time.sleep(1.5)
        (_build_dir() / f"{name}.so").write_bytes(b"")
        (_build_dir() / "lock").unlink()
        holder.close()  # releases the flock

    threading.Thread(target=finish_build).start()
    finished, result = _load_in_thread(timeout=15)
    assert finished and not isinstance(result, Exception), result
    err = capsys.readouterr().err
    assert err == (f"waiting for process 4242, which is building the WKV kernel for sm_86, head size 64 "
                   f"(lock {_build_dir() / 'build.lock'})\n")
    assert builds == []


def test_a_build_that_never_ends_is_given_up_with_what_to_do(builds, monkeypatch):
    monkeypatch.setattr(wkv_cuda, "BUILD_TIMEOUT_S", 1)
    holder = _hold_build_lock()
    try:
        with pytest.raises(RuntimeError) as e:
            wkv_cuda.load_extension(64)
    finally:
        holder.close()
    assert str(e.value).startswith("gave up after 1 s waiting for process 4242 to build the WKV kernel for sm_86, "
                                   f"head size 64 (lock {_build_dir() / 'build.lock'}); stop that process")
