"""What every command shares: one way to end on an error, and the flags several commands take.

`run_command` wraps each entry point (train, merge, chat, eval, run, prepare): a RWKVPeftError
becomes one `error:` line and exit code 2 (its traceback only with --debug), Ctrl-C exit code
130. This module sits at the bottom of the package, so commands at any layer can use it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .errors import RWKVPeftError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def run_command(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run main(argv) and turn how it ends into an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except RWKVPeftError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one message for a run of many processes
            print("stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks; show every option's default, except None: those
    options say in their help what happens when they are left out."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_foreign_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say what an RWKV-PEFT lora_A/lora_B .pth adapter is (it does not record it)."""
    parser.add_argument("--lora_alpha", type=float,
                        help="an RWKV-PEFT LoRA .pth adapter: the alpha it was trained with (the file does not "
                             "record it; RWKV-PEFT's trainer default is 32)")
    parser.add_argument("--pissa_init", metavar="FILE",
                        help="an RWKV-PEFT PiSSA .pth adapter: the init_pissa.pth its run wrote (merged = "
                             "W + B A - B0 A0)")


def add_op_flag(parser: argparse.ArgumentParser) -> None:
    """--op of the inference commands (train.py declares its own in its options)."""
    parser.add_argument("--op", choices=("auto", "cuda", "torch"), default="auto",
                        help="WKV on a GPU: auto (the CUDA kernel when it builds and passes its self-test, else "
                             "PyTorch with one warning line), cuda (the kernel or an error), torch (default: auto)")
