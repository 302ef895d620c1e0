"""Reading tensor files safely, and writing every file atomically, over no input.

Checkpoints are PyTorch files (.pth, the official format) or safetensors (.safetensors:
no pickle at all, memory-mapped). Loads never run pickle code (`weights_only=True`: a
checkpoint is untrusted input), and refuse a floating-point tensor holding NaN or Inf,
naming it (`check_finite`: one pass over the values, cheap next to reading them).

Every file the package writes (lines appended to a log aside) goes through `AtomicFile`:
a temporary file beside the target, flushed to disk, then renamed over it; `atomic_file`
(a `with` block) and `atomic_write` (a callback) are built on it. An interrupted write
never leaves a half-written file under the real name, and the previous complete file stays:
- an operating-system failure (disk full, file-size limit, no permission, a directory
  where the file should be, ...) becomes one RWKVPeftError naming the path and what to do
  (`write_error`), and the temporary file is removed, as on any exception, Ctrl-C included
  (and SIGTERM, which the commands turn into the same: cli.run_command);
- temporary files are named `.NAME.<host>-<pid>-<random>.tmp`, so that one left by a
  process killed outright (SIGKILL, power loss) is recognised as stale once that process
  is gone, and removed by the next write beside it (`remove_stale_temps`).

Before the long work, a command checks what it can: `check_output_file` (not a directory,
its directory exists and is writable, room for the expected size) and `check_not_inputs`
(no output is one of the command's inputs: the same file by device and inode, so symlinks,
hard links and spellings such as ./x and x are recognised).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import pickle
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

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
    except IsADirectoryError:
        raise RWKVPeftError(f"{flag} {path} is a directory, expected a JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RWKVPeftError(f"{flag} file {path} cannot be read: {first_line(e)}") from None
    except json.JSONDecodeError as e:
        raise RWKVPeftError(f"{flag} file {path} is not valid JSON: {e}") from None


def check_checkpoint_suffix(path: str | os.PathLike, flag: str) -> None:
    """A checkpoint to be written must say its format by its name: .pth or .safetensors."""
    if Path(path).is_dir():
        raise RWKVPeftError(f"{flag} {path} is a directory; name a file (e.g. {Path(path) / 'merged.pth'})")
    if Path(path).suffix not in CHECKPOINT_SUFFIXES:
        raise RWKVPeftError(f"{flag} {path}: unknown checkpoint format '{Path(path).suffix}'; "
                            "name it .pth (PyTorch) or .safetensors")


# ---------------------------------------------------------------------------------------------
# non-finite values


_FINITE_CHUNK = 1 << 22  # elements looked at a time: no temporary beyond two numbers, and fast


def first_non_finite(t: torch.Tensor) -> tuple[int, float] | None:
    """(flat index, value) of the first NaN or Inf in a floating-point tensor, else None.

    One pass, no copy: a chunk's minimum and maximum are both finite exactly when all its values
    are (min and max propagate NaN); only a chunk that fails is searched."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        try:
            lo, hi = torch.aminmax(chunk)
        except (RuntimeError, NotImplementedError):  # a dtype without aminmax (float8)
            lo, hi = torch.aminmax(chunk.float())
        if torch.isfinite(lo) and torch.isfinite(hi):
            continue
        bad = (~torch.isfinite(chunk)).nonzero()
        if len(bad):
            i = int(bad[0])
            return start + i, float(chunk[i])
    return None


def check_finite(tensors: Mapping[str, object], what: str, fix: str | None = None) -> None:
    """Refuse a floating-point tensor holding NaN or Inf: one line naming what holds it (a file) and
    the tensor; fix: what to do (default: for a file)."""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        found = first_non_finite(t)
        if found is not None:
            index, value = found
            where = list(torch.unravel_index(torch.tensor(index), t.shape)) if t.dim() else []
            count = int((~torch.isfinite(t)).sum())
            raise RWKVPeftError(
                f"{what}: tensor '{key}' holds {value} at {[int(i) for i in where]} ({count} of its {t.numel()} "
                "values are NaN or Inf); "
                + (fix or "the file is damaged or came from a run that diverged: use another copy"))


