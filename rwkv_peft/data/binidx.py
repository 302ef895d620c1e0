"""The Megatron "mmap indexed dataset" `.bin`/`.idx` pair that RWKV-LM trains on.

Format (little-endian), as written by Megatron-LM's MMapIndexedDatasetBuilder and read by
RWKV-LM's `src/binidx.py`; this module is an independent implementation from that spec:

`.bin`: the token ids of every sequence, back to back, in the dtype named by the index.
        RWKV-LM reads the whole file as one token stream; its `make_data.py` writes one
        sequence per document, each ending with token 0 (end-of-text).
`.idx`: offset  size            field
        0       9               magic  b"MMIDIDX\\x00\\x00"
        9       8   uint64      version (1)
        17      1   uint8       dtype code (DTYPE_CODES: 8 = uint16, 4 = int32, ...)
        18      8   uint64      number of sequences S
        26      8   uint64      number of document-index entries D
        34      4*S int32       sizes: tokens in each sequence
        ..      8*S int64       pointers: byte offset of each sequence in the .bin
        ..      8*D int64       doc index: first sequence of each document, then S
                                (Megatron's builder starts it with 0 and appends the
                                sequence count at every end_document(), so D = documents + 1)

`read_binidx` memory-maps the .bin with numpy (nothing is loaded into RAM) and checks that
the two files agree; `BinIdxWriter` streams sequences to disk and writes both files
atomically (rwkv_peft.io: temporary names, renamed when complete, the .idx last).
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.io import AtomicFile, atomic_file, check_output_file

__all__ = [
    "BinIdx",
    "BinIdxWriter",
    "DTYPE_CODES",
    "IDX_MAGIC",
    "binidx_paths",
    "read_binidx",
    "token_dtype_for_vocab",
]

IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, doc-index entries
HEADER_SIZE = _HEADER.size  # 34

# Megatron's dtype codes. 6 and 7 are floating-point types, never token ids.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
_FLOAT_CODES = {6: "float64", 7: "float32/float64"}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The binidx dtype RWKV-LM uses: uint16 when every id fits, else int32 (no uint32 code)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def binidx_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(prefix.bin, prefix.idx) from a prefix, `prefix.bin` or `prefix.idx`."""
    p = Path(path)
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    return Path(str(p) + ".bin"), Path(str(p) + ".idx")


class BinIdx:
    """A read-only binidx pair.

    tokens:    the whole .bin as one 1-D memory-mapped array (RWKV-LM's token stream)
    sizes:     int32 [S] tokens per sequence;  pointers: int64 [S] byte offsets
    doc_idx:   int64 [D] Megatron document index (first sequence of each document, then S)
    """

    def __init__(self, bin_path: Path, idx_path: Path, dtype: np.dtype, version: int,
                 sizes: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray):
        self.bin_path, self.idx_path = bin_path, idx_path
        self.dtype, self.version = dtype, version
        self.sizes, self.pointers, self.doc_idx = sizes, pointers, doc_idx
        n = int(sizes.sum(dtype=np.int64))
        # np.memmap cannot map an empty file; an empty pair gives an empty array.
        self.tokens = (np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)) if n
                       else np.zeros(0, dtype=dtype))

    def __len__(self) -> int:
        """Number of sequences (one per document for files written by make_data/prepare)."""
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def sequence(self, i: int) -> np.ndarray:
        """Token ids of sequence i (a memory-mapped view)."""
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def __repr__(self) -> str:
        return (f"BinIdx({str(self.bin_path)!r}, sequences={len(self)}, "
                f"tokens={self.num_tokens}, dtype={self.dtype.name})")


