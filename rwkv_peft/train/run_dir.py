"""The run directory: decided once for all ranks, and held by one run at a time.

    on_rank0(fn)      fn runs on rank 0 alone; every rank gets its result (or stops on its error)
    RunDirectory      where the run writes: the directory chosen (a new out/run-<time> is
                      created at once, so that no other run takes the name), the lock held
                      for the whole run, and what to remove when the run ends with nothing in it
    resume_command    the command line that continues the run, as it was started

The lock is <proj_dir>/run.lock, held with flock(2) while the run lives. The kernel lets go
of it however the owner ends (a crash, SIGKILL, a lost node's NFS lease), so a run.lock that
nobody holds is stale by definition and the next run takes it over: a crashed run's
directory resumes without any cleanup. The file names its owner (host, pid, start time,
command) for the one line a second run gets.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ..cli import EXIT_ERROR
from ..errors import RWKVPeftError
from .checkpoint import LATEST, newest_run

LOCK = "run.lock"
RUNS_ROOT = Path("out")  # where runs without --proj_dir go


def on_rank0(fn):
    """fn() on rank 0 only, its result on every rank: one decision for the whole run. When fn
    fails on rank 0, rank 0 raises its error (one message) and the other ranks exit quietly."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    outcome, error = [None], None
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", fn())]
        except BaseException as e:  # noqa: BLE001 - the other ranks must hear of any failure
            outcome, error = [("failed", None)], e
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    kind, value = outcome[0]
    if kind != "ok":
        raise SystemExit(EXIT_ERROR)  # rank 0 says why
    return value


def choose_proj_dir(args, claim: bool = False) -> Path:
    """Where the run writes: --proj_dir; for --resume without it, the run to continue (the newest
    under out/, or the run of the checkpoint named); else a new out/run-<time>. claim: create
    that new directory now, the first free name of run-<time>, run-<time>-2, ..."""
    if args.proj_dir:
        return Path(args.proj_dir)
    if args.resume == "latest":
        return newest_run(RUNS_ROOT)
    if args.resume:  # a checkpoint directory: <run>/checkpoints/step-N
        return Path(args.resume).parent.parent
    name = time.strftime("run-%Y%m%d-%H%M%S")
    return _claim(RUNS_ROOT, name) if claim else RUNS_ROOT / name