# ---------------------------------------------------------------------------------------------
# outputs are never inputs


def _identity(path: str | os.PathLike) -> tuple:
    """What makes two paths one file: (device, inode) when it exists (symlinks followed), else its
    resolved spelling."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_not_inputs(outputs: Mapping[str, str | os.PathLike | None] | Iterable[tuple[str, str | os.PathLike]],
                     inputs: Mapping[str, str | os.PathLike | Iterable | None],
                     output_dirs: Mapping[str, str | os.PathLike] | None = None) -> None:
    """Refuse an output that is one of the inputs (labels are how the user named them: "--output";
    outputs: by label, or (label, path) pairs).

    Files are compared by device and inode, so a symlink, a hard link or another spelling of an
    input is that input. output_dirs: directories whose whole contents the command writes or
    deletes: an input inside one is refused too.
    """
    named = []
    for label, given in inputs.items():
        for path in ([given] if isinstance(given, (str, os.PathLike)) else list(given or ())):
            if path is not None and str(path):
                named.append((label, path))
    ids = [(label, path, _identity(path)) for label, path in named]
    for out_label, out in (outputs.items() if isinstance(outputs, Mapping) else outputs):
        if out is None:
            continue
        out_id = _identity(out)
        for label, path, in_id in ids:
            if out_id == in_id:
                same = "" if str(out) == str(path) else f" ({path})"
                raise RWKVPeftError(f"{out_label} {out} is the same file as {label}{same}: writing it would "
                                    f"replace that input; choose another output path")
    for dir_label, directory in (output_dirs or {}).items():
        root = os.path.realpath(directory)
        for label, path in named:
            real = os.path.realpath(path)
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                raise RWKVPeftError(f"{label} {path} lies in {directory}, which {dir_label} writes and prunes; "
                                    "move the input out of it or choose another output")


# ---------------------------------------------------------------------------------------------
# checks before the long work


def check_writable_dir(directory: str | os.PathLike, message: Callable[[Path], str] | None = None, *,
                       nearest_existing: bool = False) -> Path:
    """Raise RWKVPeftError unless directory is a writable directory; returns the directory checked.

    nearest_existing: check the nearest ancestor that exists instead (a directory the caller will
    create later). message(checked_dir) is the error text; without it, "output directory does not
    exist: ..." or "output directory is not writable: ...".
    """
    directory = Path(directory) if str(directory) else Path(".")
    if nearest_existing:
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
    if not directory.is_dir():
        raise RWKVPeftError(message(directory) if message else
                            f"output directory {directory} does not exist (or is not a directory); "
                            "create it or choose another path")
    if not os.access(directory, os.W_OK):
        raise RWKVPeftError(message(directory) if message else
                            f"output directory {directory} is not writable; choose another path")
    return directory


def check_output_file(path: str | os.PathLike, what: str | None = None, *, size: int | None = None) -> Path:
    """Before the long work: path can be written as a file. It is not a directory or a device, its
    directory exists and is writable, and (size: the bytes it will take) the disk has room for it
    beside the file it replaces. what: how messages name it ("--output merged.pth"; default: the
    path). Returns path."""
    path = Path(path)
    shown = what or str(path)
    if path.is_dir():
        raise RWKVPeftError(f"{shown} is a directory; name a file to write (in it or elsewhere)")
    if path.exists() and not path.is_file():
        raise RWKVPeftError(f"{shown} exists and is not a regular file; choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise RWKVPeftError(f"{shown}: directory {parent} does not exist; create it (mkdir -p {parent}) "
                            "or choose another path")
    check_writable_dir(parent, lambda d: f"{shown}: {d} is not a writable directory; choose another path")
    if size is not None:
        check_free_space(parent, size, shown)
    return path


def check_free_space(directory: str | os.PathLike, size: int, what: str) -> None:
    """Refuse when the file system of directory has less than size bytes free (and says how much it has)."""
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return
    if usage.total and usage.free < size:
        raise RWKVPeftError(f"{what} needs about {_mb(size)} but the disk of {directory} has {_mb(usage.free)} "
                            "free; free some space or write to another disk")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


# ---------------------------------------------------------------------------------------------
# operating-system failures, in one line


def write_error(path: str | os.PathLike, e: BaseException, what: str | None = None,
                hint: str | None = None) -> RWKVPeftError:
    """The RWKVPeftError for a failed write of path: what happened, and what to do.

    what: how to name the file ("--output merged.pth", "token cache ..."; default: the path).
    hint: what else the user can do (e.g. another flag). Errors without an errno (some libraries
    report a full disk only as a short write) are judged by the space left on the disk.
    """
    path = Path(path)
    what = what or str(path)
    code = e.errno if isinstance(e, OSError) else None
    parent = path.parent if str(path.parent) else Path(".")
    if code is None:
        try:
            if shutil.disk_usage(_existing(parent)).free < 2**20:
                code = errno.ENOSPC
        except OSError:
            pass
    extra = f", or {hint}" if hint else ""
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        text = (f"no space left on the disk of {parent} while writing {what}: free some space or write to "
                f"another disk{extra}")
    elif code == errno.EFBIG:
        text = (f"{what} grew past the largest file allowed here (ulimit -f or the file system's limit): "
                f"raise the limit or write to another disk{extra}")
    elif code == errno.EISDIR:
        text = f"{what} is a directory; name a file to write{extra}"
    elif code in (errno.ENOENT, errno.ENOTDIR):
        text = f"cannot write {what}: directory {parent} does not exist; create it or choose another path{extra}"
    elif code in (errno.EACCES, errno.EPERM):
        text = f"cannot write {what}: permission denied in {parent}; choose a writable directory{extra}"
    elif code == errno.EROFS:
        text = f"cannot write {what}: {parent} is on a read-only file system; choose another path{extra}"
    elif code == errno.ENAMETOOLONG:
        text = f"cannot write {what}: the name is too long for the file system; choose a shorter one{extra}"
    else:
        text = f"cannot write {what}: {first_line(e)}{extra}"
    if code == errno.EISDIR:
        return RWKVPeftError(text)
    return RWKVPeftError(f"{text} (the previous {path.name} is kept)" if path.exists() else
                         f"{text} (nothing was written)")


def _existing(directory: Path) -> Path:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log file (metrics.jsonl); a failure is one RWKVPeftError naming it."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise write_error(path, e) from None


# ---------------------------------------------------------------------------------------------
# temporary files: named by their owner, removed when it is gone


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\.(?P<name>.*)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
_MAX_NAME = 180  # of the target's name in a temporary name: the whole stays within 255 bytes


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh temporary name beside target: .NAME.<host>-<pid>-<random>.tmp (see remove_stale_temps)."""
    target = Path(target)
    return target.with_name(f".{target.name[:_MAX_NAME]}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, alive
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files (or directories) in directory that a process of this machine left
    when it was killed (its pid is gone), those for target name only when given; returns them."""
    directory = Path(directory) if str(directory) else Path(".")
    pattern = f".{glob.escape(name[:_MAX_NAME])}.*.tmp" if name else ".*.tmp"
    removed = []
    try:
        candidates = list(directory.glob(pattern))
    except OSError:
        return removed
    for p in candidates:
        m = _TEMP.match(p.name)
        if not m or m["host"] != _HOST or (name is not None and m["name"] != name[:_MAX_NAME]):
            continue
        if _alive(int(m["pid"])):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


class _TrackedFileIO(io.FileIO):
    """A raw file that remembers the last OSError of a write: libraries that write through it
    (torch.save) may report a full disk as some other error; this keeps the real cause."""

    error: OSError | None = None

    def write(self, b):
        try:
            return super().write(b)
        except OSError as e:
            self.error = e
            raise


class AtomicFile:
    """A binary file written under a temporary name beside `path`, for writes that take a while.

    commit() flushes it to disk and renames it over path; discard() drops it. A writer that
    must put several files in place in an order (the last one marks the set complete) holds
    one of these per file and commits them in that order. Write through write() (or .file,
    converting its errors with error()): failures are RWKVPeftError naming the file.
    what / hint: how messages name the file, and what else the user can do (see write_error).
    """

    def __init__(self, path: str | os.PathLike, what: str | None = None, hint: str | None = None):
        self.path = Path(path)
        self.what, self.hint = what, hint
        self.committed = False
        self._tmp = None
        check_output_file(self.path, what)
        directory = self.path.parent if str(self.path.parent) else Path(".")
        remove_stale_temps(directory, self.path.name)
        while True:
            tmp = temp_path(self.path)
            try:
                # mode 0666 so the umask applies as for a plain open() (mkstemp would make it 0600)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise write_error(self.path, e, what, hint) from None
        self._tmp = tmp
        self._raw = _TrackedFileIO(fd, "wb", closefd=True)
        self.file = io.BufferedWriter(self._raw)

    def write(self, data) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            self.discard()
            raise write_error(self.path, e, self.what, self.hint) from None

    def error(self, e: BaseException) -> BaseException:
        """The exception to raise for e, raised while writing: a RWKVPeftError naming the file for an
        operating-system failure (also one a library reported as another error), the interruption
        (KeyboardInterrupt, SystemExit) a library's cleanup replaced with an error of its own
        (torch.save does), else e itself."""
        chain, cause = [], e
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__context__
        for cause in chain:
            if not isinstance(cause, Exception):
                return cause
        if isinstance(e, RWKVPeftError):
            return e
        for cause in chain:
            if isinstance(cause, OSError):
                return write_error(self.path, cause, self.what, self.hint)
        if self._raw.error is not None:
            return write_error(self.path, self._raw.error, self.what, self.hint)
        return e

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.discard()
            raise write_error(self.path, self._raw.error or e, self.what, self.hint) from None
        self.committed = True

    def discard(self) -> None:
        """Remove the temporary file; nothing once committed."""
        if self.committed or self._tmp is None:
            return
        try:
            self.file.close()
        except OSError:  # the failed flush of a full disk: the file goes anyway
            try:
                self._raw.close()
            except OSError:
                pass
        finally:
            try:
                self._tmp.unlink(missing_ok=True)
            except OSError:
                pass


@contextmanager
def atomic_file(path: str | os.PathLike, what: str | None = None, hint: str | None = None) -> Iterator[BinaryIO]:
    """A binary file to write in a `with` block: it replaces path when the block ends
    normally; after an exception (Ctrl-C included), path keeps its old content and no
    temporary file is left; an operating-system failure is one RWKVPeftError naming path."""
    out = AtomicFile(path, what, hint)
    try:
        yield out.file
    except BaseException as e:
        out.discard()
        converted = out.error(e)
        if converted is e:
            raise
        raise converted from None
    out.commit()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], what: str | None = None,
                 hint: str | None = None) -> None:
    """Call write(file) on a temporary file beside path, fsync, then rename it over path."""
    with atomic_file(path, what, hint) as f:
        write(f)


def load_tensor_file(path: str | os.PathLike, what: str = "checkpoint", *, finite: bool = True) -> dict:
    """A dict of tensors from a .safetensors file, or torch.load with weights_only=True
    (memory-mapped when the format allows); clear errors. finite: refuse a floating-point
    tensor holding NaN or Inf, naming it (check_finite)."""
    sd = _load_tensor_file(Path(path), what)
    if finite:
        check_finite(sd, f"{what} {path}")
    return sd


def _load_tensor_file(path: Path, what: str) -> dict:
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


def save_tensor_file_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint_file(sd: dict, path: str | os.PathLike, flag: str = "output") -> None:
    """A state dict as a .pth or .safetensors file, by the name's suffix, atomically."""
    check_checkpoint_suffix(path, flag)
    what = f"{flag} {path}" if flag.startswith("--") else None
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save

        data = save({k: v.detach().to("cpu").contiguous() for k, v in sd.items()})
        atomic_write(path, lambda f: f.write(data), what)
    else:
        atomic_write(path, lambda f: torch.save(sd, f), what)


def tensor_bytes(sd: Mapping[str, torch.Tensor]) -> int:
    """The bytes of every tensor of sd: about what a checkpoint file of them takes on disk."""
    return sum(t.numel() * t.element_size() for t in sd.values() if isinstance(t, torch.Tensor))
