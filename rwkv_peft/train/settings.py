"""The run's settings, resolved once: every option the user left out decided, in one place.

`resolve` turns the parsed flags into the frozen settings the whole run reads (and args.json
records); nothing after it rewrites them. A resumed run's settings are its own, read back from
its args.json (run_settings.py). What trains follows from them and the PEFT method
registry (`default_method`, `trains_whole_model`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..assets import DEMO_BASE, DEMO_DATA, DEMO_PREFERENCE, DEMO_PROMPTS
from ..errors import RWKVPeftError
from ..peft.methods import METHODS
from .args import LR_INIT, STATE_LR, TrainArgs, default_peft
from .engine import config_precision, deepspeed_config
from .objectives import DEFAULT_BETA, check_objective_args
from .run_dir import choose_proj_dir
from .run_settings import continue_settings

DEMO_LR = 1e-3  # the tiny demo model learns its facts far better at 1e-3 than at LR_INIT


def resolve(args: TrainArgs, world: int, given: frozenset[str] | None = None,
            choose_dir: Callable[[TrainArgs], Path] = choose_proj_dir) -> tuple[TrainArgs, dict]:
    """(the settings with every default decided, the DeepSpeed config) for a run of world processes.

    choose_dir decides the run directory (the trainer's decides once, on rank 0, for every rank).
    --resume takes the run's own settings from its args.json; `given` names the flags of the
    command line (None: those that differ from their defaults), which may change only
    run_settings.RESUME_CHANGES."""
    if args.resume:  # the run to continue, and its settings
        proj_dir = choose_dir(args)
        args = continue_settings(args, proj_dir, given, auto_precision())
    args = _decide_defaults(args)
    config = deepspeed_config(args, world)  # a user's JSON may set the batch sizes and precision
    if args.chunk_ctx and "state" in args.train_parts and config["zero_optimization"]["stage"] == 3:
        # the first piece's state is built from att.time_state outside a forward, where stage 3
        # holds only this process's partition of it
        raise RWKVPeftError("--chunk_ctx with --train_parts state needs ZeRO stage 1 or 2 (stage 3 partitions the "
                            "learned state); use --strategy deepspeed_stage_2, or drop --chunk_ctx")
    if not args.resume:  # decided last: a new default directory is created as it is chosen
        proj_dir = choose_dir(args)
    args = replace(args, proj_dir=str(proj_dir))
    return replace(args, micro_bsz=config["train_micro_batch_size_per_gpu"],
                   accumulate_grad_batches=config["gradient_accumulation_steps"],
                   precision=config_precision(config)), config


def _decide_defaults(args: TrainArgs) -> TrainArgs:
    """Every option left out decided (a resumed run's are decided already, in its args.json)."""
    changes = {}
    if args.data_file is None:  # the embedded demo when no data is named
        if not DEMO_DATA.exists():
            raise RWKVPeftError(f"no --data_file given and the embedded demo data {DEMO_DATA} is missing")
        changes["data_file"] = str({"sft": DEMO_DATA, "grpo": DEMO_PROMPTS}.get(args.objective, DEMO_PREFERENCE))
        if args.load_model is None and not args.n_layer:
            changes["load_model"] = str(DEMO_BASE)
    if args.lr_init is None:
        changes["lr_init"] = DEMO_LR if args.data_file is None else LR_INIT
    changes["peft"] = args.peft or default_peft(args)
    changes["state_lr"] = STATE_LR if args.state_lr is None else args.state_lr
    if args.precision == "auto":
        changes["precision"] = auto_precision()
    if args.beta is None:  # objectives: their defaults (objectives.py)
        changes["beta"] = DEFAULT_BETA.get(args.objective)
    check_objective_args(args)
    args = replace(args, **changes)
    if args.load_model is None and not args.n_layer:
        raise RWKVPeftError("give --load_model FILE to fine-tune, or --n_layer and --n_embd to train from scratch")
    return args


def auto_precision() -> str:
    """--precision auto: bf16 on GPUs, fp32 on CPUs (where bf16 matmuls are slow)."""
    return "bf16" if torch.cuda.is_available() else "fp32"


def default_method(args: TrainArgs) -> tuple[str, dict] | None:
    """The method of the default target layers and its keywords, as its own flags set them."""
    if args.peft not in METHODS:
        return None
    return args.peft, METHODS[args.peft].options(args)


def trains_whole_model(args: TrainArgs, rules: list) -> bool:
    """--peft full, or --peft none with nothing else named: every weight trains."""
    if args.peft == "full" and rules:
        raise RWKVPeftError("--peft full trains every weight, so --peft_rules cannot apply; drop one of them")
    return args.peft == "full" or (args.peft == "none" and not rules and not args.train_parts)