def _claim(root: Path, name: str) -> Path:
    for k in range(1, 1000):
        path = root / (name if k == 1 else f"{name}-{k}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            path.mkdir()  # exclusive: two runs started in the same second get two directories
            return path
        except FileExistsError:
            continue
        except FileNotFoundError:  # another run removed an empty out/ in between: again
            continue
        except OSError as e:
            raise RWKVPeftError(f"cannot create the run directory {path} ({e.strerror}); "
                                "choose a writable --proj_dir") from None
    raise RWKVPeftError(f"{root}/{name}-*: no free run directory name; choose a --proj_dir")


class RunDirectory:
    """The run's hold on its directory, from the decision to the end of the run. Every rank
    makes one; rank 0 does the work. Use as a context manager: leaving it gives the
    directory back, and removes the directories this run created if they are still empty
    (a run that failed on its inputs leaves nothing behind)."""

    def __init__(self):
        self.created: list[Path] = []  # directories this run made, parents before children
        self.lock: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def choose(self, args) -> Path:
        """choose_proj_dir, decided on rank 0 for every rank. A new default directory is created
        at once (not for --dry_run, which writes nothing)."""
        def decide():
            created_root = not RUNS_ROOT.exists()
            path = choose_proj_dir(args, claim=not args.dry_run)
            if path.exists() and not args.proj_dir and not args.resume and not args.dry_run:
                self.created += [RUNS_ROOT] * created_root + [path]
            return path

        return Path(on_rank0(decide))

    def hold(self, proj_dir: Path, resuming: bool, log=print) -> None:
        """Take the directory for this run (rank 0; every rank learns the outcome): refused while
        another run holds it, and for a new run where a run is saved already."""
        on_rank0(lambda: self._hold(Path(proj_dir), resuming, log))

    def _hold(self, proj_dir: Path, resuming: bool, log) -> None:
        self._make_dirs(proj_dir)
        path = proj_dir / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise RWKVPeftError(f"cannot create {path} ({e.strerror}); choose a writable --proj_dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _describe(_read_owner(fd))
                os.close(fd)
                raise RWKVPeftError(f"--proj_dir {proj_dir} is in use by another run ({owner}); wait for it to "
                                    "end or stop it, or choose another --proj_dir") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log(f"note: {proj_dir} is on a file system without file locks; nothing stops a second run "
                    "from writing into it")
            if _same_file(fd, path):
                break
            os.close(fd)  # its last owner removed the file as it ended: lock the one at path now
        self._fd, self.lock = fd, path
        if not resuming and (proj_dir / "checkpoints" / LATEST).is_file():
            raise RWKVPeftError(f"--proj_dir {proj_dir} already holds a run (its checkpoints/latest is "
                                f"{(proj_dir / 'checkpoints' / LATEST).read_text().strip()}); continue it with "
                                "--resume, or choose another --proj_dir for a new run")
        previous = _read_owner(fd, tries=1)
        if previous:
            log(f"note: {proj_dir} was left locked by a run that is gone ({_describe(previous)}); taking it over")
        command = ["python", *sys.argv] if sys.argv and sys.argv[0].endswith(".py") else sys.argv
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": shlex.join(command), "processes": int(os.environ.get("WORLD_SIZE", 1))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode() + b"\n", 0)

    def _make_dirs(self, proj_dir: Path) -> None:
        missing = []
        d = proj_dir
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise RWKVPeftError(f"--proj_dir {proj_dir} cannot be created ({e.strerror} at {d}); "
                                    "choose another --proj_dir") from None
            self.created.append(d)

    def release(self) -> None:
        """Give the directory back: remove run.lock (while still holding it), then let go of it."""
        if self._fd is not None:
            try:
                self.lock.unlink()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        for d in reversed(self.created):
            try:
                d.rmdir()  # only while empty: a run that wrote something keeps its directory
            except OSError:
                pass
        self.created = []


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_owner(fd: int, tries: int = 10) -> dict | None:
    """The owner a lock file names; a run that has just taken it may not have written it yet."""
    for attempt in range(tries):
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"null")
            if isinstance(owner, dict):
                return owner
        except (OSError, ValueError):
            pass
        if attempt + 1 < tries:
            time.sleep(0.1)
    return None


def _describe(owner: dict | None) -> str:
    if not owner:
        return "its owner has not written its name yet"
    processes = owner.get("processes", 1)
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}: "
            f"{owner.get('command', '?')}" + (f", rank 0 of {processes} processes" if processes != 1 else ""))


def resume_command(proj_dir: Path, *extra: str) -> str | None:
    """The command that continues the run in proj_dir, started as this one was: `python
    train.py` (or the installed command), under torchrun when it ran on several processes.
    None for a run over several machines, which only its own launcher can start again."""
    script = sys.argv[0] if sys.argv else ""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world > local:
        return None
    python = not os.path.basename(script).startswith("rwkv-peft-")  # else the installed command
    if python and not script.endswith(".py"):  # called from Python, not from a command line
        script = "train.py"
    head = ["python", script] if python else [os.path.basename(script)]
    if world > 1:  # --standalone: torchrun finds a free port itself
        head = ["torchrun", "--standalone", f"--nproc_per_node={world}", *(head[1:] if python else
                                                                              ["--no-python", *head])]
    return shlex.join([*head, "--resume", "--proj_dir", str(proj_dir), *map(str, extra)])


def resume_hint(proj_dir: Path, *extra) -> str:
    """The line that says how to continue the run: a command that works exactly as printed."""
    command = resume_command(proj_dir, *extra)
    if command is None:  # several machines: only the launcher that started them can again
        return f"continue: the same launch command with --resume --proj_dir {proj_dir} {' '.join(map(str, extra))}"
    return f"next: {command}"
