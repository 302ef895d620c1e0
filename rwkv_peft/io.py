"""Reading tensor files safely, and writing every file atomically.

Checkpoints are PyTorch files (.pth, the official format) or safetensors (.safetensors:
no pickle at all, memory-mapped). Loads never run pickle code (`weights_only=True`: a
checkpoint is untrusted input).

Every file the package writes (lines appended to a log aside) goes through `AtomicFile`:
a temporary file beside the target, flushed to disk, then renamed over it; `atomic_file`
(a `with` block) and `atomic_write` (a callback) are built on it. An interrupted write
never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch

from .errors import RWKVPeftError


CHECKPOINT_SUFFIXES = (".pth", ".safetensors")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_json(path: str | os.PathLike, flag: str):
    """The JSON value in the file a flag names; one line naming the flag when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RWKVPeftError(f"{flag} file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise RWKVPeftError(f"{flag} file {path} is not valid JSON: {e}") from None


def check_checkpoint_suffix(path: str | os.PathLike, flag: str) -> None:
    """A checkpoint to be written must say its format by its name: .pth or .safetensors."""
    if Path(path).suffix not in CHECKPOINT_SUFFIXES:
        raise RWKVPeftError(f"{flag} {path}: unknown checkpoint format '{Path(path).suffix}'; "
                            "name it .pth (PyTorch) or .safetensors")


def load_tensor_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """A dict of tensors from a .safetensors file, or torch.load with weights_only=True
    (memory-mapped when the format allows); clear errors."""
    path = Path(path)
    if not path.exists():
        raise RWKVPeftError(f"{what} not found: {path}")
    if path.is_dir():
        raise RWKVPeftError(f"{what} path is a directory, expected a .pth or .safetensors file: {path}")
    if path.stat().st_size == 0:
        raise RWKVPeftError(f"{what} {path} is empty (0 bytes); re-download or re-create it")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, what)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            # the legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = first_line(e)
        raise RWKVPeftError(
            f"{what} {path} holds Python objects other than tensors and was not loaded "
            f"(weights_only=True refuses code in files: {first[:160]}); "
            "re-save it as a plain dict of tensors") from None
    except Exception as e:  # torch raises many types for damaged files (IndexError, EOFError, ...)
        first = first_line(e)
        raise RWKVPeftError(
            f"{what} {path} is not a readable PyTorch file (truncated or corrupt?): {first[:160]}") from None
    if not isinstance(obj, dict):
        raise RWKVPeftError(f"{what} {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _load_safetensors(path: Path, what: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        first = first_line(e)
        raise RWKVPeftError(f"{what} {path} is not a readable safetensors file (truncated or corrupt?): "
                            f"{first[:160]}") from None


def check_writable_dir(directory: str | os.PathLike, message: Callable[[Path], str] | None = None, *,
                       nearest_existing: bool = False) -> Path:
    """Raise RWKVPeftError unless directory is a writable directory; returns the directory checked.

    nearest_existing: check the nearest ancestor that exists instead (a directory the caller will
    create later). message(checked_dir) is the error text; without it, "output directory does not
    exist: ..." or "output directory is not writable: ...".
    """
    directory = Path(directory)
    if nearest_existing:
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
    if not directory.is_dir():
        raise RWKVPeftError(message(directory) if message else f"output directory does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise RWKVPeftError(message(directory) if message else f"output directory is not writable: {directory}")
    return directory


class AtomicFile:
    """A binary file written under a temporary name beside `path`, for writes that take a while.

    commit() flushes it to disk and renames it over path; discard() drops it. A writer that
    must put several files in place in an order (the last one marks the set complete) holds
    one of these per file and commits them in that order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        directory = check_writable_dir(self.path.parent if str(self.path.parent) else Path("."))
        fd, self._tmp = _create_temp_beside(directory, self.path.name)
        self.file = os.fdopen(fd, "wb")
        self.committed = False

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self._tmp, self.path)
        self.committed = True

    def discard(self) -> None:
        """Remove the temporary file; nothing once committed."""
        if self.committed:
            return
        try:
            self.file.close()
        finally:
            self._tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write in a `with` block: it replaces path when the block ends
    normally; after an exception, path keeps its old content and no temporary file is left."""
    out = AtomicFile(path)
    try:
        yield out.file
        out.commit()
    except BaseException:
        out.discard()
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary file beside path, fsync, then rename it over path."""
    with atomic_file(path) as f:
        write(f)


def _create_temp_beside(directory: Path, name: str) -> tuple[int, Path]:
    """A new file .{name}.<random>.tmp in directory, opened for writing. Created with mode
    0666 so the umask applies as for a plain open() (mkstemp would make it 0600)."""
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def save_tensor_file_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint_file(sd: dict, path: str | os.PathLike, flag: str = "output") -> None:
    """A state dict as a .pth or .safetensors file, by the name's suffix, atomically."""
    check_checkpoint_suffix(path, flag)
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save

        data = save({k: v.detach().to("cpu").contiguous() for k, v in sd.items()})
        atomic_write(path, lambda f: f.write(data))
    else:
        save_tensor_file_atomic(sd, path)
