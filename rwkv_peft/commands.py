"""The training and merge commands, behind the thin scripts train.py and merge.py and the
installed rwkv-peft-train and rwkv-peft-merge: the top of the package's layers."""

import argparse

from .cli import add_foreign_adapter_flags, run_command
from .train.args import parse_args  # DeepSpeed loads only after the flags parse

TRAIN_HELP = """Fine-tune an RWKV-7 or RWKV-6 model with LoRA, PiSSA, Bone or Bat (or fully), on DeepSpeed.

    python train.py --peft bone --bone_r 64          # the embedded demo: tiny base, chat data
    python train.py --load_model RWKV-x070-World-1.5B.pth --data_file my.jsonl --peft lora --lora_r 32
    python train.py --peft none --train_parts state  # state tuning: only the initial state of every layer
    torchrun --nproc_per_node 4 train.py ...         # or: deepspeed train.py ...
"""

MERGE_HELP = """Fold a trained adapter into a plain RWKV checkpoint that any RWKV runtime loads.

    python merge.py                                   # newest adapter under out/, its recorded base
    python merge.py --base base.pth --adapter out/adapter.safetensors --output merged.pth
    python merge.py --state_only --adapter out/adapter.safetensors --output state.pth   # state tuning
"""


def train(argv=None, prog: str = "train.py") -> int:
    """The training command (train.py, rwkv-peft-train)."""
    return run_command(lambda argv: _train(argv, prog), argv)


def _train(argv, prog: str) -> None:
    args = parse_args(argv, prog=prog, description=TRAIN_HELP)  # --help exits here, before the heavy imports
    from .train.run_settings import given_flags
    from .train.trainer import train as run_training

    run_training(args, given_flags(argv))  # given: what a --resume checks against the run's settings


def merge(argv=None, prog: str = "merge.py") -> int:
    """The merge command (merge.py, rwkv-peft-merge)."""
    return run_command(lambda argv: _merge(argv, prog), argv)


def _merge(argv, prog: str) -> None:
    from .peft.merge import merge_files, newest_adapter, write_state_only

    p = argparse.ArgumentParser(prog=prog, description=MERGE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the base checkpoint, .pth or .safetensors (default: the one the adapter was "
                                  "trained on)")
    p.add_argument("--adapter", help="adapter file: ours (.safetensors) or RWKV-PEFT's (.pth) "
                                     "(default: the newest under out/)")
    p.add_argument("--output", help="merged checkpoint to write, .pth or .safetensors (default: merged.pth beside "
                                    "the adapter)")
    p.add_argument("--no_verify", action="store_true",
                   help="skip running base+adapter and merged on a probe sequence (needs two fp32 copies in RAM)")
    p.add_argument("--state_only", action="store_true",
                   help="write only the learned initial state (--train_parts state) as a state file (default: "
                        "state.pth beside the adapter), to use beside the unchanged base: chat.py --state FILE")
    add_foreign_adapter_flags(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    adapter = args.adapter or newest_adapter("out")
    if args.state_only:
        write_state_only(adapter, args.output, args.base)  # says its own next step
        return
    output = merge_files(args.base, adapter, args.output, verify=not args.no_verify,
                         lora_alpha=args.lora_alpha, pissa_init=args.pissa_init)
    print(f"next: python demo/chat.py --model {output}")