def read_binidx(path: str | os.PathLike) -> BinIdx:
    """Open a binidx pair given its prefix or either file; RWKVPeftError if it is unusable."""
    bin_path, idx_path = binidx_paths(path)
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise RWKVPeftError(
                f"binidx file {p} not found: a binidx data set needs both {bin_path.name} and "
                f"{idx_path.name} (create them with python -m rwkv_peft.data.prepare)")
    idx_bytes = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE or head[:9] != IDX_MAGIC:
        raise RWKVPeftError(
            f"{idx_path} is not a Megatron binidx index (expected the magic {IDX_MAGIC!r} at "
            "the start); re-create it with python -m rwkv_peft.data.prepare")
    _, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if version != IDX_VERSION:
        raise RWKVPeftError(f"{idx_path}: index version {version} is not supported (only 1)")
    if code in _FLOAT_CODES:
        raise RWKVPeftError(
            f"{idx_path}: dtype code {code} is {_FLOAT_CODES[code]}, not token ids; "
            "re-create the pair with integer tokens")
    if code not in DTYPE_CODES:
        raise RWKVPeftError(
            f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    dtype = DTYPE_CODES[code]
    expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc
    if idx_bytes != expected:
        raise RWKVPeftError(
            f"{idx_path} is {idx_bytes} bytes but its header ({n_seq} sequences, {n_doc} "
            f"document entries) needs {expected}: the file is truncated or corrupt")
    off = HEADER_SIZE
    sizes = np.fromfile(idx_path, dtype="<i4", count=n_seq, offset=off)
    off += 4 * n_seq
    pointers = np.fromfile(idx_path, dtype="<i8", count=n_seq, offset=off)
    off += 8 * n_seq
    doc_idx = np.fromfile(idx_path, dtype="<i8", count=n_doc, offset=off)

    bin_bytes = bin_path.stat().st_size
    total = int(sizes.sum(dtype=np.int64)) * dtype.itemsize
    fix = ("the pair does not match (mixed up or partly written?); re-create both with "
           "python -m rwkv_peft.data.prepare")
    if (sizes < 0).any():
        raise RWKVPeftError(f"{idx_path}: negative sequence sizes; {fix}")
    if bin_bytes != total:
        raise RWKVPeftError(
            f"{bin_path} has {bin_bytes} bytes but {idx_path} describes {total} "
            f"({n_seq} sequences of {dtype.name}): {fix}")
    if n_seq and ((pointers < 0).any()
                  or (pointers + sizes.astype(np.int64) * dtype.itemsize > bin_bytes).any()):
        raise RWKVPeftError(
            f"{idx_path} points past the end of {bin_path} ({bin_bytes} bytes): {fix}")
    return BinIdx(bin_path, idx_path, dtype, version, sizes, pointers, doc_idx)


class BinIdxWriter:
    """Stream sequences into `prefix.bin` / `prefix.idx`.

    Each add() writes one sequence and (by default) ends one document, as make_data does.
    Both files are written under temporary names and renamed in close(); abort() (or an
    exception inside a `with` block) removes them, so no half-written pair is ever left.
    Sizes are kept in a compact array (4 bytes per sequence), the tokens go straight to disk.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise RWKVPeftError(f"binidx cannot store {self.dtype.name} tokens")
        self.bin_path, self.idx_path = binidx_paths(prefix)
        check_output_file(self.idx_path)  # written last: checked before the work, as the .bin is here
        self._bin = AtomicFile(self.bin_path)  # raises if the directory is missing or read-only
        self._sizes = array("i")
        self._doc_idx = array("q", [0])
        self._info = np.iinfo(self.dtype)
        self.num_tokens = 0

    def add(self, ids, end_document: bool = True) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < self._info.min or arr.max() > self._info.max):
            raise RWKVPeftError(
                f"token id {int(arr.max())} does not fit {self.dtype.name} in {self.bin_path}")
        if arr.size >= 2**31:
            raise RWKVPeftError("a single binidx sequence must have fewer than 2**31 tokens")
        self._bin.write(memoryview(np.ascontiguousarray(arr.astype(self.dtype.newbyteorder("<"), copy=False))))
        self._sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)
        if end_document:
            self.end_document()

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        """Finish both files and move them to their real names (.idx last)."""
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if self._sizes else np.zeros(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        try:
            with atomic_file(self.idx_path) as f:
                f.write(_HEADER.pack(IDX_MAGIC, IDX_VERSION, _CODE_OF[self.dtype],
                                     len(sizes), len(doc_idx)))
                f.write(sizes.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(doc_idx.astype("<i8").tobytes())
                # the .bin goes into place before the .idx that describes it
                self._bin.commit()
        except BaseException:
            self._bin.discard()
            raise

    def abort(self) -> None:
        self._bin.discard()

    def __enter__(self) -> "BinIdxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
