"""Peak memory of CPU training: gradient checkpointing and glibc's malloc, chosen per model.

Where a CPU step's resident set goes (RWKV-7 0.1B shape, LoRA r=32, ctx 512, fp32;
bench/README.md, "Training peak RSS"): 0.8 GB of weights, 0.9 GB of activations kept for
backward, and, with glibc's malloc as it comes, 1.7 GB of freed memory that stays resident.

Why freed memory stays: a step allocates and frees hundreds of activations and WKV temporaries
of 0.3-12 MB. glibc maps a block above its mmap threshold on its own and unmaps it when freed,
but each such free raises the threshold to that block's size (up to 32 MB), so from the first
step on these blocks come from the heap, where freed space stays resident and fragmented.
Fixing the threshold with mallopt (which also turns off the raising) gives every block of
256 KB or more back at once. The price is paid in page faults: each new block is fresh,
zero-filled memory. Where tcmalloc or jemalloc is installed, the compact mode runs on it
instead (allocator.py: it reuses freed blocks without keeping them fragmented) and the
mallopt setting is left out.

Measured on that model (bench/bench_train_memory.py, two runs; same losses in every setting):

    --grad_cp  --cpu_malloc  peak RSS  step time
    0          default       4.4 GB    1.00x
    1          default       2.8 GB    1.07-1.23x
    0          compact       2.7 GB    1.49-1.59x
    1          compact       1.8 GB    1.87-2.21x

By default both are on for models of 20M parameters or more, which is where memory runs
short on a small machine; smaller models keep the fast path (their steps need little memory).
"""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass

import torch

from ..model.config import SMALL_MODEL_PARAMS
from .allocator import describe as describe_malloc, malloc_in_use, user_set_malloc

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024  # a [ctx, C] activation is far above it; small tensors stay on the heap


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve blocks of `threshold` bytes and more by their own mappings from now on (glibc only,
    not where the environment tunes malloc or another malloc runs); returns whether the setting was made."""
    if user_set_malloc() or platform.system() != "Linux" or malloc_in_use() != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1


@dataclass(frozen=True)
class MemoryChoice:
    """--grad_cp and --cpu_malloc as this run uses them, and a line for the log when 'auto' chose."""

    grad_cp: int
    cpu_malloc: str
    note: str | None


def choose_cpu_memory(args, model: torch.nn.Module, device: torch.device) -> MemoryChoice:
    """Resolve --grad_cp and --cpu_malloc 'auto' for this model and device, and apply --cpu_malloc."""
    n_params = sum(p.numel() for p in model.parameters())
    large_on_cpu = device.type == "cpu" and n_params >= SMALL_MODEL_PARAMS
    grad_cp = int(large_on_cpu) if args.grad_cp is None else args.grad_cp
    cpu_malloc = ("compact" if large_on_cpu else "default") if args.cpu_malloc == "auto" else args.cpu_malloc
    chosen = (["--grad_cp 1"] if args.grad_cp is None and grad_cp else []) + (
        ["--cpu_malloc compact"] if args.cpu_malloc == "auto" and large_on_cpu else [])
    if cpu_malloc == "compact" and device.type == "cpu":
        map_large_blocks()
    note = (f"CPU training of {n_params / 1e6:.0f}M parameters: {' and '.join(chosen)} to save memory; "
            f"for faster steps with more memory pass --grad_cp 0 --cpu_malloc default") if chosen else None
    return MemoryChoice(grad_cp, cpu_malloc, note)


def place_model(model: torch.nn.Module, args, device: torch.device, log) -> MemoryChoice:
    """The model on its device, with the CPU threads and memory settings for its size."""
    from ..generate import set_threads

    model.to(device)
    if device.type == "cpu":
        set_threads(model)  # one thread for small models: splitting tiny ops costs far more than it gains
    memory = choose_cpu_memory(args, model, device)  # --grad_cp and --cpu_malloc auto
    if memory.note:
        log(memory.note)
    if device.type == "cpu" and (line := describe_malloc(memory.cpu_malloc == "compact")):
        log(line)
    model.grad_checkpointing = bool(memory.grad_cp)
    return memory
