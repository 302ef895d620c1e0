"""Data files: which type a path holds, and its documents as token ids.

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
  Chats and SFT records are rendered in the World chat format (chat_format.py).
  A later record without those fields, malformed JSON, or a non-object line raises
  RWKVPeftError naming the file and line number.
- binidx: the Megatron `.bin`/`.idx` pair RWKV-LM trains on (see binidx.py), given as its
  prefix or either file. Plain tokens only: every target is trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from rwkv_peft.errors import RWKVPeftError

from .binidx import binidx_paths
from .chat_format import chat_segments, encode_segments, encode_text, fields_segments

__all__ = ["DATA_TYPES", "detect_jsonl_kind", "iter_documents", "iter_jsonl", "jsonl_records",
           "resolve_data_type"]

_TEXT_CHUNK = 1 << 20
_MAX_LINE_CHUNK = 16 << 20
# every data_type name accepted (train.py's --data_type offers exactly these) and what it means
DATA_TYPES = {"auto": "auto", "txt": "txt", "text": "txt", "jsonl": "jsonl",
              "json": "jsonl", "binidx": "binidx"}


def resolve_data_type(path: str | os.PathLike, data_type: str = "auto") -> tuple[str, Path]:
    """("txt" | "jsonl" | "binidx", path) for a data path; RWKVPeftError if it cannot be used."""
    key = str(data_type).strip().lower()
    if key not in DATA_TYPES:
        raise RWKVPeftError(
            f"unknown data_type {data_type!r}: use auto, txt, jsonl or binidx")
    kind = DATA_TYPES[key]
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


def jsonl_records(path: Path, missing: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) per non-blank line; RWKVPeftError(missing) when there is no such file."""
    if not path.is_file():
        raise RWKVPeftError(missing)
    for lineno, rec, _ in iter_jsonl(path):
        if rec is not None:
            yield lineno, rec


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
                   sft_fields: tuple[str, str] | None = None, max_tokens: int | None = None
                   ) -> Iterator[tuple[list[int], list[int] | None, bool, int]]:
    """Tokenized pieces of a txt/jsonl file: (ids, mask or None, ends_document, bytes read).

    Documents carry no eos here; the caller appends it. mask is None for plain text (all
    targets count). Empty documents are skipped (yielded with no ids). max_tokens: a record's
    first max_tokens ids only, for readers that use no more of it (one sample per record: its
    tokens up to ctx_len + 1); the rest of a long record is never tokenized (encode_text).
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
            ids, mask = encode_segments(fields_segments(rec, sft_fields, where), tokenizer, max_tokens)
            yield ids, mask, True, nbytes
            continue
        if field not in rec:
            raise RWKVPeftError(
                f"{where}: record has no {field!r} field (the first record set the file's kind "
                f"to {kind}; this one has {sorted(rec)[:8]}); fix or remove the line")
        if kind == "chat":
            ids, mask = encode_segments(chat_segments(rec["messages"], where), tokenizer, max_tokens)
            yield ids, mask, True, nbytes
        else:
            text = rec["text"]
            if not isinstance(text, str):
                raise RWKVPeftError(f"{where}: 'text' must be a string, got {type(text).__name__}")
            yield encode_text(text, tokenizer, max_tokens), None, True, nbytes
