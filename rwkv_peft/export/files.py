"""Writing a directory atomically: it appears complete under its name, or not at all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from ..errors import RWKVPeftError
from ..io import check_writable_dir, remove_stale_temps, temp_path, write_error


def check_new_dir(output: str | os.PathLike, flag: str = "--output") -> Path:
    """An output directory must not exist yet, or be empty (it is never merged into)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        what = "a file" if not output.is_dir() else "a non-empty directory"
        raise RWKVPeftError(f"{flag} {output} is {what}; choose a new directory (nothing is written into an "
                            "existing one)")
    check_writable_dir(output.parent if str(output.parent) else Path("."),
                       lambda d: f"{flag} {output}: {d} is not a writable directory; choose another output path",
                       nearest_existing=True)
    return output


def write_dir_atomic(output: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """fill(tmp) writes every file into a fresh directory beside output, which is then renamed
    to output; on any failure the temporary directory is removed and output is untouched."""
    output = check_new_dir(output)
    tmp = temp_path(output)  # owner-named: one left by a killed process is removed by the next write
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(output.parent, output.name)
        tmp.mkdir()
        fill(tmp)
        for f in tmp.iterdir():  # on disk before the rename makes the directory visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(tmp, output)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(output, e, f"--output {output}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
