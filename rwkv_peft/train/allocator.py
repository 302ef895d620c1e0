"""The malloc of a CPU training run: tcmalloc (or jemalloc) where installed, glibc's otherwise.

glibc's malloc keeps the freed activations of a step resident and fragmented (cpu_memory.py);
the compact setting gives them back by mapping every large block on its own, at the price of
fresh zero-filled pages for each block, every step: 6.2 million page faults in a 3-step run of
the 0.1B shape against 0.33 million for tcmalloc, which reuses freed spans, keeps blocks of one
size together and gives memory back slowly, and so holds the resident set near what the step
really keeps at about glibc's default speed (bench/README.md, "Allocators").

A malloc must be in place before the process allocates anything, and the dynamic linker reads
LD_PRELOAD only when a program starts. So a training process that wants one executes itself
again, once, at its start (before the model loads): the same program, arguments and process
id, with LD_PRELOAD and the malloc's settings added, and RWKV_PEFT_MALLOC, which marks the new
process so that it never does so again. RWKV_PEFT_MALLOC=glibc keeps glibc's malloc; a malloc
preloaded by the user, or MALLOC_* settings in the environment, are left as they are.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from pathlib import Path

from ..model.config import SMALL_MODEL_PARAMS

GUARD = "RWKV_PEFT_MALLOC"  # set in the re-executed process (its value: the malloc it asked for)
# The mallocs to preload, best first (bench/README.md, "Allocators"): the library's name for the
# dynamic linker's lookup and the environment it runs with. tcmalloc as it comes reuses freed
# spans and returns them slowly; its report of blocks over 1 GB (a long context's logits) is
# turned off. jemalloc purges blocks of 8 MB and more at once unless oversize_threshold is 0.
MALLOCS = (("tcmalloc", "tcmalloc_minimal", {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}),
           ("jemalloc", "jemalloc", {"MALLOC_CONF": "oversize_threshold:0,background_thread:true,"
                                                   "dirty_decay_ms:1000,muzzy_decay_ms:0"}))
KNOWN = ("jemalloc", "tcmalloc", "mimalloc")  # mallocs that replace glibc's when preloaded
INSTALL = "apt install libtcmalloc-minimal4"  # Debian, Ubuntu


def find_malloc() -> tuple[str, str, dict] | None:
    """The best malloc installed: (name, library, environment), or None (then glibc's it is)."""
    if platform.system() != "Linux":
        return None
    for name, library, env in MALLOCS:
        found = ctypes.util.find_library(library)
        if found:
            return name, found, env
    return None


def malloc_in_use() -> str:
    """The malloc of this process, from the libraries mapped into it: jemalloc, tcmalloc, mimalloc,
    else glibc (on glibc systems) or 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    found = [name for name in KNOWN if f"/lib{name}" in maps]
    return found[0] if found else "glibc" if platform.libc_ver()[0] == "glibc" else "system"


def user_set_malloc() -> bool:
    """True if the environment already tunes or chooses malloc: the user's settings win."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        k.startswith("MALLOC_") for k in os.environ)


def _large_model(args) -> bool:
    """Whether the model has about SMALL_MODEL_PARAMS or more, judged before anything loads: from
    the checkpoint's size (2 bytes a weight or more) or a new model's blocks (12 n_embd^2 a layer)."""
    if args.load_model:
        return os.path.isfile(args.load_model) and os.path.getsize(args.load_model) >= 2 * SMALL_MODEL_PARAMS
    return 12 * args.n_layer * args.n_embd ** 2 >= SMALL_MODEL_PARAMS


def wants_malloc(args, on_gpu: bool) -> bool:
    """Training on the CPU with --cpu_malloc compact, or auto and a large model: then the step's
    large temporaries decide its speed and memory (GPU tensors do not use malloc)."""
    return not on_gpu and (args.cpu_malloc == "compact" or (args.cpu_malloc == "auto" and _large_model(args)))


def preload_malloc(args, on_gpu: bool) -> None:
    """Execute this process again on the best malloc installed when it wants one; returns (doing
    nothing) otherwise. Call once, first thing, from a process's entry point."""
    if os.environ.get(GUARD) or user_set_malloc() or malloc_in_use() != "glibc" or not wants_malloc(args, on_gpu):
        return
    found = find_malloc()
    if found is None:
        return
    name, library, settings = found
    preload = " ".join(x for x in (library, os.environ.get("LD_PRELOAD")) if x)
    env = dict(os.environ, LD_PRELOAD=preload, **settings, **{GUARD: name})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def describe(compact: bool) -> str | None:
    """The log line naming the malloc of a CPU run, or None where there is nothing to say (glibc as
    it comes, in the default mode)."""
    name = malloc_in_use()
    if name not in ("glibc", "system"):
        settings = " ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_CONF",) if k in os.environ)
        return f"malloc: {name}" + (f" ({settings})" if settings else "")
    if compact and name == "glibc":
        return (f"malloc: glibc with a fixed mmap threshold (steps up to 2x slower; {INSTALL} for the same "
                "memory at nearly full speed)")
    return None
