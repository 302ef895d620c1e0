"""Training data: text, chat/SFT and binidx files turned into fixed-length samples.

`load_training_data(path, tokenizer, ctx_len, ...)` returns a `TrainingData`; the trainer asks
it for `sample(i)` / `batch([i, ...])` by global sample index. Sampling is stateless: sample
i depends only on i, `seed` and the data, so a run resumes exactly from the next index.

The other data modules, in the order they build on each other:
    chat_format.py   the World chat format: chats and SFT records as text and loss masks
    sources.py       data types (.txt, .jsonl, binidx) and a file's documents as token ids
    token_cache.py   txt/jsonl tokenized once into memory-mapped files
    binidx.py        the Megatron .bin/.idx pair (read here, written by prepare.py)

Modes
- "pack": documents are concatenated, each followed by the eos token (0 for World), and
  cut into windows of ctx_len+1 tokens with stride ctx_len (so every token is a target once
  per epoch); windows are shuffled afresh each epoch (a permutation seeded by seed and the
  epoch). The last window is padded. binidx instead takes RWKV-LM style random windows:
  sample i starts at an offset drawn from a generator seeded by (seed, i) anywhere in the
  token stream, and len() = tokens // ctx_len.
- "pad": one sample per document (binidx: per sequence), truncated to ctx_len+1 tokens and
  padded with 0s whose loss_mask is 0; documents shuffled per epoch like windows.
The eos after a document is a target for plain text (the model learns to end a document)
but not for chat/SFT (the reply's "\\n\\n" is what ends a turn). Padding never counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rwkv_peft.errors import RWKVPeftError

from .binidx import read_binidx
from .chat_format import RENDER_LOSS_END, RENDER_LOSS_START, merge_runs
from .sources import detect_jsonl_kind, resolve_data_type
from .token_cache import cached_tokens

__all__ = ["TrainingData", "load_training_data"]

_MODES = ("pack", "pad")


def _open_array(path: Path, dtype, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


class TrainingData:
    """Fixed-length training samples from one data file (see the module docstring).

    sample(i) -> {"input_ids": int64 [ctx_len], "targets": int64 [ctx_len] (the token after
    each input), "loss_mask": float32 [ctx_len] (1 where the target counts)}. Any index >= 0:
    index i is position i % len(self) of epoch i // len(self).
    """

    def __init__(self, *, ctx_len: int, mode: str, sampling: str, seed: int, tokenizer,
                 token_file: tuple[Path, str, int], mask_file: tuple[Path, int] | None,
                 doc_offsets: np.ndarray | None = None, doc_starts: np.ndarray | None = None,
                 doc_ends: np.ndarray | None = None, source: str = "", kind: str = "text",
                 loss_tokens: int | None = None, cache_path: Path | None = None,
                 cache_hit: bool = False):
        self.ctx_len = int(ctx_len)
        self.mode, self.sampling, self.seed = mode, sampling, int(seed)
        self.tokenizer = tokenizer
        self.source, self.kind = source, kind
        self._token_file, self._mask_file = token_file, mask_file
        self._open_files()
        self.tokens_total = len(self._tokens)
        if doc_offsets is not None:
            doc_starts, doc_ends = doc_offsets[:-1], doc_offsets[1:]
        self._doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self._doc_ends = np.asarray(doc_ends, dtype=np.int64)
        self.num_documents = len(self._doc_starts)
        self.loss_tokens = int(loss_tokens) if loss_tokens is not None else self.tokens_total
        self.cache_path, self.cache_hit = cache_path, cache_hit
        n, ctx = self.tokens_total, self.ctx_len
        if sampling == "random":
            self._len = max(1, n // ctx)
        elif sampling == "windows":
            self._len = max(1, -(-(n - 1) // ctx))
        else:
            self._len = self.num_documents
        if self._len < 1 or n < 2:
            raise RWKVPeftError(f"{source}: the data set is empty (no tokens to train on)")
        self.truncated_documents = (int(((self._doc_ends - self._doc_starts) > ctx + 1).sum())
                                    if sampling == "docs" else 0)
        self._perms: dict[int, np.ndarray] = {}

    # -- files ---------------------------------------------------------------------------

    def _open_files(self) -> None:
        path, dtype, n = self._token_file
        self._tokens = _open_array(path, np.dtype(dtype), n)
        self._mask = None
        if self._mask_file is not None:
            mpath, mn = self._mask_file
            self._mask = _open_array(mpath, np.uint8, mn)

    def __getstate__(self) -> dict:
        # memmaps would pickle as full copies: reopen them in the other process instead
        state = self.__dict__.copy()
        state.pop("_tokens", None)
        state.pop("_mask", None)
        state["_perms"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_files()

    # -- sampling ------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed % 2**64, 1, epoch])
            perm = rng.permutation(self._len)
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def _span(self, index: int) -> tuple[int, int]:
        """[start, end) of sample index's tokens in the stream (at most ctx_len+1 tokens)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"sample index must be an integer >= 0, got {index!r}")
        index = int(index)
        ctx, n = self.ctx_len, self.tokens_total
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed % 2**64, 2, index])
            start = int(rng.integers(0, max(n - ctx - 1, 0) + 1))
            return start, min(start + ctx + 1, n)
        epoch, j = divmod(index, self._len)
        k = int(self._perm(epoch)[j])
        if self.sampling == "windows":
            start = k * ctx
            return start, min(start + ctx + 1, n)
        start = int(self._doc_starts[k])
        return start, min(int(self._doc_ends[k]), start + ctx + 1)

    def _window(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self._span(index)
        ids = np.asarray(self._tokens[start:end], dtype=np.int64)
        if self._mask is not None:
            mask = np.asarray(self._mask[start:end], dtype=np.float32)
        else:
            mask = np.ones(end - start, dtype=np.float32)
        return ids, mask

    def sample(self, index: int) -> dict:
        ids, mask = self._window(index)
        ctx = self.ctx_len
        m = max(len(ids) - 1, 0)
        input_ids = torch.zeros(ctx, dtype=torch.long)
        targets = torch.zeros(ctx, dtype=torch.long)
        loss_mask = torch.zeros(ctx, dtype=torch.float32)
        if m:
            input_ids[:m] = torch.from_numpy(ids[:-1])
            targets[:m] = torch.from_numpy(ids[1:])
            loss_mask[:m] = torch.from_numpy(mask[1:])
        return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask}

    def batch(self, indices: Sequence[int]) -> dict:
        samples = [self.sample(i) for i in indices]
        if not samples:
            raise ValueError("batch() needs at least one index")
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def __getitem__(self, index: int) -> dict:
        return self.sample(index)

    def __iter__(self):
        """One epoch (epoch 0) of samples; sample(i) accepts any index beyond it."""
        return (self.sample(i) for i in range(self._len))

    # -- showing -------------------------------------------------------------------------

    def render(self, index: int) -> str:
        """Sample `index` as text: a header line, then the tokens, with the ones whose loss
        counts wrapped in RENDER_LOSS_START/END (⟦ ⟧); eos shows as <eos>, padding as a note."""
        ids, mask = self._window(index)
        eos = int(self.tokenizer.eos_id)
        trained = [False] + [bool(x) for x in mask[1:]]  # token 0 is context only
        # runs of (flag, is_eos) -> text; then adjacent runs with the same flag share markers
        pieces: list[tuple[bool, str]] = []
        run: list[int] = []
        key = None
        for tok, flag in zip(ids.tolist() + [None], trained + [None]):
            k = None if tok is None else (flag, tok == eos)
            if k != key and run:
                text = "<eos>" * len(run) if key[1] else self.tokenizer.decode(run)
                pieces.append((key[0], text))
                run = []
            key = k
            if tok is not None:
                run.append(tok)
        parts: list[str] = []
        for text, flag in merge_runs([(t, f) for f, t in pieces]):
            parts.append(f"{RENDER_LOSS_START}{text}{RENDER_LOSS_END}" if flag else text)
        n_targets = max(len(ids) - 1, 0)
        n_loss = int(sum(trained))
        pad = self.ctx_len - n_targets
        header = (f"--- sample {index} of {self.source} ({self.kind}, {self.mode}): "
                  f"{n_loss}/{self.ctx_len} targets trained, shown between "
                  f"{RENDER_LOSS_START} {RENDER_LOSS_END}"
                  + (f"; then {pad} padding tokens (not trained)" if pad else "") + " ---")
        return header + "\n" + "".join(parts)

    def describe(self) -> str:
        """One line about the data set, for the trainer's log."""
        pct = 100.0 * self.loss_tokens / max(self.tokens_total, 1)
        what = {"random": "random windows", "windows": "packed windows",
                "docs": "one per document"}[self.sampling]
        line = (f"{self.source}: {self.kind}, {self.num_documents:,} documents, "
                f"{self.tokens_total:,} tokens ({pct:.1f}% trained), mode {self.mode}: "
                f"{len(self):,} samples of {self.ctx_len} per epoch ({what})")
        if self.truncated_documents:
            line += f"; {self.truncated_documents:,} documents longer than ctx_len+1 are truncated"
        if self.cache_path is not None:
            line += f"; token cache {'reused' if self.cache_hit else 'written'}: {self.cache_path}"
        return line

    def __repr__(self) -> str:
        return f"TrainingData({self.describe()})"


