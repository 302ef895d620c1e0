"""Resumable checkpoints: DeepSpeed's engine state (optimizer, trainable weights) per step.

Layout under <proj_dir>/checkpoints/:
    step-00000100/      a complete checkpoint (DeepSpeed files + trainer.json)
    latest              the name of the newest complete checkpoint, written atomically
A checkpoint is written into '.step-N.tmp' and renamed once every rank has finished, so
'latest' only ever names a complete one. The last --keep_last checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import RWKVPeftError
from ..io import atomic_write, write_error
from ..peft.adapt import set_frozen_weight

LATEST = "latest"


@dataclass
class Progress:
    """Where the run stands: the step, the seconds of earlier segments, this segment's number."""

    step: int = 0
    earlier_s: float = 0.0
    segment: int = 1
    started: float = field(default_factory=time.perf_counter)  # this segment's first step

    def elapsed(self) -> float:
        """Seconds of the whole run so far, every segment."""
        return self.earlier_s + time.perf_counter() - self.started


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(engine, proj_dir: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """All ranks call this. Returns the directory of the new checkpoint."""
    root = proj_dir / "checkpoints"
    name = checkpoint_name(step)
    tmp_tag = f".{name}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):  # left by a killed run: this run owns the directory
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"trainer": trainer_state},
                               save_latest=False, exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:  # a full disk: torch reports it as a RuntimeError
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
        raise write_error(root / name, e, f"checkpoint {root / name}") from e
    dist.barrier()
    final = root / name
    if dist.get_rank() == 0:
        state_json = json.dumps(trainer_state, indent=1).encode()
        atomic_write(root / tmp_tag / "trainer.json", lambda f: f.write(state_json))
        shutil.rmtree(final, ignore_errors=True)
        (root / tmp_tag).rename(final)
        atomic_write(root / LATEST, lambda f: f.write(name.encode()))
        complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def find_checkpoint(proj_dir: Path, which: str) -> Path:
    """'latest' -> the checkpoint the latest pointer names; else a checkpoint directory path."""
    if which != "latest":
        path = Path(which)
        if not (path / "trainer.json").is_file():
            raise RWKVPeftError(f"--resume {which}: not a complete checkpoint directory (no trainer.json)")
        return path
    pointer = proj_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        raise RWKVPeftError(f"--resume: nothing to resume in {proj_dir} (no checkpoints/latest); "
                            "start without --resume, or pass --proj_dir of the run to continue")
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise RWKVPeftError(f"--resume: {pointer} names {path.name}, which is incomplete or missing")
    return path


def newest_run(root: Path = Path("out")) -> Path:
    """The run directory under out/ whose latest checkpoint is newest (for a bare --resume)."""
    pointers = sorted(root.glob("*/checkpoints/" + LATEST), key=lambda p: p.stat().st_mtime)
    if not pointers:
        raise RWKVPeftError(f"--resume: no run with checkpoints under {root}/; start without --resume")
    return pointers[-1].parent.parent


def load_checkpoint(engine, path: Path) -> dict:
    """Restore the engine from a checkpoint directory; returns the trainer state saved with it."""
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    if client is None or "trainer" not in client:
        raise RWKVPeftError(f"--resume: {path} holds no trainer state; was it written by train.py?")
    return client["trainer"]


def resume(engine, path: Path, run, global_batch: int, validation) -> Progress:
    """Restore the engine, the frozen weights built from trained tensors and the validation
    record from the checkpoint at path; returns where the run stands."""
    state = load_checkpoint(engine, path)
    if state.get("global_batch") != global_batch:
        raise RWKVPeftError(f"--resume: the checkpoint was trained with a global batch of "
                            f"{state.get('global_batch')} samples, this run has {global_batch}")
    rebuilt = [name for name, method in run.methods.items() if method.frozen_weight_from_tensors]
    base = run.base_weights([f"{name}.weight" for name in rebuilt]) if rebuilt else {}
    with torch.no_grad():  # PiSSA keeps W - B0 A0 frozen; B0, A0 came back with the checkpoint
        for name, method in run.methods.items():
            if method.frozen_weight_from_tensors:
                frozen = method.frozen_weight(base[f"{name}.weight"].float())
                set_frozen_weight(engine.module.get_submodule(name), frozen)
    validation.load_state(state.get("validation"))
    return Progress(state["step"], state.get("elapsed_s", 0.0), state.get("segment", 1) + 1)
