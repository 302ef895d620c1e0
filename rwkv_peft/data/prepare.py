"""Convert a text data set to the binidx pair RWKV-LM trains on.

    python -m rwkv_peft.data.prepare in.jsonl out_prefix [--tokenizer world|file.json]

Reads `{"text": ...}` JSON lines (or a .txt file, which is one document) and writes
out_prefix.bin / out_prefix.idx as RWKV-LM's make_data.py does: one sequence per document,
each followed by token 0 (end-of-text), uint16 ids for vocabularies up to 65536 (else int32).
Both files are written under temporary names and renamed at the end; neither may be the
input or the tokenizer file, and both are checked writable before tokenizing starts.

Only plain text: chat/SFT data needs per-token loss masks, which binidx cannot hold. Train
on the .jsonl directly instead; train.py tokenizes it once into a cache with its masks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import command, run_command
from ..errors import RWKVPeftError
from ..io import check_not_inputs

from .binidx import BinIdxWriter, binidx_paths, token_dtype_for_vocab
from .sources import detect_jsonl_kind, iter_documents, resolve_data_type
from .tokenizer import load_tokenizer

_SFT_NOTE = ("binidx cannot hold loss masks, so SFT/chat data cannot be converted: train on "
             "the .jsonl directly (python train.py --data_file {path}{fields}), which caches "
             "its tokens and masks on first use")


def convert(src: str | Path, out_prefix: str | Path, tokenizer, *, progress: bool = True,
            sft_fields: tuple[str, str] | None = None) -> dict:
    """Tokenize src into out_prefix.bin/.idx; returns what was written."""
    from tqdm import tqdm

    fmt, path = resolve_data_type(src, "auto")
    fields = f" --sft_fields {sft_fields[0]} {sft_fields[1]}" if sft_fields else ""
    if fmt == "binidx":
        raise RWKVPeftError(f"{path} is already binidx data; nothing to convert")
    if sft_fields is not None:
        raise RWKVPeftError(_SFT_NOTE.format(path=path, fields=fields))
    kind = detect_jsonl_kind(path, None) if fmt == "jsonl" else "text"
    if kind != "text":
        raise RWKVPeftError(f"{path} holds chat records ('messages'): " + _SFT_NOTE.format(path=path, fields=""))
    bin_path, idx_path = binidx_paths(out_prefix)
    tokenizer_file = getattr(tokenizer, "path", None) or getattr(tokenizer, "vocab_file", None)
    check_not_inputs([("output", bin_path), ("output", idx_path)], {"input": path, "--tokenizer": tokenizer_file})
    vocab = int(tokenizer.vocab_size)
    eos = int(tokenizer.eos_id)
    dtype = token_dtype_for_vocab(vocab)
    writer = BinIdxWriter(out_prefix, dtype)  # both outputs checked writable before any work
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"tokenizing {path.name}", disable=not progress, dynamic_ncols=True)
    docs = 0
    with writer:
        current: list[int] = []
        line = 0
        for ids, _mask, ends, nbytes in iter_documents(path, fmt, kind, tokenizer):
            line += 1
            if ids and (max(ids) >= vocab or min(ids) < 0):
                raise RWKVPeftError(f"{path} line {line}: tokenizer produced an id outside "
                                    f"its vocab_size {vocab}")
            current += ids
            if ends:
                if current:  # empty documents are skipped, as in the cached data path
                    current.append(eos)
                    writer.add(current)
                    docs += 1
                current = []
            bar.update(nbytes)
        bar.close()
        if docs == 0:
            raise RWKVPeftError(f"{path} holds no text: nothing to convert")
        tokens = writer.num_tokens
    return {"bin": writer.bin_path, "idx": writer.idx_path, "documents": docs,
            "tokens": tokens, "dtype": dtype.name}


def main(argv: list[str] | None = None) -> int:
    return run_command(_command, argv)


def _command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_peft.data.prepare",
        description="Tokenize a text data set into the binidx pair (prefix.bin + prefix.idx) "
                    "that RWKV-LM and `train.py --data_type binidx` read. Each document is "
                    "followed by token 0, as RWKV-LM's make_data.py writes it.",
        epilog="Plain text only: chat/SFT data keeps per-token loss masks, which binidx cannot "
               "store; pass such a .jsonl to train.py directly (it is tokenized once into a cache).")
    parser.add_argument("input", help='a .jsonl file of {"text": ...} records (one document per '
                                      "line), or a .txt file (one document)")
    parser.add_argument("out_prefix", help="output prefix: writes OUT_PREFIX.bin and OUT_PREFIX.idx")
    parser.add_argument("--tokenizer", default="world",
                        help="'world' (RWKV World vocab, default) or a Hugging Face tokenizer.json")
    parser.add_argument("--sft_fields", nargs=2, metavar=("Q", "R"), default=None,
                        help="not supported here (binidx has no loss masks); the error says what to do")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    out = str(args.out_prefix)
    if out.endswith((".bin", ".idx")):
        out = out[:-4]
    tokenizer = load_tokenizer(args.tokenizer)
    info = convert(args.input, out, tokenizer, progress=not args.no_progress,
                   sft_fields=tuple(args.sft_fields) if args.sft_fields else None)
    print(f"wrote {info['bin']} ({info['tokens']:,} tokens, {info['dtype']}) and {info['idx']} "
          f"({info['documents']:,} documents)")
    tok = "" if str(args.tokenizer).lower() == "world" else f" --tokenizer {args.tokenizer}"
    print(f"next: {command('train')} --data_file {out} --data_type binidx{tok}")


if __name__ == "__main__":
    sys.exit(main())
