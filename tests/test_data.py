"""Training data: binidx files, SFT masks, pack/pad sampling, the token cache."""

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from rwkv_peft.data import sources
from rwkv_peft.data.binidx import BinIdxWriter, read_binidx
from rwkv_peft.data.chat_format import RENDER_LOSS_END, RENDER_LOSS_START
from rwkv_peft.data.datasets import load_training_data
from rwkv_peft.data.prepare import main as prepare_main
from rwkv_peft.data.tokenizer import load_tokenizer
from rwkv_peft.errors import RWKVPeftError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("world")


class CountingTokenizer:
    """The World tokenizer, recording every text it encodes."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.vocab_size, self.eos_id = inner.vocab_size, inner.eos_id

    def encode(self, text):
        self.seen.append(text)
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


DOCS = ["The Eiffel tower is in the city of Paris.", "Hello world", "A",
        "Longer document number four, with some more words in it to make it longer.",
        "\u4f60\u597d\uff0c\u4e16\u754c\u3002 caf\u00e9 \U0001F600"]


def read_idx_independently(idx_path):
    """The .idx layout straight from the format description, with struct only."""
    raw = open(idx_path, "rb").read()
    magic, version, code, n_seq, n_doc = struct.unpack_from("<9sQBQQ", raw, 0)
    off = 34
    sizes = list(struct.unpack_from(f"<{n_seq}i", raw, off))
    off += 4 * n_seq
    pointers = list(struct.unpack_from(f"<{n_seq}q", raw, off))
    off += 8 * n_seq
    doc_idx = list(struct.unpack_from(f"<{n_doc}q", raw, off))
    off += 8 * n_doc
    assert off == len(raw)
    return magic, version, code, sizes, pointers, doc_idx


# ---------------------------------------------------------------------------------------
# binidx


def test_binidx_roundtrip_through_converter(tok, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS] + [""])  # blank line
    prefix = tmp_path / "out"
    assert prepare_main([str(src), str(prefix), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "--data_file" in printed and "--data_type binidx" in printed

    expected = [tok.encode(t) + [0] for t in DOCS]
    magic, version, code, sizes, pointers, doc_idx = read_idx_independently(f"{prefix}.idx")
    assert magic == b"MMIDIDX\x00\x00" and version == 1 and code == 8  # uint16
    assert sizes == [len(e) for e in expected]
    assert pointers == [2 * sum(sizes[:i]) for i in range(len(sizes))]
    assert doc_idx == list(range(len(DOCS) + 1))
    stream = np.fromfile(f"{prefix}.bin", dtype="<u2").tolist()
    assert stream == sum(expected, [])

    data = read_binidx(f"{prefix}.idx")  # either file or the prefix
    assert len(data) == len(DOCS) and data.num_tokens == len(stream)
    for i, e in enumerate(expected):
        assert data.sequence(i).tolist() == e
        assert tok.decode(data.sequence(i)) == DOCS[i]


def test_binidx_sampling(tok, tmp_path):
    prefix = tmp_path / "d"
    with BinIdxWriter(prefix) as w:
        for t in DOCS:
            w.add(tok.encode(t) + [0])
    stream = np.fromfile(f"{prefix}.bin", dtype="<u2").astype(np.int64)
    ctx = 8
    data = load_training_data(str(prefix), tok, ctx, seed=3)  # prefix: auto-detected binidx
    assert data.kind == "binidx" and data.tokens_total == len(stream)
    assert len(data) == len(stream) // ctx
    again = load_training_data(f"{prefix}.bin", tok, ctx, seed=3)
    starts = set()
    for i in range(40):  # random windows of the stream, reproducible per (seed, i)
        s = data.sample(i)
        assert torch.equal(s["input_ids"], again.sample(i)["input_ids"])
        w = s["input_ids"].numpy()
        hits = [o for o in range(len(stream) - ctx) if (stream[o : o + ctx] == w).all()]
        assert hits and (stream[hits[0] + 1 : hits[0] + ctx + 1] == s["targets"].numpy()).all()
        assert s["loss_mask"].sum() == ctx
        starts.add(hits[0])
    assert len(starts) > 10
    pad = load_training_data(str(prefix), tok, 64, mode="pad")
    assert len(pad) == len(DOCS)
    firsts = sorted(int(pad.sample(i)["input_ids"][0]) for i in range(len(DOCS)))
    assert firsts == sorted(tok.encode(t)[0] for t in DOCS)


def test_binidx_mismatch_names_both_files(tok, tmp_path):
    for name, docs in (("a", DOCS), ("b", DOCS[:2])):
        with BinIdxWriter(tmp_path / name) as w:
            for t in docs:
                w.add(tok.encode(t) + [0])
    os.replace(tmp_path / "b.idx", tmp_path / "a.idx")  # a.bin with b's index
    with pytest.raises(RWKVPeftError) as e:
        load_training_data(str(tmp_path / "a"), tok, 8)
    msg = str(e.value)
    assert "a.bin" in msg and "a.idx" in msg and "\n" not in msg
    (tmp_path / "c.bin").write_bytes(b"")
    with pytest.raises(RWKVPeftError, match="c.idx"):
        load_training_data(str(tmp_path / "c.bin"), tok, 8)


def test_binidx_ids_outside_vocab(tok, tmp_path):
    with BinIdxWriter(tmp_path / "x") as w:
        w.add([5, 60000, 0])
    small = CountingTokenizer(tok)
    small.vocab_size = 1000
    with pytest.raises(RWKVPeftError, match="60000"):
        load_training_data(str(tmp_path / "x"), small, 4)


def test_converter_refuses_sft(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert prepare_main([str(src), str(tmp_path / "o"), "--no_progress"]) == 2  # one error: line, exit 2
    assert "loss masks" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists() and not list(tmp_path.glob(".o.*"))


# ---------------------------------------------------------------------------------------
# SFT masks


def whole(data):
    """(ids, mask) of the only document of a pad-mode data set with a large ctx_len."""
    s = data.sample(0)
    n = int((s["targets"] != 0).sum()) + 1  # targets end with the eos (0), then padding
    ids = [int(s["input_ids"][0])] + s["targets"][:n].tolist()
    return ids, [0.0] + s["loss_mask"][:n].tolist()


def test_chat_masks_system_multiturn(tok, tmp_path):
    rec = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And in words?\n\n\nPlease."},
        {"role": "assistant", "content": "  Four.\r\n\r\nDone.  "},
    ]}
    data = load_training_data(str(write_jsonl(tmp_path / "c.jsonl", [rec])), tok, 256,
                              mode="pad", progress=False)
    pieces = [("System: You are terse.\n\nUser: What is 2+2?\n\nAssistant:", 0),
              (" 4.\n\n", 1),
              ("User: And in words?\nPlease.\n\nAssistant:", 0),
              (" Four.\nDone.\n\n", 1)]
    exp_ids, exp_mask = [], []
    for text, m in pieces:
        t = tok.encode(text)
        exp_ids += t
        exp_mask += [m] * len(t)
    exp_ids.append(0)
    exp_mask.append(0)  # the eos after a conversation is not trained
    ids, mask = whole(data)
    assert ids == exp_ids and mask == exp_mask
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == " 4.\n\n Four.\nDone.\n\n"
    assert data.loss_tokens == sum(exp_mask)
    # for the World vocab, tokenizing the runs separately equals tokenizing the whole string
    assert exp_ids[:-1] == tok.encode("".join(p for p, _ in pieces))
    s = data.sample(0)
    assert s["loss_mask"].sum() == sum(exp_mask) and s["loss_mask"].dtype == torch.float32


def test_sft_fields(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"query": "Capital of France?", "response": "Paris.", "x": 1}])
    data = load_training_data(str(path), tok, 64, mode="pad", sft_fields=("query", "response"))
    ids, mask = whole(data)
    a, b = tok.encode("User: Capital of France?\n\nAssistant:"), tok.encode(" Paris.\n\n")
    assert ids == a + b + [0] and mask == [0] * len(a) + [1] * len(b) + [0]
    assert data.kind == "fields"


def test_render_marks_trained_spans(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}])
    text = load_training_data(str(path), tok, 64, mode="pad").render(0)
    L, R = RENDER_LOSS_START, RENDER_LOSS_END
    assert text.splitlines()[0].startswith("---")
    assert text.split("\n", 1)[1] == f"User: Hi\n\nAssistant:{L} Hello!\n\n{R}<eos>"


# ---------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("lines, sft_fields, match", [
    ([{"text": "a"}, {"text": "b"}, '{"text": "c",}'], None, r"line 3: malformed JSON"),
    ([{"text": "a"}, "", {"txt": "b"}], None, r"line 3: record has no 'text'"),
    ([{"messages": []}, {"text": "b"}], None, r"line 2: record has no 'messages'"),
    ([{"q": "a", "r": "b"}, {"q": "a"}], ("q", "r"), r"line 2: record has no field 'r'"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], None, r"line 1: message 0 has role"),
    ([{"foo": 1}], None, r"line 1: record has fields \['foo'\]"),
    (["[1, 2]"], None, r"line 1: expected a JSON object"),
    ([], None, r"no records \(empty file\)"),
    (["", "  "], None, r"no records"),
    ([{"text": ""}], None, r"no text"),
    ([{"messages": [{"role": "user", "content": "only a question"}]}], None, r"no assistant replies"),
])
def test_errors_name_file_and_line(tok, tmp_path, lines, sft_fields, match):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(RWKVPeftError, match=match) as e:
        load_training_data(str(path), tok, 16, sft_fields=sft_fields, progress=False)
    assert "bad.jsonl" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / ".rwkv_peft_cache").glob("*.tmp"))  # no temporary leftovers


def test_argument_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(RWKVPeftError, match="mode"):
        load_training_data(str(path), tok, 16, mode="stream")
    with pytest.raises(RWKVPeftError, match="data_type"):
        load_training_data(str(path), tok, 16, data_type="parquet")
    with pytest.raises(RWKVPeftError, match="not found"):
        load_training_data(str(tmp_path / "missing.jsonl"), tok, 16)
    with pytest.raises(RWKVPeftError, match="ctx_len"):
        load_training_data(str(path), tok, 0)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(RWKVPeftError, match="extension"):
        load_training_data(str(tmp_path / "x.csv"), tok, 16)


# ---------------------------------------------------------------------------------------
# pack / pad, sampling


def test_pack_and_pad(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in DOCS])
    stream = sum((tok.encode(t) + [0] for t in DOCS), [])
    ctx = 7
    pack = load_training_data(str(path), tok, ctx, mode="pack", progress=False)
    assert pack.tokens_total == len(stream) and pack.ctx_len == ctx
    assert len(pack) == -(-(len(stream) - 1) // ctx)
    windows = {}
    for i in range(len(pack)):
        s = pack.sample(i)
        assert all(v.shape == (ctx,) for v in s.values())
        assert s["input_ids"].dtype == torch.long and s["targets"].dtype == torch.long
        n = int(s["loss_mask"].sum())
        first = int(s["input_ids"][0])
        windows[i] = (s["input_ids"][:n].tolist(), s["targets"][:n].tolist())
        assert s["input_ids"][1:n].tolist() == s["targets"][: n - 1].tolist()
        assert (s["loss_mask"][n:] == 0).all() and (s["targets"][n:] == 0).all() and first >= 0
    # every token but the first is a target exactly once per epoch; windows are in stream order
    ordered = sorted(windows.values(), key=lambda w: next(
        o for o in range(len(stream)) if stream[o : o + len(w[0])] == w[0]))
    assert sum((w[1] for w in ordered), []) == stream[1:]

    pad = load_training_data(str(path), tok, ctx, mode="pad", progress=False)
    assert len(pad) == len(DOCS) and pad.num_documents == len(DOCS)
    seen = []
    for i in range(len(pad)):
        s = pad.sample(i)
        n = int(s["loss_mask"].sum())
        ids = [int(s["input_ids"][0])] + s["targets"][:n].tolist()
        seen.append(ids)
        assert (s["loss_mask"][n:] == 0).all() and (s["input_ids"][n:] == 0).all()
    expect = [(tok.encode(t) + [0])[: ctx + 1] for t in DOCS]  # truncated to ctx_len + 1
    assert sorted(seen) == sorted(expect)
    assert pad.truncated_documents == sum(len(tok.encode(t)) + 1 > ctx + 1 for t in DOCS)
    b = pad.batch([0, 1, 2])
    assert b["input_ids"].shape == (3, ctx) and b["loss_mask"].shape == (3, ctx)


def test_stateless_sampling_and_epochs(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"document {i} " * (i % 5 + 1)} for i in range(40)])
    a = load_training_data(str(path), tok, 8, seed=7, progress=False)
    b = load_training_data(str(path), tok, 8, seed=7, progress=False)
    n = len(a)
    for i in list(range(0, 3 * n, 5)) + [10**9 + 3]:
        assert all(torch.equal(a.sample(i)[k], b.sample(i)[k]) for k in a.sample(i))
    key = lambda d, i: tuple(d.sample(i)["input_ids"].tolist())
    epoch0 = [key(a, i) for i in range(n)]
    epoch1 = [key(a, n + i) for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # same windows, new order
    other_seed = load_training_data(str(path), tok, 8, seed=8, progress=False)
    assert [key(other_seed, i) for i in range(n)] != epoch0
    c = pickle.loads(pickle.dumps(a))  # DataLoader workers get a copy that reopens the files
    assert key(c, 5) == key(a, 5)
    pad = load_training_data(str(path), tok, 8, mode="pad", seed=7, progress=False)
    p0 = [key(pad, i) for i in range(len(pad))]
    p1 = [key(pad, len(pad) + i) for i in range(len(pad))]
    assert sorted(p0) == sorted(p1) and p0 != p1


def test_txt_is_one_document_cut_safely(tok, tmp_path, monkeypatch):
    text = "".join(f"Line {i}: some words, \u00e9t\u00e9.\n" + ("\n  indented\n" if i % 7 == 0 else "")
                   for i in range(300))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "_TEXT_CHUNK", 100)  # many cuts
    data = load_training_data(str(tmp_path / "t.txt"), tok, 10**5, mode="pad", progress=False)
    ids, _ = whole(data)
    assert ids == tok.encode(text) + [0] and data.num_documents == 1


# ---------------------------------------------------------------------------------------
# cache


def test_cache_reused_and_invalidated(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in DOCS])
    counting = CountingTokenizer(tok)
    first = load_training_data(str(path), counting, 8, progress=False)
    assert not first.cache_hit and any(DOCS[0] in t for t in counting.seen)
    cache = tmp_path / ".rwkv_peft_cache"
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and not any(f.endswith(".tmp") for f in files)  # tokens, docs, meta
    meta = json.loads(next(cache.glob("*.json")).read_text())
    assert meta["dtype"] == "<u2" and meta["tokens"] == first.tokens_total

    counting.seen.clear()
    second = load_training_data(str(path), counting, 8, progress=False)
    assert second.cache_hit and not any(DOCS[0] in t for t in counting.seen)  # no re-tokenizing
    assert torch.equal(first.sample(3)["input_ids"], second.sample(3)["input_ids"])

    write_jsonl(path, [{"text": "something else entirely, a new document"}])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    counting.seen.clear()
    third = load_training_data(str(path), counting, 8, progress=False)
    assert not third.cache_hit and any("new document" in t for t in counting.seen)
    assert third.tokens_total == len(tok.encode("something else entirely, a new document")) + 1
    assert len(list(cache.glob("*.json"))) == 1  # the stale cache was removed

    # other settings get their own cache; an explicit cache_dir is used
    elsewhere = tmp_path / "elsewhere"
    load_training_data(str(path), counting, 8, cache_dir=str(elsewhere), progress=False)
    assert len(list(elsewhere.glob("*.tokens"))) == 1


def test_cache_mask_file_for_sft(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}] * 3)
    data = load_training_data(str(path), tok, 16, cache_dir=str(tmp_path / "cc"), progress=False)
    masks = list((tmp_path / "cc").glob("*.mask"))
    assert len(masks) == 1
    m = np.fromfile(masks[0], dtype=np.uint8)
    assert len(m) == data.tokens_total and int(m.sum()) == data.loss_tokens == 3 * len(tok.encode(" Yo\n\n"))
