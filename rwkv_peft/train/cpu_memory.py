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

By default (auto) the fastest of these whose estimated peak fits the memory free is taken
(choose_cpu_memory; the estimate: memory_estimate.py).
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

import torch

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
    """--grad_cp and --cpu_malloc as this run uses them, and the log's line on why."""

    grad_cp: int
    cpu_malloc: str
    note: str | None


# (--grad_cp, --cpu_malloc), fastest first (step time 1.00x, 1.07-1.23x, 1.49-1.59x, 1.87-2.21x on
# the 0.1B shape: the table above); each needs less memory than the one before, roughly
CPU_SETTINGS = ((0, "default"), (1, "default"), (0, "compact"), (1, "compact"))


def choose_cpu_memory(args, model: torch.nn.Module, device: torch.device) -> MemoryChoice:
    """Resolve --grad_cp and --cpu_malloc 'auto': the fastest setting whose estimated peak fits the
    memory free (or --max_memory) with a margin; then apply --cpu_malloc. When none fits, the
    smallest, with a warning: the estimate is within about 15%, and a run that might fit is
    better tried than refused (one that cannot is refused by args.check_fits_memory)."""
    from .args import parse_size
    from .memory_estimate import (MARGIN, cpu_free_bytes, cpu_step_bytes, gpu_step_bytes, peak_rss_bytes,
                                  rss_bytes, size_text, step_shape, trainer_state_bytes, weights_to_come)

    shape = step_shape(args, model)
    settings = CPU_SETTINGS if device.type == "cpu" else ((0, "default"), (1, "default"))
    settings = [(cp, m) for cp, m in settings if args.grad_cp in (None, cp)
                and (args.cpu_malloc in ("auto", m) or device.type != "cpu")]
    if device.type == "cpu":
        held = rss_bytes() + weights_to_come(model) + trainer_state_bytes(shape)
        started = peak_rss_bytes()  # loading may have peaked higher than a step will
        estimate = {s: max(started, held + cpu_step_bytes(shape, *s)) for s in settings}
        free, held_now = cpu_free_bytes() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), rss_bytes()
    else:
        held_now = torch.cuda.memory_allocated(device)
        held = held_now + trainer_state_bytes(shape)
        estimate = {s: held + gpu_step_bytes(shape, s[0]) for s in settings}
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - held_now
    if args.max_memory is not None:
        budget, of = parse_size(args.max_memory), "--max_memory"
    else:
        budget, of = free + held_now, f"{size_text(free)} free + {size_text(held_now)} this process holds"
    fitting = [s for s in settings if estimate[s] <= MARGIN * budget]
    grad_cp, cpu_malloc = fitting[0] if fitting else settings[-1]
    if args.cpu_malloc != "auto":
        cpu_malloc = args.cpu_malloc
    if cpu_malloc == "compact" and device.type == "cpu":
        map_large_blocks()
    flags = f"--grad_cp {grad_cp}" + (f" --cpu_malloc {cpu_malloc}" if device.type == "cpu" else "")
    given = args.grad_cp is not None and (args.cpu_malloc != "auto" or device.type != "cpu")
    est = estimate[grad_cp, cpu_malloc if device.type == "cpu" else "default"]
    line = f"{flags}{' (given)' if given else ''}: est. peak {size_text(est)} of {size_text(budget)} ({of})"
    if not fitting:
        line = (f"warning: {line}, above {MARGIN:.0%} of it; going on with "
                + ("the setting given" if given else "the setting that needs least"))
    return MemoryChoice(grad_cp, cpu_malloc, line)


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
