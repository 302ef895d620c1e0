"""Tokenizers: the RWKV World vocabulary and Hugging Face `tokenizers` JSON files.

Both share one small interface (`Tokenizer`): `encode`, `decode` (never raises on invalid
UTF-8: bad bytes become U+FFFD), `decode_bytes` (exact bytes, for streaming output token by
token), `vocab_size` and `eos_id`. `load_tokenizer(spec)` picks one from a string.

World encoding is greedy longest match over UTF-8 bytes (docs/formats.md section 3). `WorldTokenizer`
encodes `str` with the Rust library pyrwkv-tokenizer when it is installed, and otherwise
with the pure-Python encoder below, which is also always used for `encode_bytes` input that
is not valid UTF-8 (the library accepts only `str`). Decoding is always done here (the
library decodes id 0 as "\\x00" and panics on invalid UTF-8).

Decision, from `python bench/bench_tokenizer.py --fuzz 267000` (bench/README.md: 4 MB mixed
corpus, best of 3, one thread, Python 3.11 x86_64 on a shared 2-core machine, so speeds are
rough; ids checked against the official rwkv TRIE_TOKENIZER on the whole corpus, edge cases
and 267,000 random short strings):

    implementation               encode MB/s  build   memory   identical ids
    rwkv TRIE_TOKENIZER (ref.)    2.2         3.3 s   309 MB   (reference)
    this module, pure Python      3.6         0.4 s    31 MB   yes, also for invalid UTF-8
    pyrwkv-tokenizer 0.9.1       39-62        0.3 s   243 MB   yes (accepts str only)
    rwkv-tokenizer 0.5.2         54-56        0.3 s   243 MB   yes (accepts str only)

pyrwkv-tokenizer is used when importable: it is maintained (0.9.1, March 2025), has wheels
for CPython 3.11 on x86_64 and aarch64, gave identical ids on everything above, and is
11-14x faster (ratios within one run). rwkv-tokenizer (same author) is not used: its one newer
release, 0.11.0, has a wheel only for CPython 3.10 x86_64. The pure-Python encoder stays
as the fallback; it is needed
for bytes input anyway. pyrwkv-tokenizer is checked on a probe string when loaded (it
panics on some valid vocab files) and skipped with a warning if it fails or disagrees.
Pass `backend="python"` to avoid its ~240 MB per process.

Pure-Python encoder: a dict from every prefix (2+ bytes) of every token to the id of the
longest token that is a prefix of it. At each position the match is extended one byte at a
time while the bytes are still such a prefix; the last value seen is the longest token.
"""

from __future__ import annotations

import ast
import warnings
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
    "tokenizer_for",
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

    Uses importlib.resources, so only the (empty) `rwkv/__init__.py` runs, never
    `rwkv.model`, which has import-time side effects.
    """
    try:
        entry = resources.files("rwkv").joinpath(WORLD_VOCAB_FILE)
        if entry.is_file():
            return Path(str(entry))
    except (ImportError, TypeError, OSError):
        pass
    raise RWKVPeftError(
        f"RWKV World vocab file {WORLD_VOCAB_FILE} not found: run `pip install rwkv`, "
        "or pass vocab_file= with the path of the file"
    )


def _parse_literal(lit: str) -> bytes | None:
    """Bytes of one Python str/bytes literal from the vocab file, or None if it is not one.

    A quoted str without backslashes (most lines) is sliced directly; everything else goes
    through ast.literal_eval, which accepts only literals and never runs code.
    """
    if len(lit) >= 2 and lit[0] == lit[-1] and lit[0] in "'\"" and "\\" not in lit:
        inner = lit[1:-1]
        if lit[0] not in inner:
            return inner.encode("utf-8")
    try:
        value = ast.literal_eval(lit)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as '\ud800'
            return None
    return value if isinstance(value, bytes) else None


def parse_world_vocab(text: str, source: str = "vocab") -> dict[int, bytes]:
    """Parse `<id> <str or bytes literal> <byte length>` lines into {id: token bytes}.

    Every line is checked (literal, stated length, id, duplicates); the first problem
    raises RWKVPeftError naming `source` and the line number.
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
            raise RWKVPeftError(f"{where}: not a Python str or bytes literal: {line[:60]!r}")
        if len(token) != length:
            raise RWKVPeftError(f"{where}: token is {len(token)} bytes but the line says {length}")
        if idx < 1:
            raise RWKVPeftError(f"{where}: id {idx} must be 1 or more (0 is end-of-text)")
        if idx in vocab or token in seen:
            raise RWKVPeftError(f"{where}: duplicate id {idx} or token {token!r}")
        vocab[idx] = token
        seen.add(token)
    if not vocab:
        raise RWKVPeftError(f"{source}: no tokens found")
    return vocab


