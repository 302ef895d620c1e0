"""The peak memory of a training step, estimated before the first one, and the memory free for it.

--grad_cp auto and --cpu_malloc auto (cpu_memory.py) take the fastest setting whose estimate
fits. The estimate is what the process holds when the choice is made (torch and DeepSpeed
imported, the data, the model's weights: measured, not assumed), plus what is still to come:

    weights still to come   pages of a memory-mapped checkpoint the steps will touch (read from
                            /proc/self/pagemap: the model's tensors not yet resident; the
                            embedding excluded, whose rows are touched one token at a time)
    trainer state           per trainable parameter: its gradient, Adam's two fp32 moments and the
                            optimizer's temporaries (fp32 master weights and gradients under bf16)
    step                    the activations kept for backward, the backward's temporaries, the
                            logits and their gradient, and on the CPU the freed memory glibc keeps

The activation figures were measured once (saved_tensors_hooks over the blocks' forward, as
bench/bench_train_memory.py's breakdown does: 933 MB for 12 blocks of n_embd 768 at ctx 512):
an RWKV-7 block keeps 47-52 x n_embd values per token for backward, an RWKV-6 block 46-48;
--grad_cp 1 keeps only each block's input (and RWKV-7's v_first) and recomputes one block at
a time. What a real step adds on top (the backward's temporaries and, with glibc's malloc as
it comes, the freed blocks that stay resident) is fitted to the peak RSS of real train.py runs
(bench/README.md, "The estimate behind the choice"); tests/test_memory_estimate.py checks the
whole estimate against measured peaks.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# Values per token a block keeps for backward, in units of n_embd (measured, see above).
BLOCK_SAVED = 50
# What a real CPU step holds at its peak beyond the weights and trainer state, per token, by
# (--grad_cp, --cpu_malloc): (per block, outside the blocks) in values of n_embd, and copies of
# the vocabulary-sized logits. Fitted (least squares on the relative error of the whole peak) to
# the peak RSS of 2-step train.py runs over 2-12 layers, n_embd 256-768, ctx 512-1024 and
# vocabularies of 1024 and 65536 (bench/README.md, "The estimate behind the choice"). The kept activations
# (BLOCK_SAVED a block, 1-2 under --grad_cp 1) are part of it; what is above them is the
# backward's temporaries and, with glibc's malloc as it comes, freed blocks kept resident.
# Under --grad_cp 1 --cpu_malloc compact the block inputs vanish in the fit's noise: that peak is
# the recomputed block's or the loss's, whichever is larger, and is the least sure (+-11%).
CPU_STEP = {(0, "default"): (94, 73, 3.5), (1, "default"): (57, 146, 3.5),
            (0, "compact"): (54, 66, 3.0), (1, "compact"): (0, 142, 3.0)}
# With no weight of the blocks training (state tuning alone) a block's linear layers keep no
# input for backward: 0.7x the per-block figure (fitted on 6 layers x 256, ctx 1024).
STATE_ONLY = 0.7
# Logits, their gradient and the loss's slices on a GPU: vocabulary-sized values per token.
LOGIT_COPIES = 2
# Bytes per trainable parameter beyond the weight itself: its fp32 gradient (4), Adam's two
# moments (8) and the optimizer's and ZeRO's temporaries (6: fitted, full training of 35M
# parameters, fp32). In 16 bits DeepSpeed keeps fp32 master weights and gradients besides (+8,
# counted, not measured).
TRAINABLE_BYTES = 18
MARGIN = 0.9  # a setting fits when its estimate is at most this share of the budget


@dataclass(frozen=True)
class StepShape:
    """What sizes a step: the model's shapes and the run's flags."""

    n_layer: int
    n_embd: int
    vocab: int
    sequences: int       # per micro batch (a preference pair is two)
    tokens: int          # per sequence at a time: --chunk_ctx's piece, else --ctx_len
    width: int           # bytes per activation value (--precision)
    trainable: int       # trainable parameters
    trainable_width: int  # bytes per trainable parameter
    block_weights_train: bool  # False for state tuning alone: backward then needs fewer inputs kept


def step_shape(args, model: torch.nn.Module) -> StepShape:
    cfg = model.config
    trainable = [p for p in model.parameters() if p.requires_grad]
    return StepShape(
        n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab=cfg.vocab_size,
        sequences=args.micro_bsz * (1 if args.objective == "sft" else 2),
        tokens=args.chunk_ctx or args.ctx_len,
        width=2 if args.precision in ("bf16", "fp16") else 4,
        trainable=sum(p.numel() for p in trainable),
        trainable_width=trainable[0].element_size() if trainable else 4,
        block_weights_train=any(p.requires_grad and ".blocks." in f".{n}" and not n.endswith("time_state")
                                for n, p in model.named_parameters()))


def trainer_state_bytes(shape: StepShape) -> int:
    """Gradients, Adam's moments and the optimizer's temporaries; fp32 master weights and
    gradients besides when training in 16 bits (DeepSpeed's bf16 optimizer)."""
    return shape.trainable * (TRAINABLE_BYTES + (8 if shape.trainable_width < 4 else 0))


def cpu_step_bytes(shape: StepShape, grad_cp: int, malloc: str) -> int:
    per_block, outside, logit_copies = CPU_STEP[grad_cp, malloc]
    if not shape.block_weights_train:
        per_block *= STATE_ONLY
    per_token = shape.n_embd * (shape.n_layer * per_block + outside) * shape.width + shape.vocab * logit_copies * 4
    return int(shape.sequences * shape.tokens * per_token)


def gpu_step_bytes(shape: StepShape, grad_cp: int) -> int:
    """The caching allocator reuses freed blocks: the saved activations and one block's backward."""
    tokens = shape.sequences * shape.tokens
    kept = shape.n_layer * (BLOCK_SAVED if not grad_cp else 1) + 2 * BLOCK_SAVED
    return tokens * (shape.n_embd * kept * shape.width + shape.vocab * LOGIT_COPIES * 4)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def weights_to_come(model: torch.nn.Module) -> int:
    """Bytes of the model's CPU tensors not yet resident (a memory-mapped checkpoint's pages are
    read in when first used), from /proc/self/pagemap's present bits; the embedding, of which a
    step touches only its tokens' rows, left out. 0 where pagemap cannot be read."""
    storages = {}
    emb = model.emb.weight.untyped_storage().data_ptr()
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "cpu" or type(t) not in (torch.Tensor, torch.nn.Parameter):
            continue  # a quantized weight (a tensor subclass) was made in memory, so it is resident
        if t.untyped_storage().data_ptr() != emb:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    missing = 0
    try:
        with open("/proc/self/pagemap", "rb") as f:
            for ptr, nbytes in storages.items():
                first, last = ptr // PAGE, (ptr + nbytes - 1) // PAGE
                f.seek(first * 8)
                entries = memoryview(f.read((last - first + 1) * 8)).cast("Q")
                missing += sum(1 for e in entries if not e >> 63)
    except OSError:
        return 0
    return missing * PAGE


def cpu_free_bytes() -> int:
    """Memory this process may still take: MemAvailable, or less where a cgroup (v2 or v1)
    limits the memory of this process's group."""
    free = _meminfo("MemAvailable")
    limit = _cgroup_room()
    return free if limit is None else min(free, limit)


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/meminfo")


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup v2 (or v1's limit - usage); None
    without a limit."""
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in groups:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            pairs = [(base / "memory.max", base / "memory.current"),
                     (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"))]
        elif "memory" in controllers.split(","):  # v1
            base = Path("/sys/fs/cgroup/memory")
            pairs = [(base / path.lstrip("/") / "memory.limit_in_bytes", base / path.lstrip("/") / "memory.usage_in_bytes"),
                     (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes")]
        else:
            continue
        for limit_file, usage_file in pairs:
            try:
                limit, usage = limit_file.read_text().strip(), int(usage_file.read_text())
            except (OSError, ValueError):
                continue
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                return max(int(limit) - usage, 0)
            break
    return None


def size_text(n: float) -> str:
    """1.23 GiB, 456 MiB: three significant figures (the memory estimate test reads them back), in
    the binary units --max_memory takes."""
    if n >= 2**30:
        return f"{n / 2**30:.3g} GiB"
    return f"{n / 2**20:.3g} MiB"
