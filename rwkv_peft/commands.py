"""The training and merge commands, behind the thin scripts train.py and merge.py and the
installed rwkv-peft-train and rwkv-peft-merge: the top of the package's layers."""

import argparse

from .cli import add_foreign_adapter_flags, command, prog as command_prog, run_command
from .train.args import parse_args  # DeepSpeed loads only after the flags parse

# {train} and {merge}: the commands as this user starts them (cli.command)
TRAIN_HELP = """Fine-tune an RWKV-7 or RWKV-6 model with LoRA, PiSSA, Bone or Bat (or fully), on DeepSpeed.

    {train} --peft bone --bone_r 64          # the embedded demo: tiny base, chat data
    {train} --load_model RWKV-x070-World-1.5B.pth --data_file my.jsonl --peft lora --lora_r 32
    {train} --peft none --train_parts state  # state tuning: only the initial state of every layer
    {torchrun}
"""

MERGE_HELP = """Fold a trained adapter into a plain RWKV checkpoint that any RWKV runtime loads.

    {merge}                                   # newest adapter under out/, its recorded base
    {merge} --base base.pth --adapter out/adapter.safetensors --output merged.pth
    {merge} --state_only --adapter out/adapter.safetensors --output state.pth   # state tuning
    {merge} --format hf                       # a Hugging Face directory (transformers, rwkv7-hf)
    {merge} --format gguf --gguf_type q8_0    # a GGUF file (llama.cpp, Ollama)
    {merge} --format peft                     # the adapter unmerged, as a Hugging Face peft directory
    {merge} --base base.pth --format gguf     # no adapter: convert the checkpoint
"""


def _help(text: str) -> str:
    train = command("train")
    torchrun = ("torchrun --nproc_per_node 4 train.py ...         # or: deepspeed train.py ..."
                if train.startswith("python ") else f"torchrun --no-python --nproc_per_node 4 {train} ...")
    return text.format(train=train, merge=command("merge"), torchrun=torchrun)


def train(argv=None, prog: str | None = None) -> int:
    """The training command (train.py, rwkv-peft-train). Started as a program (argv None), it may
    execute itself again once on jemalloc (train/allocator.py); called with argv, it never does."""
    return run_command(lambda args: _train(args, prog or command_prog("train"), entry=argv is None), argv)


def _train(argv, prog: str, entry: bool) -> None:
    args = parse_args(argv, prog=prog, description=_help(TRAIN_HELP))  # --help exits here, before the heavy imports
    if entry:
        import torch

        from .train.allocator import preload_malloc

        preload_malloc(args, on_gpu=torch.cuda.is_available())
    from .train.run_settings import given_flags
    from .train.trainer import train as run_training

    run_training(args, given_flags(argv))  # given: what a --resume checks against the run's settings


def merge(argv=None, prog: str | None = None) -> int:
    """The merge command (merge.py, rwkv-peft-merge)."""
    return run_command(lambda argv: _merge(argv, prog or command_prog("merge")), argv)


def _merge(argv, prog: str) -> None:
    from .export.run import export_files
    from .peft.merge import newest_adapter, write_state_only

    p = argparse.ArgumentParser(prog=prog, description=_help(MERGE_HELP),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the base checkpoint, .pth or .safetensors (default: the one the adapter was "
                                  "trained on)")
    p.add_argument("--adapter", help="adapter file: ours (.safetensors) or RWKV-PEFT's (.pth), or a Hugging Face "
                                     "peft adapter directory (default: the newest under out/)")
    p.add_argument("--output", help="what to write: .pth, .safetensors, .gguf or a directory (default: merged.pth, "
                                    "merged.gguf, merged-hf/ or peft-adapter/ beside the adapter)")
    p.add_argument("--no_verify", action="store_true",
                   help="skip running base+adapter and merged on a probe sequence (needs two fp32 copies in RAM)")
    p.add_argument("--state_only", action="store_true",
                   help="write only the learned initial state (--train_parts state) as a state file (default: "
                        "state.pth beside the adapter), to use beside the unchanged base: chat --state FILE")
    p.add_argument("--format", help="pth | safetensors | hf (a Hugging Face directory) | gguf (llama.cpp) | peft "
                                    "(the adapter unmerged, a Hugging Face peft directory); default: from --output's "
                                    "name, else pth. With --base and no --adapter: convert the base")
    p.add_argument("--gguf_type", default="f32", help="--format gguf: f32 | f16 | bf16 | q8_0 (default f32)")
    p.add_argument("--tokenizer", default="auto", help="--format hf/gguf: the tokenizer to ship, 'world' or a "
                                                       "tokenizer.json (default: the demo's or World, by vocabulary size)")
    add_foreign_adapter_flags(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    converting = not (args.adapter or args.state_only) and args.base is not None and args.format is not None
    adapter = None if converting else args.adapter or newest_adapter("out")
    if args.state_only:
        write_state_only(adapter, args.output, args.base)  # says its own next step
        return
    output = export_files(args.base, adapter, args.output, args.format, tokenizer=args.tokenizer,
                          gguf_type=args.gguf_type, verify=not args.no_verify,
                          lora_alpha=args.lora_alpha, pissa_init=args.pissa_init)
    if output.endswith((".pth", ".safetensors")):  # the other exports print their own next step
        print(f"next: {command('chat')} --model {output}")
