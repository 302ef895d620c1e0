"""Setting up the process group and the DeepSpeed engine, on GPUs or on the CPU.

One path for every run: a plain `python train.py` is a world of one process (we set the
launcher's variables ourselves, and its process group needs no port); `torchrun` and the
`deepspeed` launcher set them for us and host the rendezvous.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import RWKVPeftError
from ..io import first_line, read_json
from .args import TrainArgs


def set_launcher_env() -> None:
    """Fill in what a launcher would set, for a single process started plainly."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def init_process_group() -> None:
    """The run's process group, set up before anything is decided (the ranks decide the run
    directory together: run_dir.py). A launcher (torchrun, deepspeed) hosts the rendezvous
    of a world of several processes (env://). A world of one needs no network: its group
    meets over an in-process store, so no port is chosen, released and bound again later
    (which let two runs started together take the same port)."""
    if dist.is_initialized():
        return
    set_launcher_env()
    device_for_rank()  # NCCL wants each rank's device set before the group starts
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if int(os.environ["WORLD_SIZE"]) == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)


def destroy_process_group() -> None:
    """The end of the run's process group, through DeepSpeed when it ran: it also forgets the
    groups it keeps, which a second run in the same process would otherwise meet."""
    if not dist.is_initialized():
        return
    import sys

    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def quiet_known_notices() -> None:
    """Hide what says nothing to act on (shown again with --debug): DeepSpeed's notice that it
    chose its CPU accelerator, and a deprecation warning from inside DeepSpeed's all-gather."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # named, so not announced as a fallback
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def import_deepspeed():
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op at start-up
        # (about a minute, every fresh machine). gloo does the same job for us; marking the
        # op unavailable makes DeepSpeed skip the build.
        from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    return deepspeed


def deepspeed_config(args: TrainArgs, world_size: int) -> dict:
    """The DeepSpeed config from the flags; a user's JSON wins where both set a value (the batch
    sizes and precision the run then uses are read back from it: settings.resolve)."""
    stage = int(args.strategy.split("_")[2])
    zero = {"stage": stage, "contiguous_gradients": True, "overlap_comm": torch.cuda.is_available()}
    if args.strategy.endswith("offload"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": args.micro_bsz,
        "gradient_accumulation_steps": args.accumulate_grad_batches,
        "train_batch_size": args.micro_bsz * args.accumulate_grad_batches * world_size,
        "gradient_clipping": args.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": args.precision == "bf16"},
        "fp16": {"enabled": args.precision == "fp16", "initial_scale_power": 12},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if args.deepspeed_config:
        path = Path(args.deepspeed_config)
        user = read_json(path, "--deepspeed_config")
        if not isinstance(user, dict):
            raise RWKVPeftError(f"--deepspeed_config {path} must hold a JSON object")
        if "optimizer" in user or "scheduler" in user:
            raise RWKVPeftError(f"--deepspeed_config {path}: remove 'optimizer'/'scheduler'; the trainer builds "
                                "AdamW and the schedule from --lr_init/--lr_schedule")
        config = _merge(config, user)
        check_with_deepspeed(config, path)
        mb, ga = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
        if config.get("train_batch_size", mb * ga * world_size) != mb * ga * world_size:
            raise RWKVPeftError(f"--deepspeed_config {path}: train_batch_size {config['train_batch_size']} != "
                                f"micro batch {mb} x accumulation {ga} x {world_size} processes")
        config["train_batch_size"] = mb * ga * world_size
    if optimizer_offloaded(config) and not torch.cuda.is_available():
        # on a CPU-only machine the optimizer is on the CPU anyway: torch's AdamW is fine there
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


# DeepSpeed's config classes, by the JSON key of the section each validates
_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
             "DeepSpeedFP16Config": "fp16"}


def check_with_deepspeed(config: dict, path: Path) -> None:
    """A config holding the user's JSON, through DeepSpeed's own validation (its pydantic config
    classes and sanity checks) and the sizes the run reads from it: one line naming the file and
    the key, before anything is written."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise RWKVPeftError(f"--deepspeed_config {path}: {key} must be a positive integer, got {config[key]!r}")
    clip = config.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < float("inf"):
        raise RWKVPeftError(f"--deepspeed_config {path}: gradient_clipping must be a finite number >= 0, got {clip!r}")
    mb, ga = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    try:  # outside a process group DeepSpeed counts one process: the batch size for one
        DeepSpeedConfig({**config, "train_batch_size": mb * ga})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join([_SECTIONS.get(e.title, e.title), *map(str, err["loc"])])
        raise RWKVPeftError(f"--deepspeed_config {path}: {key}: {err['msg']} (got {err.get('input')!r}); "
                            "fix the key or remove it") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise RWKVPeftError(f"--deepspeed_config {path}: DeepSpeed refuses it: {first_line(e)}") from None


def config_precision(config: dict) -> str:
    """The precision a DeepSpeed config trains in."""
    if config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if config.get("fp16", {}).get("enabled") else "fp32"


def param_groups(model, args: TrainArgs) -> list[dict]:
    """Weight decay on trainable matrices only; the decay base (w0 / time_decay) at 2x lr; the
    learned initial state at --state_lr."""
    groups = {"decay": [], "plain": [], "fast": [], "state": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".att.time_state"):
            groups["state"].append(p)
        elif name.endswith((".att.w0", ".att.time_decay")):
            groups["fast"].append(p)
        elif p.dim() >= 2 and args.weight_decay > 0 and not name.endswith(("w1", "w2")):
            groups["decay"].append(p)
        else:
            groups["plain"].append(p)
    spec = {"decay": (1.0, args.weight_decay), "plain": (1.0, 0.0), "fast": (2.0, 0.0),
            "state": (args.state_lr / args.lr_init, 0.0)}
    return [{"params": ps, "lr_scale": spec[k][0], "weight_decay": spec[k][1]} for k, ps in groups.items() if ps]


def optimizer_offloaded(config: dict) -> bool:
    """Whether ZeRO keeps the optimizer state off the GPU: decided by the merged config, so an
    offload asked for in --deepspeed_config counts the same as a *_offload --strategy."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _deepspeed_checkpoint_classes() -> list:
    """The plain data classes DeepSpeed pickles into its checkpoints (checked for ZeRO 1-3,
    fp32/bf16 with torch.serialization.get_unsafe_globals_in_checkpoint). Allowing exactly
    these keeps weights_only=True: nothing else in a checkpoint file can be instantiated."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def make_optimizer(param_groups, args: TrainArgs, device: torch.device, offloaded: bool):
    """AdamW: DeepSpeed's CPU Adam when ZeRO offloads the optimizer from a GPU (built once on
    first use), else torch's (fused on GPUs), which needs no compiled op."""
    betas, eps = (args.beta1, args.beta2), args.adam_eps
    if offloaded and device.type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=args.lr_init, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(param_groups, lr=args.lr_init, betas=betas, eps=eps, fused=device.type == "cuda")


def weights_only_load(path, map_location=None):
    """DeepSpeed's checkpoint loader, without pickle code execution."""
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = first_line(e)
        raise RWKVPeftError(f"checkpoint file {path} could not be loaded safely: {first[:200]}") from None
