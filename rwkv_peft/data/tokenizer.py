"""Tokenizers: the RWKV World vocabulary and Hugging Face `tokenizers` JSON files.

Both kinds share one small interface (`Tokenizer`): `encode`, `decode` (never raises on
invalid UTF-8: bad bytes become U+FFFD), `decode_bytes` (exact bytes, for streaming output
token by token), `vocab_size` and `eos_id`. `load_tokenizer(spec)` picks one from a string.

World encoding is greedy longest match over the UTF-8 bytes (SPEC section 3). The encoder
here is pure Python: text is split by a regex into small pieces (a word with its leading
space, a run of whitespace, a run of punctuation, one UTF-8 character), and the ids of each
piece are cached, keyed by the piece plus the first byte of the following piece. A piece's
cached ids are reused only if no vocab entry could extend across its end (checked once per
key with a bisect over the sorted vocab); otherwise the unsure tail (< 128 bytes) is carried
into the next piece. The result is exactly the greedy longest match, just computed mostly
from dictionary hits.

Decision (measured with `python bench/bench_tokenizer.py`, 4 MB mixed corpus, 1 core):
own implementation, no Rust library.
  this module             ~9 MB/s   identical ids; builds in ~0.3 s, ~25 MB
  pyrwkv-tokenizer 0.9.1  ~16 MB/s  identical ids on str input; str only (no bytes),
                                    decodes id 0 as "\\x00", panics on invalid UTF-8
  rwkv-tokenizer 0.5.2    ~15 MB/s  same code base and behaviour, older release
  rwkv TRIE_TOKENIZER     ~1.5 MB/s the reference; 2.3 s and ~300 MB to build
The libraries are under 2x faster on realistic text and cannot encode arbitrary bytes, so
they would need this implementation beside them anyway; tokenizing is not the bottleneck
of fine-tuning. Not depending on them keeps one code path with exactly known behaviour.
"""

from __future__ import annotations

import ast
import json
import re
from itertools import accumulate, islice
from importlib import resources
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from rwkv_peft.errors import RWKVPeftError

__all__ = [
    "HFTokenizer",
    "Tokenizer",
    "WORLD_VOCAB_FILE",
    "WorldTokenizer",
    "find_world_vocab",
    "load_tokenizer",
    "parse_world_vocab",
]

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536  # embedding rows of World models; the file uses ids 1..65529


