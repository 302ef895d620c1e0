"""Validation during training: the held-out loss, the best step so far, early stopping.

The loss is the one `python -m rwkv_peft.eval` reports (mean cross entropy per trained token,
one record per sample, the same `heldout_sums`), so the figure a run logs at its end equals
what eval says about its final adapter. Each process evaluates every world-th sample and the
sums are added over the processes: the mean is over all tokens, not a mean of means.

Evaluating must not change training: the model goes back to its train/eval mode and the RNG
to its state (dropout is reseeded per micro batch anyway), and the training data is untouched.

--val_split holds out whole records of a .jsonl file: the two parts are written once, beside
the data (in its .rwkv_peft_cache/), named by a hash of the file, the fraction and the seed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data.datasets import load_training_data
from ..data.sources import iter_jsonl, resolve_data_type
from ..data.token_cache import cache_dirs
from ..errors import RWKVPeftError
from ..io import atomic_write, check_writable_dir
from ..scoring import expected_reply, heldout_sums, read_records, task_items, task_score
from .args import TrainArgs

GENERATE_MAX_TOKENS = 64  # as rwkv_peft.eval's default --max_tokens


def split_dir(data_path: Path) -> Path:
    """Where the two parts of a split go: the token cache directory beside the data, else a temp one."""
    for directory in cache_dirs(data_path):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return check_writable_dir(directory)
        except (OSError, RWKVPeftError):
            continue
    raise RWKVPeftError(f"--val_split: cannot write the split of {data_path} beside it or in the temp directory")


def heldout_lines(n_records: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions (0-based, among the records) of the held-out records: a function of the seed."""
    n_val = max(1, round(fraction * n_records))
    if n_val >= n_records:
        raise RWKVPeftError(f"--val_split {fraction}: the data has {n_records} record(s), too few to hold "
                            "any out and still train; use --val_file")
    rng = np.random.default_rng([seed % 2**64, 3])
    return np.sort(rng.choice(n_records, size=n_val, replace=False))


def split_records(data_file: str, data_type: str, fraction: float, seed: int) -> tuple[str, str]:
    """(training part, held-out part) of a .jsonl data file, written once and reused."""
    fmt, path = resolve_data_type(data_file, data_type)
    if fmt != "jsonl":
        raise RWKVPeftError(f"--val_split holds out records of a .jsonl file; {data_file} is {fmt} data: "
                            "pass held-out data with --val_file instead")
    path = path.resolve()
    st = path.stat()
    ident = json.dumps([str(path), st.st_size, st.st_mtime_ns, fraction, seed])
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    directory = split_dir(path)
    train_part = directory / f"{path.stem}.split-{key}.train.jsonl"
    heldout_part = directory / f"{path.stem}.split-{key}.heldout.jsonl"
    if heldout_part.is_file() and train_part.is_file():
        return str(train_part), str(heldout_part)
    n_records = sum(rec is not None for _, rec, _ in iter_jsonl(path))
    held = set(heldout_lines(n_records, fraction, seed).tolist())

    def write_parts(heldout_file, train_file):  # one streaming pass: the data may not fit in memory
        records = (rec for _, rec, _ in iter_jsonl(path) if rec is not None)
        for i, rec in enumerate(records):
            (heldout_file if i in held else train_file).write((json.dumps(rec, ensure_ascii=False) + "\n").encode())

    # the train part is renamed into place first, so a held-out part on disk means a complete split
    atomic_write(heldout_part, lambda fh: atomic_write(train_part, lambda ft: write_parts(fh, ft)))
    return str(train_part), str(heldout_part)


def data_files(args: TrainArgs, world: int, zero_stage: int, log=print) -> tuple[str, str | None]:
    """(file to train on, held-out file or None) for the run's data options."""
    if (args.val_file or args.val_split) and world > 1 and zero_stage == 3:
        # ZeRO-3 gathers weights collectively in every forward: the processes' shards of the
        # held-out data would have to be padded to equal batch counts
        raise RWKVPeftError("validation across processes is not supported with ZeRO stage 3 yet; "
                            "use --strategy deepspeed_stage_2 or run one process")
    if args.val_split:
        train_part, heldout_part = split_records(args.data_file, args.data_type, args.val_split, args.random_seed)
        log(f"--val_split {args.val_split}: training on {train_part}\n  held out (never trained on): {heldout_part}")
        return train_part, heldout_part
    return args.data_file, args.val_file