# ----------------------------------------------------------------------------------------
# World tokenizer

# Checked against the pure-Python encoder before the Rust library is trusted with a file.
_PROBE = (
    "The Eiffel tower is in the city of Paris.\n\nUser: hi\n\nAssistant: 你好！今天是美好的一天。"
    "日本語のテキスト Привет, мир! 😀👨‍👩‍👧 \t\r\n" + " " * 130 + "def f(x):\n    return x**2  # ok\n"
    "\x00\x7f\u00e9\u3000\U0010ffff" + "-" * 90
)

_BACKENDS = ("auto", "python", "pyrwkv")


class WorldTokenizer:
    """RWKV World tokenizer: 65536 ids, greedy longest match over UTF-8 bytes.

    id 0 is end-of-text (not in the vocab file) and decodes to nothing. All 256 single
    bytes are tokens, so any bytes round-trip exactly through encode_bytes/decode_bytes.

    backend: "auto" (pyrwkv-tokenizer for str input if installed, else pure Python),
    "python", or "pyrwkv" (require the library). `self.backend` says which is in use.
    Instances pickle by file path (the library's object cannot be pickled), so they can
    be sent to DataLoader worker processes.
    """

    eos_id = 0

    def __init__(self, vocab_file: str | Path | None = None, backend: str = "auto"):
        if backend not in _BACKENDS:
            raise RWKVPeftError(f"unknown World tokenizer backend {backend!r}: use one of {_BACKENDS}")
        # for pickling: rebuilt from the file in the receiving process
        self._args = (None if vocab_file is None else str(Path(vocab_file).resolve()), backend)
        path = Path(vocab_file) if vocab_file is not None else find_world_vocab()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RWKVPeftError(f"cannot read World vocab file {path}: {e}") from None
        self.vocab_file = path
        vocab = parse_world_vocab(text, str(path))
        to_id = {tok: i for i, tok in vocab.items()}
        missing = [c for c in range(256) if bytes([c]) not in to_id]
        if missing:
            raise RWKVPeftError(f"{path}: not a World vocab, single bytes {missing[:5]} are not tokens")

        self.max_id = max(vocab)
        self.vocab_size = max(WORLD_VOCAB_SIZE, self.max_id + 1)
        self._to_bytes: dict[int, bytes] = {0: b""}
        self._to_bytes.update(vocab)
        self._to_id = to_id
        self._length = [0] * self.vocab_size  # token id -> byte length
        for i, tok in vocab.items():
            self._length[i] = len(tok)
        self._byte_id = [to_id[bytes([c])] for c in range(256)]
        # Every prefix of 2+ bytes of every token -> id of the longest token that is a
        # prefix of it (about 116k keys for the World vocab).
        longest: dict[bytes, int] = {}
        for tok in to_id:
            best = self._byte_id[tok[0]]
            for n in range(2, len(tok) + 1):
                key = tok[:n]
                best = to_id.get(key, best)
                longest[key] = best
        self._longest = longest

        self._rust = None
        self.backend = "python"
        if backend != "python":
            self._rust = self._load_rust(required=backend == "pyrwkv")
            if self._rust is not None:
                self.backend = "pyrwkv-tokenizer"

    def _load_rust(self, required: bool):
        try:
            import pyrwkv_tokenizer
        except ImportError:
            if required:
                raise RWKVPeftError(
                    "backend='pyrwkv' needs pyrwkv-tokenizer: pip install pyrwkv-tokenizer"
                ) from None
            return None
        try:
            rust = pyrwkv_tokenizer.WorldTokenizer(str(self.vocab_file))
            agrees = rust.encode(_PROBE) == self._encode_python(_PROBE.encode("utf-8"))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - Rust panics are BaseException; any failure: don't use it
            agrees, reason = False, f"{type(e).__name__}: {e}"
        else:
            reason = "its ids differ from the pure-Python encoder"
        if agrees:
            return rust
        msg = f"pyrwkv-tokenizer not used for {self.vocab_file}: {reason}"
        if required:
            raise RWKVPeftError(msg)
        warnings.warn(msg + "; using the pure-Python encoder", RuntimeWarning, stacklevel=3)
        return None

    def __reduce__(self):
        return (type(self), self._args)

    def __repr__(self) -> str:
        return f"WorldTokenizer(vocab_file={str(self.vocab_file)!r}, backend={self.backend!r})"

    # -- encoding ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self._rust is not None:
            return self._rust.encode(text)
        return self._encode_python(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes (they need not be valid UTF-8)."""
        data = bytes(data)
        if self._rust is not None:
            try:
                return self._rust.encode(data.decode("utf-8"))
            except UnicodeDecodeError:
                pass
        return self._encode_python(data)

    def _encode_python(self, data: bytes) -> list[int]:
        longest = self._longest.get
        byte_id, length = self._byte_id, self._length
        out: list[int] = []
        append = out.append
        i, n = 0, len(data)
        while i < n:
            tid = longest(data[i : i + 2])
            if tid is None:  # no token of 2+ bytes starts here
                append(byte_id[data[i]])
                i += 1
                continue
            j = i + 3
            while j <= n:
                longer = longest(data[i:j])
                if longer is None:
                    break
                tid = longer
                j += 1
            append(tid)
            i += length[tid]
        return out

    # -- decoding ------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of the ids (id 0 gives nothing); unknown ids raise RWKVPeftError."""
        table = self._to_bytes
        if not isinstance(ids, (list, tuple)):
            ids = list(ids)  # may be a generator, read twice below
        try:
            return b"".join([table[i] for i in ids])
        except (KeyError, TypeError):
            pass
        parts = []
        for i in ids:  # slow path: numpy/torch integers, or find the bad id for the message
            try:
                parts.append(table[int(i)])
            except (KeyError, TypeError, ValueError):
                raise RWKVPeftError(
                    f"token id {i!r} is not in the RWKV World vocab (valid ids: 0..{self.max_id})"
                ) from None
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: bytes | str) -> int | None:
        """The id of one vocab entry (e.g. "\\n\\n"), or None if it is not one."""
        if isinstance(token, str):
            token = token.encode("utf-8")
        return self._to_id.get(token)