@runtime_checkable
class Tokenizer(Protocol):
    """What training, the chat demo and the tests need from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


# ----------------------------------------------------------------------------------------
# World vocabulary file


def find_world_vocab() -> Path:
    """Path of the World vocab file shipped inside the installed `rwkv` package.

    Uses importlib.resources, so `rwkv.model` (which has import-time side effects) is never
    imported; only the empty `rwkv/__init__.py` runs.
    """
    try:
        entry = resources.files("rwkv").joinpath(WORLD_VOCAB_FILE)
        if entry.is_file():
            return Path(str(entry))
    except (ImportError, TypeError, OSError):
        pass
    raise RWKVPeftError(
        f"RWKV World vocab file {WORLD_VOCAB_FILE} not found: run `pip install rwkv`, "
        "or pass vocab_file= pointing at the file"
    )


def _parse_literal(lit: str) -> bytes | None:
    """Bytes of one Python str/bytes literal from the vocab file, or None if not one.

    The common case (a quoted str with no backslash) is sliced directly; anything else goes
    through ast.literal_eval, which only accepts literals and never runs code.
    """
    if len(lit) >= 2 and lit[0] == lit[-1] and lit[0] in "'\"" and "\\" not in lit:
        inner = lit[1:-1]
        if lit[0] not in inner:
            return inner.encode("utf-8")
    try:
        value = ast.literal_eval(lit)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    return None


def parse_world_vocab(text: str, source: str = "vocab") -> dict[int, bytes]:
    """Parse `<id> <str or bytes literal> <byte length>` lines into {id: token bytes}.

    Checks every line (literal, stated length, id range, duplicates) and raises
    RWKVPeftError naming the source and line number on the first problem.
    """
    vocab: dict[int, bytes] = {}
    seen: set[bytes] = set()
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        first, last = line.find(" "), line.rfind(" ")
        where = f"{source} line {lineno}"
        if first <= 0 or last <= first:
            raise RWKVPeftError(f"{where}: expected '<id> <literal> <length>', got {line[:60]!r}")
        try:
            idx, length = int(line[:first]), int(line[last + 1 :])
        except ValueError:
            raise RWKVPeftError(f"{where}: id and length must be integers, got {line[:60]!r}") from None
        token = _parse_literal(line[first + 1 : last])
        if token is None:
            raise RWKVPeftError(f"{where}: token is not a Python str or bytes literal: {line[:60]!r}")
        if len(token) != length:
            raise RWKVPeftError(f"{where}: token is {len(token)} bytes but the line says {length}")
        if not 0 < idx < WORLD_VOCAB_SIZE:
            raise RWKVPeftError(f"{where}: id {idx} outside 1..{WORLD_VOCAB_SIZE - 1}")
        if idx in vocab or token in seen:
            raise RWKVPeftError(f"{where}: duplicate id or token {token!r}")
        vocab[idx] = token
        seen.add(token)
    if not vocab:
        raise RWKVPeftError(f"{source}: no tokens found")
    return vocab


# ----------------------------------------------------------------------------------------
# World tokenizer

# Splits bytes into pieces; every byte belongs to exactly one alternative, so the pieces
# always cover the input. Piece boundaries only affect speed, never the ids.
_PIECE_RE = re.compile(
    rb" ?[A-Za-z]+"  # a word with its leading space
    rb"| ?[0-9]+"
    rb"| ?[^\sA-Za-z0-9\x80-\xff]+"  # punctuation, '_', control bytes
    rb"|\s+"
    rb"|[\xc0-\xff][\x80-\xbf]{0,3}"  # one UTF-8 character (or a malformed lead byte)
    rb"|[\x80-\xbf]"  # a stray continuation byte
)

_CACHE_LIMIT = 1 << 17  # cached pieces per tokenizer; cleared when full


class WorldTokenizer:
    """RWKV World tokenizer: 65536 ids, greedy longest match over UTF-8 bytes.

    id 0 is end-of-text (not in the vocab file) and decodes to nothing. All 256 single
    bytes are tokens, so any bytes round-trip exactly through encode_bytes/decode_bytes.
    Thread-safe for concurrent encode calls (the piece cache is a plain dict).
    """

    eos_id = 0
    vocab_size = WORLD_VOCAB_SIZE

    def __init__(self, vocab_file: str | Path | None = None):
        path = Path(vocab_file) if vocab_file is not None else find_world_vocab()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RWKVPeftError(f"cannot read World vocab file {path}: {e}") from None
        self.vocab_file = path
        vocab = parse_world_vocab(text, str(path))
        tokens = set(vocab.values())
        missing = [b for b in range(256) if bytes([b]) not in tokens]
        if missing:
            raise RWKVPeftError(
                f"{path}: not a World vocab, single bytes {missing[:5]} are not tokens"
            )
        self._id_to_bytes: dict[int, bytes] = {0: b""}
        self._id_to_bytes.update(vocab)
        self._bytes_to_id: dict[bytes, int] = {tok: i for i, tok in vocab.items()}
        # Every prefix (2+ bytes) of every token -> that token's id, or 0 if the prefix is
        # not itself a token (~116k keys, ~8 MB). The encoder walks forward through it.
        prefixes: dict[bytes, int] = {}
        for tok in self._bytes_to_id:
            for n in range(2, len(tok)):
                prefixes.setdefault(tok[:n], 0)
        for tok, i in self._bytes_to_id.items():
            if len(tok) > 1:
                prefixes[tok] = i
        self._prefixes = prefixes
        self._byte_ids: list[int] = [self._bytes_to_id[bytes([c])] for c in range(256)]
        self._cache: dict[bytes, tuple[list[int], int]] = {}

    def __repr__(self) -> str:
        return f"WorldTokenizer(vocab_file={str(self.vocab_file)!r})"

    # -- encoding ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes (they need not be valid UTF-8)."""
        data = bytes(data)
        pieces = _PIECE_RE.findall(data)
        if not pieces:
            return []
        cache, resolve = self._cache, self._resolve
        out: list[int] = []
        start = 0  # a token boundary: everything before it is in `out`
        ends = accumulate(map(len, pieces))
        for end in islice(ends, len(pieces) - 1):
            key = data[start : end + 1]  # the pending bytes plus the next byte
            hit = cache.get(key)
            if hit is None:
                hit = resolve(key)
            out += hit[0]
            start = end - hit[1]
        out += self._greedy(data[start:])
        return out

    def _greedy(self, data: bytes) -> list[int]:
        """Plain greedy longest match over all of `data` (nothing after it)."""
        prefixes, byte_ids = self._prefixes, self._byte_ids
        out: list[int] = []
        i, n = 0, len(data)
        while i < n:
            # Extend the match one byte at a time while it is still a prefix of some token,
            # remembering the longest one that is a whole token.
            best, size = byte_ids[data[i]], 1
            j = i + 2
            while j <= n:
                tid = prefixes.get(data[i:j])
                if tid is None:
                    break
                if tid:
                    best, size = tid, j - i
                j += 1
            out.append(best)
            i += size
        return out

    def _resolve(self, key: bytes) -> tuple[list[int], int]:
        """For pending bytes key[:-1] followed by the byte key[-1:]: the ids that are final,
        and how many trailing bytes stay pending because a token could extend past the end.
        Cached under `key`."""
        size = len(key) - 1
        chunk, nxt = key[:size], key[size:]
        ids = self._greedy(chunk)
        prefixes, id_to_bytes = self._prefixes, self._id_to_bytes
        start = 0
        for n, tid in enumerate(ids):
            # A longer token could start here iff chunk[start:] + nxt begins some token.
            if chunk[start:] + nxt in prefixes:
                result = (ids[:n], size - start)
                break
            start += len(id_to_bytes[tid])
        else:
            result = (ids, 0)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = result
        return result

    # -- decoding ------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of the ids (id 0 gives nothing); unknown ids raise RWKVPeftError."""
        table = self._id_to_bytes
        try:
            return b"".join([table[i] for i in ids])
        except (KeyError, TypeError):
            pass
        parts = []
        for i in ids:  # slow path: accept numpy/torch integers, name the bad id
            try:
                parts.append(table[int(i)])
            except (KeyError, TypeError, ValueError):
                raise RWKVPeftError(
                    f"token id {i!r} is not in the RWKV World vocab (valid: 0..65529)"
                ) from None
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> bytes:
        return self.decode_bytes([i])

    def token_to_id(self, token: bytes | str) -> int | None:
        if isinstance(token, str):
            token = token.encode("utf-8")
        return self._bytes_to_id.get(token)


