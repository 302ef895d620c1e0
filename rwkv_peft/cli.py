"""What every command shares: one way to end on an error, and the flags several commands take.

`run_command` wraps each entry point (train, merge, chat, eval, run, prepare): a RWKVPeftError
becomes one `error:` line and exit code 2 (its traceback only with --debug), Ctrl-C exit code
130, and SIGTERM (what `kill`, a job scheduler or a launcher sends) the same as Ctrl-C: the
exception unwinds the command, so a file being written is removed, not left half-written.
This module sits at the bottom of the package, so commands at any layer can use it.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from .errors import RWKVPeftError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

# How each command is started from a source checkout; installed by pip, it is rwkv-peft-<name>
# (pyproject.toml's [project.scripts]) and the checkout's scripts do not exist.
CHECKOUT_PROGS = {"train": "train.py", "merge": "merge.py", "chat": "demo/chat.py",
                  "eval": "python -m rwkv_peft.eval", "run": "python -m rwkv_peft.run"}


def _installed_command() -> bool:
    """Whether the user started an installed console script (rwkv-peft-train, ...)."""
    return Path(sys.argv[0]).name.startswith("rwkv-peft-")


def prog(name: str) -> str:
    """The program name --help and usage errors show for command `name`: as the user started it."""
    return f"rwkv-peft-{name}" if _installed_command() else CHECKOUT_PROGS[name]


def command(name: str) -> str:
    """How the user starts command `name`, for "next:" hints: the installed rwkv-peft-<name> when
    they started an installed command or have no checkout, else the checkout's script."""
    checkout = (Path(__file__).resolve().parent.parent / "train.py").is_file()
    if _installed_command() or not checkout:
        return f"rwkv-peft-{name}"
    script = CHECKOUT_PROGS[name]
    return script if script.startswith("python ") else f"python {script}"


def run_command(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run main(argv) and turn how it ends into an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _sigterm_as_interrupt():
            return main(argv) or 0
    except RWKVPeftError as e:
        if "--debug" in argv:
            raise
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":  # one message for a run of many processes
            print("stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _close_progress_bars() -> None:
    """Close the tqdm bars still drawn (a bar's line ends with no newline), so that what follows
    starts on its own line instead of being glued to the bar."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


class _sigterm_as_interrupt:
    """SIGTERM raises KeyboardInterrupt while the command runs (where SIGTERM would otherwise end
    the process at once: its default action), so that it unwinds as Ctrl-C does."""

    def __enter__(self):
        self._old = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            self._old = signal.signal(signal.SIGTERM, self._interrupt)
        return self

    @staticmethod
    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


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


# Ranges of numeric flags: each says what is wrong with a value, or None when it is fine. A
# flag declares its own (train/args.py, peft/methods.py, the inference commands' parsers).
def positive(v) -> str | None:
    return None if v > 0 else "must be positive"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must not be negative"


def fraction(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def value_problem(value, check: Callable | None) -> str | None:
    """What is wrong with a numeric flag's value: not finite, beyond a 64-bit integer, or out of
    its range (check); None when it is fine or not given."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and abs(value) >= 2**62:
        return "is too large"
    return check(value) if check else None


class checked:
    """An argparse type for a checked flag: the text as kind; parse_checked (below) then checks the
    value with value_problem(value, check)."""

    def __init__(self, kind: type, check: Callable | None = None):
        self.kind, self.check = kind, check
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value"

    def __call__(self, text: str):
        return self.kind(text)


def parse_checked(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """parser.parse_args(argv), then every `checked` flag's value checked: one error line naming the flag."""
    args = parser.parse_args(argv)
    for action in parser._actions:
        if isinstance(action.type, checked):
            value = getattr(args, action.dest)
            problem = value_problem(value, action.type.check)
            if problem:
                raise RWKVPeftError(f"{action.option_strings[0]} {problem}, got {value}")
    return args


def usable_device(name: str) -> str | None:
    """What keeps a --device from being used here (a check for `checked`), None if it can be."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return "must be cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "must be cpu: torch sees no CUDA GPU here"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"must name one of the {torch.cuda.device_count()} GPU(s) here (cuda:0, ...)"
    return None if device.type in ("cpu", "cuda") else "must be cpu, cuda or cuda:N"