# ----------------------------------------------------------------------------------------
# Hugging Face tokenizers

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]", "<|im_end|>")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (tokenizer.json)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise RWKVPeftError(f"loading {self.path} needs the tokenizers package: pip install tokenizers") from None
        if not self.path.is_file():
            raise RWKVPeftError(f"tokenizer file {self.path} does not exist (expected a tokenizers .json file)")
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RWKVPeftError(f"cannot read tokenizer file {self.path}: {first}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()

    def _find_eos(self) -> int:
        try:
            added = self._tok.get_added_tokens_decoder()  # tokenizers >= 0.14
        except AttributeError:
            added = {}
        special = {t.content: i for i, t in added.items() if t.special}
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
    if isinstance(spec, (str, Path)) and str(spec).lower().endswith(".json"):
        return HFTokenizer(spec)
    raise RWKVPeftError(
        f"unknown tokenizer {spec!r}: pass 'world' for the RWKV World vocab "
        "or the path of a Hugging Face tokenizers .json file"
    )


def check_fits_model(tokenizer: Tokenizer, vocab_rows: int, spec) -> None:
    """Refuse a tokenizer whose ids would index past the model's embedding rows."""
    if tokenizer.vocab_size > vocab_rows:
        raise RWKVPeftError(f"--tokenizer {spec} has {tokenizer.vocab_size} ids but the model's vocabulary has "
                            f"{vocab_rows}; pass the tokenizer the model was trained with")


def tokenizer_for(vocab_rows: int, spec: str = "auto"):
    """The tokenizer for a model whose embedding has vocab_rows rows.

    spec "auto": the demo's tokenizer.json when its size equals vocab_rows (the demo model
    stores no tokenizer; this is how it is recognised), the World tokenizer for 65536 rows;
    anything else must be named. "world" or a tokenizer.json path: that one, checked to fit.
    """
    from ..assets import DEMO_TOKENIZER

    demo = load_tokenizer(DEMO_TOKENIZER) if spec == "auto" and DEMO_TOKENIZER.exists() else None
    if spec != "auto":
        tok = load_tokenizer(spec)
    elif demo is not None and demo.vocab_size == vocab_rows:
        tok = demo
    elif vocab_rows == WORLD_VOCAB_SIZE:
        tok = load_tokenizer("world")
    else:
        raise RWKVPeftError(f"the model has {vocab_rows} vocabulary rows, which fits neither the demo's "
                            f"tokenizer ({DEMO_TOKENIZER}) nor the World tokenizer ({WORLD_VOCAB_SIZE}); "
                            "pass --tokenizer FILE.json")
    check_fits_model(tok, vocab_rows, spec)
    return tok
