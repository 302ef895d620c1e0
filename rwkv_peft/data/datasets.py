"""Training data: text, chat/SFT and binidx files turned into fixed-length samples.

`load_training_data(path, tokenizer, ctx_len, ...)` returns a `TrainingData`; the trainer asks
it for `sample(i)` / `batch([i, ...])` by global sample index. Sampling is stateless: sample
i depends only on i, `seed` and the data, so a run resumes exactly from the next index.

Data types (`data_type="auto"` picks by extension)
- `.txt`: the whole file is ONE document (one token stream). Splitting at blank lines would
  put an end-of-text token between the paragraphs of ordinary prose; for separate documents
  use `.jsonl` with `{"text": ...}`. The file is read and tokenized in ~1 MiB pieces cut
  just after a newline that is followed by a non-whitespace character; no World token spans
  such a cut (tokens holding "\\n" continue only with whitespace), so the ids equal those of
  tokenizing the whole file at once. A line longer than 16 MiB is cut at a character
  boundary, where greedy matching can differ by a token from whole-file tokenization.
- `.jsonl` (`.json` too): one JSON object per line, blank lines ignored. The first record
  decides the kind for the whole file:
    `{"text": ...}`                       plain text, one document per record (kept verbatim)
    `{"messages": [{"role", "content"}]}` chat (roles system / user / assistant)
    `sft_fields=(Q, R)`                   `{Q: question, R: answer}` records, as one user turn
  A later record without those fields, malformed JSON, or a non-object line raises
  RWKVPeftError naming the file and line number.
- binidx: the Megatron `.bin`/`.idx` pair RWKV-LM trains on (see binidx.py), given as its
  prefix or either file. Plain tokens only: every target is trained.

Chat/SFT rendering (World chat format, SPEC section 3), with these exact strings:
    CHAT_SYSTEM "System: {}\\n\\n"   CHAT_USER "User: {}\\n\\n"
    CHAT_ASSISTANT "Assistant:"     CHAT_REPLY " {}\\n\\n"
so one exchange is `User: q\\n\\nAssistant: a\\n\\n` and turns follow each other directly.
The loss counts ONLY the reply `" {a}\\n\\n"`, i.e. the assistant's tokens and its
end-of-turn "\\n\\n"; never the system text, "User: ...", or "Assistant:". The space after
"Assistant:" belongs to the reply because inference prompts end in "Assistant:" (the model
generates " answer..."). Message contents are stripped and every run of blank lines inside
them becomes one "\\n", since "\\n\\n" ends a turn (generation stops there).
Tokenization: each maximal run of text with the same mask is tokenized on its own and the
ids are concatenated, so mask boundaries fall exactly between tokens. The cuts are only
after "Assistant:" and after a reply's "\\n\\n"; for the World vocab this gives the same ids
as tokenizing the whole conversation (there is no ": x" or "\\n\\nX" token), while a BPE
tokenizer may merge differently across a cut than it would in one string.

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

Cache: jsonl/txt data is tokenized once (tqdm progress bar) into files under `cache_dir`,
else `.rwkv_peft_cache/` beside the data file, else (not writable) a temp directory:
`NAME.KEY.tokens` (raw little-endian uint16 when vocab_size <= 65536, else uint32),
`NAME.KEY.mask` (raw uint8, chat/SFT only), `NAME.KEY.docs.npy` (int64 document offsets)
and `NAME.KEY.json` (metadata, written last: a cache without it is ignored). KEY hashes the
file's path, size and mtime, the tokenizer's identity (class, vocab file, probe ids),
data_type, sft_fields and the chat template. Every file is written under a temporary name
and moved into place with os.replace; older caches of the same file with the same settings
are removed. Afterwards everything is memory-mapped, so multi-GB data never sits in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from array import array
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from rwkv_peft.errors import RWKVPeftError

from .binidx import binidx_paths, default_file_mode, read_binidx

__all__ = [
    "CHAT_ASSISTANT",
    "CHAT_REPLY",
    "CHAT_SYSTEM",
    "CHAT_USER",
    "RENDER_LOSS_END",
    "RENDER_LOSS_START",
    "TrainingData",
    "chat_segments",
    "detect_jsonl_kind",
    "encode_segments",
    "iter_documents",
    "iter_jsonl",
    "load_training_data",
    "resolve_data_type",
    "tokenizer_fingerprint",
]

# World chat format (SPEC section 3). The reply template holds the trained text.
CHAT_SYSTEM = "System: {}\n\n"
CHAT_USER = "User: {}\n\n"
CHAT_ASSISTANT = "Assistant:"
CHAT_REPLY = " {}\n\n"

# render() wraps the tokens whose loss counts in these markers.
RENDER_LOSS_START = "\u27e6"  # ⟦
RENDER_LOSS_END = "\u27e7"  # ⟧

CACHE_FORMAT = 1
CACHE_DIRNAME = ".rwkv_peft_cache"
_TEXT_CHUNK = 1 << 20
_MAX_LINE_CHUNK = 16 << 20
_FLUSH_TOKENS = 1 << 20
_BLANK_LINES = re.compile(r"\n[^\S\n]*(?:\n[^\S\n]*)*\n")
_PROBE = "Hello, world! 12345 \u4f60\u597d\u3002\nUser: x\n\nAssistant: y \U0001F600 caf\u00e9"
_DATA_TYPES = {"auto": "auto", "txt": "txt", "text": "txt", "jsonl": "jsonl",
               "json": "jsonl", "binidx": "binidx"}
_MODES = ("pack", "pad")


# ----------------------------------------------------------------------------------------
# Chat / SFT rendering


def _clean_content(text: str) -> str:
    """Strip a message and turn every run of blank lines into one newline ("\\n\\n" ends a turn)."""
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n").strip())


def chat_segments(messages: Sequence[dict], where: str = "record") -> list[tuple[str, bool]]:
    """[(text, trained)] for a chat: maximal runs of text with the same loss flag."""
    if not isinstance(messages, list):
        raise RWKVPeftError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
    raw: list[tuple[str, bool]] = []
    for n, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RWKVPeftError(
                f"{where}: message {n} must be an object with 'role' and 'content' fields")
        role, content = msg["role"], msg["content"]
        if not isinstance(content, str):
            raise RWKVPeftError(f"{where}: message {n} content must be a string, "
                                f"got {type(content).__name__}")
        role = role.strip().lower() if isinstance(role, str) else role
        content = _clean_content(content)
        if role == "system":
            raw.append((CHAT_SYSTEM.format(content), False))
        elif role == "user":
            raw.append((CHAT_USER.format(content), False))
        elif role == "assistant":
            raw.append((CHAT_ASSISTANT, False))
            raw.append((CHAT_REPLY.format(content), True))
        else:
            raise RWKVPeftError(
                f"{where}: message {n} has role {msg['role']!r}; use 'system', 'user' or 'assistant'")
    return _merge_runs(raw)


def _merge_runs(raw: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, trained in raw:
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        else:
            out.append((text, trained))
    return out


def _fields_segments(rec: dict, fields: tuple[str, str], where: str) -> list[tuple[str, bool]]:
    values = []
    for name in fields:
        if name not in rec:
            raise RWKVPeftError(
                f"{where}: record has no field {name!r} (sft_fields={list(fields)}; "
                f"it has {sorted(rec)[:8]}); fix the record or pass the right --sft_fields")
        v = rec[name]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise RWKVPeftError(f"{where}: field {name!r} must be a string, got {type(v).__name__}")
        values.append(_clean_content(str(v)))
    return [(CHAT_USER.format(values[0]) + CHAT_ASSISTANT, False),
            (CHAT_REPLY.format(values[1]), True)]


def encode_segments(segments: Sequence[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenize each run separately and concatenate: (ids, per-token loss flags 0/1)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments:
        t = tokenizer.encode(text)
        ids += t
        mask += [int(trained)] * len(t)
    return ids, mask


# ----------------------------------------------------------------------------------------
# Reading source files


def resolve_data_type(path: str | os.PathLike, data_type: str = "auto") -> tuple[str, Path]:
    """("txt" | "jsonl" | "binidx", path) for a data path; RWKVPeftError if it cannot be used."""
    key = str(data_type).strip().lower()
    if key not in _DATA_TYPES:
        raise RWKVPeftError(
            f"unknown data_type {data_type!r}: use auto, txt, jsonl or binidx")
    kind = _DATA_TYPES[key]
    p = Path(path)
    bin_p, idx_p = binidx_paths(p)
    if kind == "auto":
        suffix = p.suffix.lower()
        if suffix == ".txt":
            kind = "txt"
        elif suffix in (".jsonl", ".json"):
            kind = "jsonl"
        elif suffix in (".bin", ".idx") or (not p.is_file() and bin_p.is_file() and idx_p.is_file()):
            kind = "binidx"
        elif p.exists():
            raise RWKVPeftError(
                f"cannot tell the data type of {p} from its extension: use .jsonl, .txt or a "
                "binidx pair (prefix.bin/.idx), or pass --data_type txt|jsonl|binidx")
    if kind == "binidx":
        return kind, p
    if not p.exists():
        raise RWKVPeftError(f"data file {p} not found")
    if not p.is_file():
        raise RWKVPeftError(f"data path {p} is not a file")
    return kind, p


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict | None, int]]:
    """(line number, record, bytes read) per line; record None for a blank line."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            nbytes = len(line)
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                yield lineno, None, nbytes
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError:
                raise RWKVPeftError(f"{path} line {lineno}: not valid UTF-8; re-save the file as UTF-8") from None
            except ValueError as e:
                hint = ("; the file looks like one JSON array, write one object per line (JSON lines)"
                        if lineno == 1 and line.lstrip().startswith(b"[") else "; fix or remove the line")
                raise RWKVPeftError(f"{path} line {lineno}: malformed JSON ({e}){hint}") from None
            if not isinstance(rec, dict):
                raise RWKVPeftError(
                    f"{path} line {lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec, nbytes


def detect_jsonl_kind(path: Path, sft_fields: tuple[str, str] | None) -> str:
    """"text", "chat" or "fields", from the first record of a .jsonl file."""
    if sft_fields is not None:
        return "fields"
    for lineno, rec, _ in iter_jsonl(path):
        if rec is None:
            continue
        if "messages" in rec:
            return "chat"
        if "text" in rec:
            return "text"
        raise RWKVPeftError(
            f"{path} line {lineno}: record has fields {sorted(rec)[:8]}; expected 'text' or "
            "'messages', or pass --sft_fields QUESTION_FIELD ANSWER_FIELD")
    raise RWKVPeftError(f"{path} has no records (empty file): nothing to train on")


def _safe_cut(buf: bytes) -> int:
    """Index just after the last "\\n" in buf that is followed by a non-whitespace byte; 0 if none."""
    end = len(buf) - 1  # the newline must have a byte after it
    while True:
        j = buf.rfind(b"\n", 0, end)
        if j < 0:
            return 0
        if not buf[j + 1 : j + 2].isspace():
            return j + 1
        end = j


def _utf8_boundary(buf: bytes, pos: int) -> int:
    while pos > 0 and (buf[pos] & 0xC0) == 0x80:
        pos -= 1
    return pos


def _iter_text_chunks(path: Path) -> Iterator[tuple[str, int]]:
    """(text, bytes read) pieces of a text file, cut so tokenization is not disturbed."""
    consumed = 0
    buf = b""
    with open(path, "rb") as f:
        first = True
        while True:
            data = f.read(_TEXT_CHUNK)
            if first and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
                consumed += 3
            first = False
            if data:
                buf += data
                cut = _safe_cut(buf)
                if cut == 0 and len(buf) > _MAX_LINE_CHUNK:
                    cut = _utf8_boundary(buf, len(buf) - 4) or len(buf)
                if cut == 0:
                    continue
            else:
                cut = len(buf)
            piece, buf = buf[:cut], buf[cut:]
            if piece:
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RWKVPeftError(
                        f"{path} is not valid UTF-8 (byte offset {consumed + e.start}); "
                        "re-save it as UTF-8") from None
                consumed += len(piece)
                yield text, len(piece)
            if not data:
                return


def iter_documents(path: Path, fmt: str, kind: str, tokenizer,
                   sft_fields: tuple[str, str] | None = None
                   ) -> Iterator[tuple[list[int], list[int] | None, bool, int]]:
    """Tokenized pieces of a txt/jsonl file: (ids, mask or None, ends_document, bytes read).

    Documents carry no eos here; the caller appends it. mask is None for plain text (all
    targets count). Empty documents are skipped (yielded with no ids).
    """
    if fmt == "txt":
        for text, nbytes in _iter_text_chunks(path):
            yield tokenizer.encode(text), None, False, nbytes
        yield [], None, True, 0
        return
    field = "messages" if kind == "chat" else "text"
    for lineno, rec, nbytes in iter_jsonl(path):
        if rec is None:
            yield [], None, False, nbytes
            continue
        where = f"{path} line {lineno}"
        if kind == "fields":
            ids, mask = encode_segments(_fields_segments(rec, sft_fields, where), tokenizer)
            yield ids, mask, True, nbytes
            continue
        if field not in rec:
            raise RWKVPeftError(
                f"{where}: record has no {field!r} field (the first record set the file's kind "
                f"to {kind}; this one has {sorted(rec)[:8]}); fix or remove the line")
        if kind == "chat":
            ids, mask = encode_segments(chat_segments(rec["messages"], where), tokenizer)
            yield ids, mask, True, nbytes
        else:
            text = rec["text"]
            if not isinstance(text, str):
                raise RWKVPeftError(f"{where}: 'text' must be a string, got {type(text).__name__}")
            yield tokenizer.encode(text), None, True, nbytes


# ----------------------------------------------------------------------------------------
# Cache


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
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=directory)
        os.close(fd)
        os.unlink(tmp)
        return True
    except OSError:
        return False


