"""A run never writes over what it reads: the files train.py writes into --proj_dir, checked
against every file it reads, before anything is loaded.

Files are compared by device and inode (rwkv_peft.io.check_not_inputs), so a symlink, a hard
link or another spelling of an input is that input. The names follow outputs.py (weights,
records) and checkpoint.py (checkpoints/); base.pth, written only when it does not exist yet,
never replaces anything.
"""

from __future__ import annotations

from pathlib import Path

from ..data.binidx import binidx_paths
from ..errors import RWKVPeftError
from ..io import check_not_inputs
from .args import TrainArgs

RECORDS = ("args.json", "metrics.jsonl", "summary.json", "loss.png")
DIRECTORIES = ("checkpoints", "adapters", "tensorboard", "wandb")  # written and pruned as a whole


def run_outputs(proj_dir: Path, full: bool, model_format: str) -> list[Path]:
    """The files a run writes into proj_dir (besides those in DIRECTORIES)."""
    weights = (f"model.{model_format}", f"model-best.{model_format}") if full else (
        "adapter.safetensors", "adapter-best.safetensors")
    return [proj_dir / name for name in (*RECORDS, *weights)]


def run_inputs(args: TrainArgs) -> dict:
    """Every file the run reads, by the flag that names it."""
    inputs = {"--load_model": args.load_model, "--deepspeed_config": args.deepspeed_config}
    for flag, data in (("--data_file", args.data_file), ("--val_file", args.val_file)):
        if data:
            inputs[flag] = [data, *binidx_paths(data)] if args.data_type == "binidx" or not Path(data).exists() \
                else [data]
    for flag, value in (("--tokenizer", args.tokenizer), ("--peft_rules", args.peft_rules)):
        if value and Path(value).is_file():
            inputs[flag] = value
    return inputs


def check_run_outputs(args: TrainArgs, full: bool) -> None:
    """Refuse a --proj_dir whose outputs include an input, or where an output's name is taken by a
    directory; before any work, so nothing is written."""
    proj_dir = Path(args.proj_dir)
    outputs = run_outputs(proj_dir, full, args.model_format)
    check_not_inputs([(f"--proj_dir {proj_dir}: the run's {p.name}", p) for p in outputs], run_inputs(args),
                     {f"the run in --proj_dir {proj_dir} ({name}/)": proj_dir / name for name in DIRECTORIES})
    for path in outputs:
        if path.is_dir():
            raise RWKVPeftError(f"--proj_dir {proj_dir}: {path} is a directory, where the run writes its {path.name}; "
                                "move it away or choose another --proj_dir")
