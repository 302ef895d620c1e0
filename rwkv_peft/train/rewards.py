"""GRPO's reward functions: the built-ins, a user's function by name, and the checks on what it returns.

A reward function has TRL's signature:

    fn(prompts: list, completions: list[str], **fields: list) -> list[float]

one call per micro batch, N = prompts x --num_generations entries in each list, in the same order:
prompts[i] is the record's `prompt` as the file holds it (a string or a message list),
completions[i] the sampled reply as text (without the end-of-turn blank line, stripped), and
fields[name][i] every other field of the record (`answer`, ...; None where a record lacks it).
It returns N finite numbers. `--reward module:function` imports a module (from the current
directory or the Python path); `--reward path/to/file.py:function` loads that file.

Built-ins, on texts normalised as `normalise` says (case folded, whitespace runs made one
space, surrounding whitespace and . , ; : ! ? stripped):
    exact     1.0 when the completion equals the record's `answer`, else 0.0
    contains  1.0 when `answer` occurs in the completion as whole words, else 0.0
              (rwkv_peft.eval's task score asks the same of a reply)
    regex     1.0 when --reward_regex PATTERN matches somewhere in the completion (re.search,
              not normalised), else 0.0
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from ..errors import RWKVPeftError

BUILT_IN = ("exact", "contains", "regex")


def normalise(text: str) -> str:
    return " ".join(str(text).casefold().split()).strip(" .,;:!?")


def _answers(fields: dict, name: str) -> list[str]:
    answers = fields.get("answer")
    if answers is None or any(a is None for a in answers):
        raise RWKVPeftError(f"--reward {name} compares each completion with its record's 'answer'; the prompt "
                            "file has records without one: add it, or choose another --reward")
    return [normalise(a) for a in answers]


def exact(prompts, completions, **fields) -> list[float]:
    return [float(normalise(c) == a) for c, a in zip(completions, _answers(fields, "exact"))]


def contains(prompts, completions, **fields) -> list[float]:
    return [float(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", normalise(c)) is not None)
            for c, a in zip(completions, _answers(fields, "contains"))]


def regex_reward(pattern: str) -> Callable:
    compiled = re.compile(pattern)

    def regex(prompts, completions, **fields) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    return regex


def load_reward(name: str, regex: str | None) -> Callable:
    """The reward function --reward names (with --reward_regex for `regex`)."""
    if name == "regex":
        if not regex:
            raise RWKVPeftError("--reward regex needs --reward_regex PATTERN (reward 1 where it matches)")
        try:
            return regex_reward(regex)
        except re.error as e:
            raise RWKVPeftError(f"--reward_regex {regex!r} is no regular expression: {e}") from None
    if regex:
        raise RWKVPeftError("--reward_regex is the pattern of --reward regex; drop it or use --reward regex")
    if name in BUILT_IN:
        return {"exact": exact, "contains": contains}[name]
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise RWKVPeftError(f"--reward {name}: give exact, contains, regex, module:function or file.py:function")
    module = _import(where, name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RWKVPeftError(f"--reward {name}: {where} has no function {attr!r}")
    return fn


def _import(where: str, name: str):
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise RWKVPeftError(f"--reward {name}: no file {path}")
            spec = importlib.util.spec_from_file_location(f"rwkv_peft_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        sys.path.insert(0, str(Path.cwd()))  # a module beside the command, as `python -m` finds it
        try:
            return importlib.import_module(where)
        finally:
            sys.path.remove(str(Path.cwd()))
    except ModuleNotFoundError as e:
        raise RWKVPeftError(f"--reward {name}: no module named {e.name!r}; give an importable module or a "
                            "path/to/file.py") from None
    except RWKVPeftError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say how, in one line
        raise RWKVPeftError(f"--reward {name}: importing {where} raised {type(e).__name__}: {e}") from None


def call_reward(fn: Callable, name: str, prompts: list, completions: list[str], fields: dict) -> torch.Tensor:
    """The N rewards as float64, or one RWKVPeftError naming the function and what went wrong."""
    try:
        out = fn(prompts, completions, **fields)
    except RWKVPeftError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's function becomes one line
        raise RWKVPeftError(f"--reward {name} raised {type(e).__name__}: {e}") from None
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise RWKVPeftError(f"--reward {name} must return a list of {len(completions)} numbers, "
                            f"returned {_shown(out)}") from None
    if len(values) != len(completions):
        raise RWKVPeftError(f"--reward {name} returned {len(values)} values for {len(completions)} completions "
                            f"({_shown(out)}); it must return one per completion")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise RWKVPeftError(f"--reward {name} returned non-finite rewards ({_shown(out)}); every reward must be a "
                            "finite number")
    return torch.tensor(values, dtype=torch.float64)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