def _atomic_replace(tmp: str | Path, dest: Path) -> None:
    default_file_mode(tmp)
    os.replace(tmp, dest)


class _CacheFiles:
    def __init__(self, directory: Path, name: str, key: str):
        base = directory / f"{name}.{key}"
        self.dir = directory
        self.meta = Path(f"{base}.json")
        self.tokens = Path(f"{base}.tokens")
        self.mask = Path(f"{base}.mask")
        self.docs = Path(f"{base}.docs.npy")

    def all(self) -> list[Path]:
        return [self.meta, self.tokens, self.mask, self.docs]


def _read_cache(files: _CacheFiles, key: str) -> dict | None:
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


def _remove_stale(files: _CacheFiles, meta: dict) -> None:
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
    """Token ids (and masks) to temporary files; document offsets kept in a compact array."""

    def __init__(self, directory: Path, dtype: np.dtype, with_mask: bool):
        self.dtype = dtype
        self._tmp: list[str] = []
        self.tok_tmp = self._open(directory, "tokens")
        self.mask_tmp = self._open(directory, "mask") if with_mask else None
        self._tok_f = open(self.tok_tmp, "wb")
        self._mask_f = open(self.mask_tmp, "wb") if with_mask else None
        self._ids: list[int] = []
        self._mask: list[int] = []
        self.offsets = array("q", [0])
        self.n_tokens = 0
        self.loss_tokens = 0
        self.doc_open = 0  # tokens of the current (unfinished) document

    def _open(self, directory: Path, what: str) -> str:
        fd, tmp = tempfile.mkstemp(prefix=f".{what}.", suffix=".tmp", dir=directory)
        os.close(fd)
        self._tmp.append(tmp)
        return tmp

    def add(self, ids: list[int], mask: list[int] | None) -> None:
        self._ids += ids
        if self._mask_f is not None:
            self._mask += mask if mask is not None else [1] * len(ids)
        self.doc_open += len(ids)
        if len(self._ids) >= _FLUSH_TOKENS:
            self.flush()

    def end_document(self, eos: int, eos_trained: int) -> None:
        if self.doc_open == 0:
            return  # skip empty documents
        self._ids.append(eos)
        if self._mask_f is not None:
            self._mask.append(eos_trained)
        self.n_tokens += self.doc_open + 1
        self.offsets.append(self.n_tokens)
        self.doc_open = 0

    def flush(self) -> None:
        if self._ids:
            arr = np.asarray(self._ids, dtype=np.int64)
            np.asarray(arr, dtype=self.dtype).tofile(self._tok_f)
            self._ids = []
        if self._mask_f is not None and self._mask:
            m = np.asarray(self._mask, dtype=np.uint8)
            self.loss_tokens += int(m.sum(dtype=np.int64))
            m.tofile(self._mask_f)
            self._mask = []

    def close(self) -> None:
        self.flush()
        for f in (self._tok_f, self._mask_f):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def abort(self) -> None:
        for f in (self._tok_f, self._mask_f):
            if f is not None and not f.closed:
                f.close()
        for tmp in self._tmp:
            Path(tmp).unlink(missing_ok=True)