# ----------------------------------------------------------------------------------------
# Opening a data file


def _load_binidx(path: Path, tokenizer, ctx_len: int, mode: str, seed: int) -> TrainingData:
    data = read_binidx(path)
    if data.num_tokens < 2:
        raise RWKVPeftError(f"{data.bin_path} holds {data.num_tokens} tokens: nothing to train on")
    vocab = int(tokenizer.vocab_size)
    info = np.iinfo(data.dtype)
    if info.min < 0 or info.max >= vocab:  # only scan when the dtype can hold a bad id
        step = 1 << 24
        for s in range(0, data.num_tokens, step):
            chunk = data.tokens[s : s + step]
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo < 0 or hi >= vocab:
                bad = hi if hi >= vocab else lo
                raise RWKVPeftError(
                    f"{data.bin_path} holds token id {bad}, outside the tokenizer's vocab_size "
                    f"{vocab}; it was made with another tokenizer")
    starts = data.pointers // data.dtype.itemsize
    ends = starts + data.sizes.astype(np.int64)
    if mode == "pad":
        keep = ends - starts >= 2
        starts, ends = starts[keep], ends[keep]
        if len(starts) == 0:
            raise RWKVPeftError(f"{data.bin_path}: no sequence has 2 or more tokens")
    return TrainingData(
        ctx_len=ctx_len, mode=mode, sampling="random" if mode == "pack" else "docs", seed=seed,
        tokenizer=tokenizer, token_file=(data.bin_path, data.dtype.newbyteorder("<").str,
                                         data.num_tokens),
        mask_file=None, doc_starts=starts, doc_ends=ends, source=str(data.bin_path.with_suffix("")),
        kind="binidx")


