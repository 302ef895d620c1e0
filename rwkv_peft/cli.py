"""What every command shares: one way to end on an error, and the flags several commands take.

`run_command` wraps each entry point (train, merge, chat, eval, run, prepare): a RWKVPeftError
becomes one `error:` line and exit code 2 (its traceback only with --debug), Ctrl-C exit code
130, and SIGTERM (what `kill`, a job scheduler or a launcher sends) the same as Ctrl-C: the
exception unwinds the command, so a file being written is removed, not left half-written.
This module sits at the bottom of the package, so commands at any layer can use it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable, Sequence

from .errors import RWKVPeftError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def run_command(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run main(argv) and turn how it ends into an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _sigterm_as_interrupt():
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
