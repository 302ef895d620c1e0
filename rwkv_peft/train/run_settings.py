"""A resumed run's settings: the run's own, from the args.json it wrote, with only the
documented changes.

`--resume` continues a run as it was set up: its method, ranks, data, base, batch and
schedule all come from <proj_dir>/args.json (the resolved settings every run writes when it
starts). A flag on the command line that contradicts one of them is refused, all of them in
one line, unless it is one of RESUME_CHANGES. settings.resolve calls `continue_settings`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path

from ..errors import RWKVPeftError
from .args import RESUME_CHANGES, SEGMENT_FLAGS, TrainArgs, build_parser, check_args
from .checkpoint import find_checkpoint

# What a resume may change (RESUME_CHANGES, in args.py for --help; README "Resuming a run"). The
# run's length: its learning-rate schedule is recomputed for the new end. Saving, evaluation
# and logging: they change no training step. Memory and speed: --grad_cp, --cpu_malloc and --op
# compute the same steps. --skip_nonfinite: to get past a bad batch that stopped the run.
# SEGMENT_FLAGS are the command's own, never taken from the run.

# Values naming files: the same file however it is spelled.
PATH_FLAGS = ("load_model", "data_file", "val_file", "tokenizer", "deepspeed_config", "peft_rules",
              "init_adapter")
SETTINGS_FILE = "args.json"


def given_flags(argv) -> frozenset[str]:
    """The options named on the command line argv (not those left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:  # no defaults: only what argv names is set
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv))) - {"local_rank"}


def continue_settings(args: TrainArgs, proj_dir: Path, given: frozenset[str] | None,
                      auto_precision: str) -> TrainArgs:
    """The settings of the run in proj_dir, continued from the checkpoint args.resume names, with
    the changes the command line args (of which `given` were named) may make."""
    checkpoint = find_checkpoint(proj_dir, args.resume)
    if args.resume != "latest" and checkpoint.resolve().parent.parent != proj_dir.resolve():
        raise RWKVPeftError(f"--resume {args.resume} is a checkpoint of the run in {checkpoint.parent.parent}, not "
                            f"of --proj_dir {proj_dir}; drop --proj_dir to continue that run")
    stored = read_run_settings(proj_dir)
    if given is None:  # called from Python: what differs from the defaults was given
        defaults = TrainArgs()
        given = frozenset(f.name for f in fields(TrainArgs) if getattr(args, f.name) != getattr(defaults, f.name))
    values, conflicts = {}, []
    for f in fields(TrainArgs):
        name, new = f.name, getattr(args, f.name)
        if name == "proj_dir":
            values[name] = str(proj_dir)
        elif name == "resume":
            values[name] = str(checkpoint)  # resolved: the checkpoint this segment starts from
        elif name in SEGMENT_FLAGS or name not in stored:  # (an option newer than the run: as given)
            values[name] = new
        elif name in given and name in RESUME_CHANGES:
            values[name] = new
        else:
            values[name] = stored[name]
            decided = auto_precision if name == "precision" and new == "auto" else new
            if name in given and not _same(name, decided, stored[name]):
                conflicts.append(f"--{name} {_show(decided)} (the run: {_show(stored[name])})")
    if conflicts:
        which, them = ("this flag contradicts", "it") if len(conflicts) == 1 else ("these flags contradict", "them")
        raise RWKVPeftError(f"--resume continues the run in {proj_dir} with its own settings "
                            f"({proj_dir / SETTINGS_FILE}), which {which}: {', '.join(conflicts)}; drop {them}, or "
                            f"start a new run in another --proj_dir. A resume may change only "
                            f"{', '.join('--' + n for n in RESUME_CHANGES + SEGMENT_FLAGS)}")
    merged = TrainArgs(**values)
    try:
        check_args(merged)
    except RWKVPeftError as e:
        raise RWKVPeftError(f"--resume of the run in {proj_dir}: {e}") from None
    reached = _checkpoint_step(checkpoint)
    if "max_steps" in given and merged.max_steps and reached is not None and merged.max_steps < reached:
        raise RWKVPeftError(f"--max_steps {merged.max_steps} ends before step {reached}, where the run in {proj_dir} "
                            f"stands; give at least {reached}")
    return merged


def changes_from_run(args: TrainArgs) -> list[str]:
    """What this resumed segment runs with differently from the run's args.json, for the log."""
    try:
        stored = json.loads((Path(args.proj_dir) / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [f"--{n} {_show(stored[n])} -> {_show(getattr(args, n))}" for n in RESUME_CHANGES
            if n in stored and not _same(n, getattr(args, n), stored[n])]


def read_run_settings(proj_dir: Path) -> dict:
    """The run's resolved settings from its args.json; one line when it is missing or unreadable."""
    path = proj_dir / SETTINGS_FILE
    what = f"so the settings of the run in {proj_dir} are unknown; restore it, or start a new run in another --proj_dir"
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise RWKVPeftError(f"--resume: {path} is missing, {what}") from None
    except OSError as e:
        raise RWKVPeftError(f"--resume: {path} cannot be read ({e.strerror}), {what}") from None
    except ValueError as e:
        raise RWKVPeftError(f"--resume: {path} is not valid JSON ({e}), {what}") from None
    if not isinstance(stored, dict):
        raise RWKVPeftError(f"--resume: {path} does not hold a JSON object of settings, {what}")
    for f in fields(TrainArgs):
        if f.name in stored and not _fits(f, stored[f.name]):
            raise RWKVPeftError(f"--resume: {path} gives {f.name} the value {json.dumps(stored[f.name])}, which is "
                                f"not a{'n' if _kind(f)[0] in 'aeiou' else ''} {_kind(f)}, {what}")
    return stored


def _kind(f) -> str:
    """A field's type as text: 'int', 'float | None', 'list[str]', ..."""
    return f.type if isinstance(f.type, str) else f.type.__name__


def _fits(f, value) -> bool:
    kind = _kind(f)
    if value is None:
        return "None" in kind
    base = kind.split("|")[0].strip()
    if base == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if base == "int":
        return isinstance(value, int)
    if base == "float":
        return isinstance(value, (int, float))
    if base == "str":
        return isinstance(value, str)
    if base.startswith("list"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return True


def _same(name: str, new, old) -> bool:
    if new == old:
        return True
    if isinstance(new, list) and isinstance(old, list) and name in ("train_parts", "report_to"):
        return sorted(set(new)) == sorted(set(old))
    if name in PATH_FLAGS and isinstance(new, str) and isinstance(old, str):
        return os.path.realpath(new) == os.path.realpath(old)
    return False


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    return "unset" if value is None else str(value)


def _checkpoint_step(checkpoint: Path) -> int | None:
    try:
        step = json.loads((checkpoint / "trainer.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