def load_training_data(path: str, tokenizer, ctx_len: int, *, data_type: str = "auto",
                       sft_fields: tuple[str, str] | None = None, mode: str = "pack",
                       seed: int = 0, cache_dir: str | None = None,
                       progress: bool = True) -> TrainingData:
    """Open a data file for training: formats in sources.py, modes in the module docstring,
    the token cache of txt/jsonl files in token_cache.py."""
    if isinstance(ctx_len, bool) or not isinstance(ctx_len, (int, np.integer)) or ctx_len < 1:
        raise RWKVPeftError(f"ctx_len must be a positive integer, got {ctx_len!r}")
    if mode not in _MODES:
        raise RWKVPeftError(f"unknown data mode {mode!r}: use 'pack' or 'pad'")
    if sft_fields is not None:
        if (isinstance(sft_fields, str) or len(sft_fields) != 2
                or not all(isinstance(f, str) and f for f in sft_fields)):
            raise RWKVPeftError(
                f"sft_fields must be two field names (question, answer), got {sft_fields!r}")
        sft_fields = (sft_fields[0], sft_fields[1])
    fmt, p = resolve_data_type(path, data_type)
    if fmt == "binidx":
        if sft_fields is not None:
            raise RWKVPeftError(
                f"{p}: sft_fields cannot apply to binidx data (it holds tokens without loss "
                "masks); train on the .jsonl file instead")
        return _load_binidx(p, tokenizer, int(ctx_len), mode, seed)
    if fmt == "txt" and sft_fields is not None:
        raise RWKVPeftError(f"{p}: sft_fields needs a .jsonl file, not plain text")
    kind = detect_jsonl_kind(p, sft_fields) if fmt == "jsonl" else "text"

    # one sample per record uses its first ctx_len + 1 tokens: the rest is never tokenized
    cap = int(ctx_len) + 1 if mode == "pad" and fmt == "jsonl" else None
    files, meta, hit = cached_tokens(p, fmt, kind, tokenizer, sft_fields, cache_dir, progress, max_doc_tokens=cap)
    offsets = np.load(files.docs)  # 8 bytes per document, needed for random access
    return TrainingData(
        ctx_len=int(ctx_len), mode=mode, sampling="windows" if mode == "pack" else "docs",
        seed=seed, tokenizer=tokenizer, token_file=(files.tokens, meta["dtype"], meta["tokens"]),
        mask_file=(files.mask, meta["tokens"]) if meta["has_mask"] else None,
        doc_offsets=offsets, source=str(path), kind=kind,
        loss_tokens=meta["loss_tokens"], cache_path=files.meta.with_suffix(""), cache_hit=hit)