def _build_cache(path: Path, fmt: str, kind: str, tokenizer, sft_fields, files: _CacheFiles,
                 meta: dict, progress: bool) -> dict:
    from tqdm import tqdm

    vocab = int(tokenizer.vocab_size)
    dtype = _token_dtype(vocab)
    eos = int(tokenizer.eos_id)
    with_mask = kind in ("chat", "fields")
    eos_trained = 0 if with_mask else 1
    writer = _StreamWriter(files.dir, dtype, with_mask)
    total = path.stat().st_size
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
               desc=f"tokenizing {path.name}", disable=not progress, leave=False)
    try:
        line = 0
        for ids, mask, ends, nbytes in iter_documents(path, fmt, kind, tokenizer, sft_fields):
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
        writer.close()
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
        _atomic_replace(writer.tok_tmp, files.tokens)
        if with_mask:
            _atomic_replace(writer.mask_tmp, files.mask)
        fd, tmp = tempfile.mkstemp(prefix=".docs.", suffix=".npy.tmp", dir=files.dir)
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.frombuffer(writer.offsets, dtype=np.int64))
        _atomic_replace(tmp, files.docs)
        fd, tmp = tempfile.mkstemp(prefix=".meta.", suffix=".json.tmp", dir=files.dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        _atomic_replace(tmp, files.meta)
    finally:
        writer.abort()  # removes temporary files that were not moved into place
    _remove_stale(files, meta)
    return meta


# ----------------------------------------------------------------------------------------
# The data set


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
        for text, flag in _merge_runs([(t, f) for f, t in pieces]):
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
    """Open a data file for training (see the module docstring for formats and choices)."""
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

    p = p.resolve()
    st = p.stat()
    settings = {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer),
                "data_type": fmt, "kind": kind, "sft_fields": list(sft_fields or []),
                "template": [CHAT_SYSTEM, CHAT_USER, CHAT_ASSISTANT, CHAT_REPLY,
                             _BLANK_LINES.pattern]}
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    ident = {"settings": settings_key, "source": str(p), "size": st.st_size,
             "mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    meta0 = dict(ident, key=key, format=CACHE_FORMAT, kind=kind, data_type=fmt,
                 sft_fields=list(sft_fields or []), tokenizer=repr(tokenizer))

    preferred = Path(cache_dir) if cache_dir is not None else p.parent / CACHE_DIRNAME
    fallback = Path(tempfile.gettempdir()) / "rwkv_peft_cache"
    meta, files, hit = None, None, False
    for d in (preferred, fallback):
        f = _CacheFiles(d, p.name, key)
        meta = _read_cache(f, key)
        if meta is not None:
            files, hit = f, True
            break
    if meta is None:
        directory = preferred
        if not _writable(preferred):
            if not _writable(fallback):
                raise RWKVPeftError(
                    f"cannot write a token cache in {preferred} or {fallback}; pass a writable "
                    "--cache_dir")
            warnings.warn(f"{preferred} is not writable; caching tokens in {fallback}")
            directory = fallback
        files = _CacheFiles(directory, p.name, key)
        meta = _build_cache(p, fmt, kind, tokenizer, sft_fields, files, meta0, progress)

    offsets = np.load(files.docs)  # 8 bytes per document, needed for random access
    return TrainingData(
        ctx_len=int(ctx_len), mode=mode, sampling="windows" if mode == "pack" else "docs",
        seed=seed, tokenizer=tokenizer, token_file=(files.tokens, meta["dtype"], meta["tokens"]),
        mask_file=(files.mask, meta["tokens"]) if meta["has_mask"] else None,
        doc_offsets=offsets, source=str(path), kind=kind,
        loss_tokens=meta["loss_tokens"], cache_path=files.meta.with_suffix(""), cache_hit=hit)