# ----------------------------------------------------------------------------------------
# Hugging Face tokenizers

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]", "<|im_end|>")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (tokenizer.json)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError:
            raise RWKVPeftError(
                f"loading {self.path} needs the `tokenizers` package: pip install tokenizers"
            ) from None
        if not self.path.is_file():
            raise RWKVPeftError(f"tokenizer file {self.path} does not exist")
        try:
            self._tok = _HFTok.from_file(str(self.path))
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RWKVPeftError(f"cannot read tokenizer file {self.path}: {msg}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()

    def _find_eos(self) -> int:
        special = {}
        try:
            added = json.loads(self.path.read_text(encoding="utf-8")).get("added_tokens") or []
            special = {t["content"]: t["id"] for t in added if t.get("special")}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
        for name in _EOS_NAMES:
            if name in special:
                return int(special[name])
        for name in _EOS_NAMES:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return int(tid)
        return 0

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")


# ----------------------------------------------------------------------------------------


def load_tokenizer(spec: str | Path | None = None) -> Tokenizer:
    """None or "world" -> WorldTokenizer; a path ending in .json -> HFTokenizer."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "world"):
        return WorldTokenizer()
    if str(spec).lower().endswith(".json"):
        return HFTokenizer(spec)
    raise RWKVPeftError(
        f"unknown tokenizer {str(spec)!r}: pass 'world' for the RWKV World vocab "
        "or the path of a Hugging Face tokenizer .json file"
    )
