"""The token cache: a txt/jsonl data file tokenized once, then memory-mapped.

The first use of a file tokenizes it (tqdm progress bar) into files under `cache_dir`, else
`.rwkv_peft_cache/` beside the data file, else (not writable) `rwkv_peft_cache/` in the temp
directory (TMPDIR):
`NAME.KEY.tokens` (raw little-endian uint16 when vocab_size <= 65536, else uint32),
`NAME.KEY.mask` (raw uint8, chat/SFT only), `NAME.KEY.docs.npy` (int64 document offsets)
and `NAME.KEY.json` (metadata, written last: a cache without it is ignored). KEY hashes the
file's path, size and mtime, the tokenizer's identity (class, vocab file, probe ids),
data_type, sft_fields and the chat template. Every file is written through rwkv_peft.io
(a temporary name, renamed into place when complete: a full disk is one error line and
leaves no part of the cache); older caches of the same file with the same settings, and
temporary files of tokenizing processes that were killed, are removed. Readers memory-map
the files, so multi-GB data never sits in RAM.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from array import array
from pathlib import Path

import numpy as np

from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.io import AtomicFile, atomic_write, check_not_inputs, remove_stale_temps, temp_path

from .chat_format import CHAT_TEMPLATE
from .sources import iter_documents

__all__ = ["CACHE_DIRNAME", "CacheFiles", "cache_dirs", "cached_tokens", "tokenizer_fingerprint"]

CACHE_FORMAT = 1
CACHE_DIRNAME = ".rwkv_peft_cache"
_CACHE_HINT = "move the data file to a disk with room (its cache is written beside it, in .rwkv_peft_cache/)"
_FLUSH_TOKENS = 1 << 20
_PROBE = "Hello, world! 12345 \u4f60\u597d\u3002\nUser: x\n\nAssistant: y \U0001F600 caf\u00e9"


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash identifying a tokenizer: class, sizes, vocab file contents, probe ids."""
    h = hashlib.sha256()
    cls = type(tokenizer)
    h.update(f"{cls.__module__}.{cls.__qualname__}|{tokenizer.vocab_size}|{tokenizer.eos_id}".encode())
    for attr in ("vocab_file", "path"):
        f = getattr(tokenizer, attr, None)
        if f is not None and Path(f).is_file():
            h.update(Path(f).read_bytes())
    h.update(json.dumps([int(i) for i in tokenizer.encode(_PROBE)]).encode())
    return h.hexdigest()[:16]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _writable(directory: Path) -> bool:
    """Whether a file can be created in directory (made if missing), tried for real."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(directory / "probe")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(tmp)
        return True
    except OSError:
        return False


def cache_dirs(data_path: Path, cache_dir: str | None = None) -> tuple[Path, Path]:
    """(preferred, fallback) directories for files made from data_path: cache_dir, else
    .rwkv_peft_cache/ beside the data; then rwkv_peft_cache/ in the temp directory."""
    preferred = Path(cache_dir) if cache_dir is not None else data_path.parent / CACHE_DIRNAME
    return preferred, Path(tempfile.gettempdir()) / "rwkv_peft_cache"


class CacheFiles:
    """The paths of one cache: NAME.KEY.{json,tokens,mask,docs.npy} in directory."""

    def __init__(self, directory: Path, name: str, key: str):
        base = directory / f"{name}.{key}"
        self.dir = directory
        self.meta = Path(f"{base}.json")
        self.tokens = Path(f"{base}.tokens")
        self.mask = Path(f"{base}.mask")
        self.docs = Path(f"{base}.docs.npy")


def _read_cache(files: CacheFiles, key: str) -> dict | None:
    """The metadata of a complete, matching cache, else None."""
    try:
        meta = json.loads(files.meta.read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        if files.tokens.stat().st_size != meta["tokens"] * itemsize:
            return None
        if meta["has_mask"] and files.mask.stat().st_size != meta["tokens"]:
            return None
        docs = np.load(files.docs, mmap_mode="r")
        if docs.shape != (meta["docs"] + 1,):
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_stale(files: CacheFiles, meta: dict) -> None:
    """Delete caches of the same source and settings made from an older version of the file."""
    for other in files.dir.glob("*.json"):
        if other == files.meta:
            continue
        try:
            m = json.loads(other.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(m, dict) and m.get("source") == meta["source"]
                and m.get("settings") == meta["settings"] and m.get("key") != meta["key"]):
            stem = str(other)[: -len(".json")]
            for suffix in (".json", ".tokens", ".mask", ".docs.npy"):
                Path(stem + suffix).unlink(missing_ok=True)


class _StreamWriter:
    """Token ids (and masks) streamed to their cache files under temporary names; document
    offsets kept in a compact array."""

    def __init__(self, files: CacheFiles, dtype: np.dtype, with_mask: bool, source: Path):
        self.dtype = dtype
        what, hint = f"the token cache of {source} ({files.dir})", _CACHE_HINT
        self.tokens_file = AtomicFile(files.tokens, what, hint)
        try:
            self.mask_file = AtomicFile(files.mask, what, hint) if with_mask else None
        except BaseException:
            self.tokens_file.discard()
            raise
        self._ids: list[int] = []
        self._mask: list[int] = []
        self.offsets = array("q", [0])
        self.n_tokens = 0
        self.loss_tokens = 0
        self.doc_open = 0  # tokens of the current (unfinished) document

    def add(self, ids: list[int], mask: list[int] | None) -> None:
        self._ids += ids
        if self.mask_file is not None:
            self._mask += mask if mask is not None else [1] * len(ids)
        self.doc_open += len(ids)
        if len(self._ids) >= _FLUSH_TOKENS:
            self.flush()

    def end_document(self, eos: int, eos_trained: int) -> None:
        if self.doc_open == 0:
            return  # skip empty documents
        self._ids.append(eos)
        if self.mask_file is not None:
            self._mask.append(eos_trained)
        self.n_tokens += self.doc_open + 1
        self.offsets.append(self.n_tokens)
        self.doc_open = 0

    def flush(self) -> None:
        if self._ids:
            arr = np.asarray(self._ids, dtype=np.int64)
            self.tokens_file.write(memoryview(np.asarray(arr, dtype=self.dtype)))
            self._ids = []
        if self.mask_file is not None and self._mask:
            m = np.asarray(self._mask, dtype=np.uint8)
            self.loss_tokens += int(m.sum(dtype=np.int64))
            self.mask_file.write(memoryview(m))
            self._mask = []

    def commit(self) -> None:
        """Move the tokens and mask files into place (after the last flush())."""
        self.tokens_file.commit()
        if self.mask_file is not None:
            self.mask_file.commit()

    def abort(self) -> None:
        """Remove the temporary files that were not moved into place."""
        for f in (self.tokens_file, self.mask_file):
            if f is not None:
                f.discard()


def _build_cache(path: Path, fmt: str, kind: str, tokenizer, sft_fields, files: CacheFiles,
                 meta: dict, progress: bool, max_doc_tokens: int | None = None) -> dict:
    from tqdm import tqdm

    vocab = int(tokenizer.vocab_size)
    dtype = _token_dtype(vocab)
    eos = int(tokenizer.eos_id)
    with_mask = kind in ("chat", "fields")
    eos_trained = 0 if with_mask else 1
    check_not_inputs([("token cache", f) for f in (files.tokens, files.mask, files.docs, files.meta)],
                     {"the data file": path})
    remove_stale_temps(files.dir)  # of tokenizing processes that were killed
    writer = _StreamWriter(files, dtype, with_mask, path)
    total = path.stat().st_size
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
               desc=f"tokenizing {path.name}", disable=not progress, leave=False)
    try:
        line = 0
        for ids, mask, ends, nbytes in iter_documents(path, fmt, kind, tokenizer, sft_fields, max_doc_tokens):
            line += 1
            if ids:
                top = max(ids)
                if top >= vocab or min(ids) < 0:
                    where = f"{path} line {line}" if fmt == "jsonl" else str(path)
                    raise RWKVPeftError(
                        f"{where}: the tokenizer produced id {top}, outside its vocab_size "
                        f"{vocab}; use a matching tokenizer")
                writer.add(ids, mask)
            if ends:
                writer.end_document(eos, eos_trained)
            if nbytes:
                bar.update(nbytes)
        writer.flush()  # the last ids, and their loss tokens in the count
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    n_docs = len(writer.offsets) - 1
    try:
        if n_docs == 0:
            raise RWKVPeftError(f"{path} holds no text: nothing to train on")
        if with_mask and writer.loss_tokens == 0:
            raise RWKVPeftError(
                f"{path} has no assistant replies: nothing to train on (the loss counts only "
                "assistant messages)")
    except RWKVPeftError:
        writer.abort()
        raise
    meta = dict(meta, dtype=dtype.str, tokens=writer.n_tokens, docs=n_docs, has_mask=with_mask,
                loss_tokens=writer.loss_tokens if with_mask else writer.n_tokens)
    try:
        writer.commit()
        what = f"the token cache of {path} ({files.dir})"
        docs = io.BytesIO()  # np.save to a file writes past the file object, losing a full disk's errno
        np.save(docs, np.frombuffer(writer.offsets, dtype=np.int64))
        atomic_write(files.docs, lambda f: f.write(docs.getbuffer()), what, _CACHE_HINT)
        # the metadata last: a cache without it is ignored
        atomic_write(files.meta, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")), what, _CACHE_HINT)
    finally:
        writer.abort()  # removes temporary files that were not moved into place
    _remove_stale(files, meta)
    return meta


def cached_tokens(path: Path, fmt: str, kind: str, tokenizer, sft_fields: tuple[str, str] | None,
                  cache_dir: str | None = None, progress: bool = True,
                  max_doc_tokens: int | None = None) -> tuple[CacheFiles, dict, bool]:
    """(files, metadata, reused) of the token cache of a txt/jsonl file, tokenizing it first
    when no matching cache exists (see the module docstring). max_doc_tokens: keep only the
    first ids of each .jsonl record (sources.iter_documents), a cache of its own."""
    path = path.resolve()
    st = path.stat()
    settings = {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer),
                "data_type": fmt, "kind": kind, "sft_fields": list(sft_fields or []),
                "template": list(CHAT_TEMPLATE)}
    if max_doc_tokens is not None:  # absent otherwise: the caches made before it stay valid
        settings["max_doc_tokens"] = max_doc_tokens
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    ident = {"settings": settings_key, "source": str(path), "size": st.st_size,
             "mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    meta0 = dict(ident, key=key, format=CACHE_FORMAT, kind=kind, data_type=fmt,
                 sft_fields=list(sft_fields or []), tokenizer=repr(tokenizer))

    preferred, fallback = cache_dirs(path, cache_dir)
    for d in (preferred, fallback):
        files = CacheFiles(d, path.name, key)
        meta = _read_cache(files, key)
        if meta is not None:
            remove_stale_temps(d)  # of tokenizing processes that were killed
            return files, meta, True
    directory = preferred
    if not _writable(preferred):
        if not _writable(fallback):
            raise RWKVPeftError(
                f"cannot write a token cache in {preferred} or {fallback}: make {preferred} "
                f"(or, while it does not exist, {preferred.parent}) writable, or set the TMPDIR "
                "environment variable to a writable directory")
        warnings.warn(f"{preferred} is not writable; caching tokens in {fallback}")
        directory = fallback
    files = CacheFiles(directory, path.name, key)
    return files, _build_cache(path, fmt, kind, tokenizer, sft_fields, files, meta0, progress, max_doc_tokens), False
