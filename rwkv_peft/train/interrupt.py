"""Stopping a run cleanly: Ctrl-C / SIGTERM saves at the next step boundary, and losing the
terminal or the pipe that reads our output never ends a run.

`python train.py 2>&1 | tee log`, then Ctrl-C: the terminal signals tee too, tee exits first,
and the next progress-bar write would raise BrokenPipeError in the middle of the loop, before
the checkpoint is written. Output streams are therefore wrapped so that a write to a reader
that is gone is dropped instead of raised.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager


class StopRequest:
    """The first Ctrl-C (or SIGTERM) asks the loop to save and stop at the next step boundary;
    a second one interrupts at once. Saving mid-step could store half-updated weights.

    Signals within SAME_PRESS_S of the first count as the same Ctrl-C: torchrun and the
    deepspeed launcher forward the terminal's signal to workers that received it already."""

    SAME_PRESS_S = 2.0

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce  # one message for the whole run: rank 0's
        self._first = 0.0

    def _handler(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first < self.SAME_PRESS_S:
                return
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        if self.announce:
            print("\nstopping after this step (press Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


class ReaderlessSafeStream:
    """A text stream whose writes never raise because the reader went away: from the first
    failed write on, output is dropped (and the file descriptor pointed at /dev/null, so that
    the interpreter's flush at exit finds somewhere to write too)."""

    _GONE = (BrokenPipeError, ConnectionResetError, ValueError, OSError)

    def __init__(self, stream):
        self._stream = stream
        self._gone = False

    def write(self, text):
        if not self._gone:
            try:
                return self._stream.write(text)
            except self._GONE:
                self._drop()
        return len(text)

    def flush(self):
        if not self._gone:
            try:
                self._stream.flush()
            except self._GONE:
                self._drop()

    def _drop(self):
        self._gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def survive_lost_output():
    """Within it, sys.stdout and sys.stderr are wrapped so that printing can never end the run."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, ReaderlessSafeStream) else ReaderlessSafeStream(s)
                              for s in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