def load_heldout(path: str, args: TrainArgs, tokenizer, progress: bool):
    """The held-out samples (one record per sample, as eval) and, for --eval_generate, the chat
    items to answer."""
    what = "--val_split held-out part" if args.val_split else "--val_file"
    try:
        data = load_training_data(path, tokenizer, args.ctx_len, data_type=args.data_type,
                                  sft_fields=tuple(args.sft_fields) if args.sft_fields else None,
                                  mode="pad", seed=args.random_seed, progress=progress)
    except RWKVPeftError as e:
        raise RWKVPeftError(f"{what} {path}: {e}") from None
    if data.loss_tokens == 0:
        raise RWKVPeftError(f"{what} {path} has no trained tokens to measure a loss on")
    items = []
    if args.eval_generate:
        if data.kind != "chat":
            raise RWKVPeftError(f"--eval_generate answers chat records; {what} {path} holds {data.kind} records")
        items = task_items(read_records(path)[:args.eval_generate], tokenizer)
    return data, items


class Validation:
    """When to evaluate, the held-out loss, the best step and early stopping.

    With data None it is inert (never due), so the training loop needs no special case.
    """

    def __init__(self, data=None, items=(), tokenizer=None, every: int = 0, patience: int = 0,
                 batch_size: int = 1, log=print, source: str | None = None):
        self.data, self.items, self.tokenizer, self.source = data, list(items), tokenizer, source
        self.every, self.patience, self.batch_size, self.log = every, patience, batch_size, log
        self.best_loss, self.best_step, self.since_best = None, None, 0
        self.last_loss, self.improved, self.seconds = None, False, 0.0

    def due(self, step: int, total_steps: int) -> bool:
        if self.data is None:
            return False
        return step == total_steps or (self.every > 0 and step % self.every == 0)

    def evaluate(self, model, step: int) -> dict:
        """Every process calls this. The metrics record of this evaluation."""
        start = time.perf_counter()
        rank, world = dist.get_rank(), dist.get_world_size()
        was_training = model.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        model.eval()
        try:
            total, count = heldout_sums(model, self.data, range(rank, len(self.data), world), self.batch_size)
            sums = torch.tensor([total, count], dtype=torch.float64, device=model.emb.weight.device)
            if world > 1:
                dist.all_reduce(sums)
            loss = float(sums[0] / sums[1].clamp(min=1))
            record = {"step": step, "val_loss": loss, "val_tokens": int(sums[1])}
            if self.items and rank == 0:  # greedy replies: one process is enough
                score = task_score(model, self.tokenizer, self.items, GENERATE_MAX_TOKENS)
                record["val_task"] = score["task"]
                for item, reply, hit in score["replies"]:
                    self.log(f"  step {step} [{'OK' if hit else 'MISS'}] {item['question'][:60]!r} -> {reply[:80]!r}, "
                             f"expected {expected_reply(item)}")
        finally:
            model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        self.improved = self.best_loss is None or loss < self.best_loss
        if self.improved:
            self.best_loss, self.best_step, self.since_best = loss, step, 0
        else:
            self.since_best += 1
        self.last_loss = loss
        self.seconds += time.perf_counter() - start
        return record

    def should_stop(self) -> bool:
        """--early_stop: patience evaluations in a row without a lower loss."""
        return self.patience > 0 and self.since_best >= self.patience

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run decides as an uninterrupted one."""
        return {"best_loss": self.best_loss, "best_step": self.best_step, "since_best": self.since_best,
                "last_loss": self.last_loss}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.best_loss, self.best_step = state["best_loss"], state["best_step"]
            self.since_best, self.last_loss = state["since_best"], state["last_loss"]

    def summary(self) -> dict:
        if self.data is None:
            return {}
        return {"val_data": self.source, "val_loss": self.last_loss, "best_val_loss": self.best_loss,
                "best_step": self.best_step}
