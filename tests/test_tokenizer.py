"""Tests for rwkv_peft.data.tokenizer (World and Hugging Face tokenizers)."""

from __future__ import annotations

import importlib.util
import pickle
import random
import sys

import numpy as np
import pytest

import rwkv_peft.data.tokenizer as tokmod
from rwkv_peft.data.tokenizer import (
    HFTokenizer,
    Tokenizer,
    WorldTokenizer,
    find_world_vocab,
    load_tokenizer,
    parse_world_vocab,
)
from rwkv_peft.errors import RWKVPeftError

HAVE_PYRWKV = importlib.util.find_spec("pyrwkv_tokenizer") is not None

SPEC_TEXT = "The Eiffel tower is in the city of"
SPEC_IDS = [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706]

MIXED = [
    "",
    "\n",
    "\n\n",
    "\r\n\r\n\n",
    "User: What is RWKV?\n\nAssistant: An RNN with transformer-level performance.",
    "Hello, world! It's 2024-06-01; pi ≈ 3.14159, café naïve résumé.",
    "今天是美好的一天。我们去公园散步吧！机器学习和自然语言处理。",
    "日本語のテキストです。カタカナとひらがな、漢字を混ぜます。",
    "Привет, мир! Это проверка токенизатора.",
    "😀😃🎉👍🏽👨‍👩‍👧‍👦🏳️‍🌈🇯🇵 emoji and flags",
    "def f(x, y=2):\n    return {'a': [x ** y, x // 3]}  # comment\n\tif x != 0: pass\n",
    "int main(void) { printf(\"%d\\n\", 42); return 0; }",
    " " * 1,
    " " * 16,
    " " * 17,
    " " * 129,
    " " * 300,
    "\t" * 40 + "\n" * 70,
    "a" * 500,
    "-" * 81 + "=" * 200 + "#" * 90,
    "\x00\x01\x7f\u00a0\u3000\u200b\ufeff\U0010ffff",
    "mixed 中文 and English, 日本語 и русский 🎉 in one line\n\n  indented\n",
]


@pytest.fixture(scope="module")
def reference():
    """The official rwkv package's slow tokenizer, an independent reference."""
    mod = pytest.importorskip("rwkv.rwkv_tokenizer")
    return mod.TRIE_TOKENIZER(str(find_world_vocab()))


@pytest.fixture(scope="module")
def worlds():
    """One tokenizer per backend setting, built once for the module."""
    return {backend: WorldTokenizer(backend=backend) for backend in ("python", "auto")}


@pytest.fixture(params=["python", "auto"])
def world(request, worlds):
    return worlds[request.param]


# ----------------------------------------------------------------------------------------
# World: ids


def test_spec_vector(world):
    assert world.encode(SPEC_TEXT) == SPEC_IDS
    assert world.decode(SPEC_IDS) == SPEC_TEXT


def test_basic_attributes(world):
    assert world.vocab_size == 65536
    assert world.eos_id == 0
    assert isinstance(world, Tokenizer)
    assert world.token_to_id("\n\n") == 261
    assert world.token_to_id("not a single token at all") is None


def test_backend_auto_uses_library_when_installed(worlds):
    assert worlds["python"].backend == "python"
    assert worlds["auto"].backend == ("pyrwkv-tokenizer" if HAVE_PYRWKV else "python")


def test_unknown_backend():
    with pytest.raises(RWKVPeftError, match="backend"):
        WorldTokenizer(backend="fast")


@pytest.mark.parametrize("text", MIXED, ids=range(len(MIXED)))
def test_matches_reference_and_round_trips(world, reference, text):
    ids = world.encode(text)
    assert ids == reference.encode(text)
    assert world.decode(ids) == text
    assert world.decode_bytes(ids) == text.encode("utf-8")
    assert world.encode_bytes(text.encode("utf-8")) == ids


def test_matches_reference_on_long_mixed_text(world, reference):
    rng = random.Random(0)
    text = "".join(rng.choice(MIXED) for _ in range(400))
    ids = world.encode(text)
    assert ids == reference.encode(text)
    assert world.decode(ids) == text


def test_matches_reference_on_vocab_token_soup(world, reference):
    """Concatenated vocab entries stress the longest-match boundaries."""
    rng = random.Random(1)
    tokens = [t for t in reference.idx2token.values() if len(t) > 1]
    for _ in range(20):
        data = b"".join(rng.choice(tokens) for _ in range(200))
        assert world.encode_bytes(data) == reference.encodeBytes(data)


def test_random_bytes_round_trip(world, reference):
    rng = random.Random(2)
    cases = [b"\xff", b"\xc3", b"\xe4\xbd", b"\x80\x80\x80", b"ok\xfe\xffok"]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(100)]
    for data in cases:
        ids = world.encode_bytes(data)
        assert world.decode_bytes(ids) == data
        assert ids == reference.encodeBytes(data)
    assert world.encode_bytes(b"") == []
    assert world.encode_bytes(bytearray(b"\n\n")) == [261]


def test_truncated_multibyte_decodes_to_replacement(world):
    cut = "你".encode("utf-8")[:2]
    ids = world.encode_bytes(b"a" + cut)
    assert world.decode_bytes(ids) == b"a" + cut
    assert world.decode(ids) == "a\ufffd"
    # streaming: bytes of a multi-token character arrive one token at a time
    emoji_ids = world.encode_bytes("😀".encode("utf-8")[:3])
    assert world.decode(emoji_ids) == "\ufffd"


def test_id_zero_is_end_of_text(world):
    assert world.decode([0]) == ""
    assert world.decode_bytes([0]) == b""
    assert world.decode([0] + SPEC_IDS + [0]) == SPEC_TEXT
    assert 0 not in world.encode("\x00 end of text \x00")
    assert world.encode("\x00") == [1]


@pytest.mark.parametrize("bad", [65530, 65535, 70000, -1, 10**12])
def test_out_of_vocab_id_raises(world, bad):
    with pytest.raises(RWKVPeftError, match=str(bad)):
        world.decode([6699, bad])
    with pytest.raises(RWKVPeftError, match=str(bad)):
        world.decode_bytes([bad])


def test_decode_accepts_numpy_and_generators(world):
    assert world.decode(np.array(SPEC_IDS, dtype=np.int64)) == SPEC_TEXT
    assert world.decode(i for i in SPEC_IDS) == SPEC_TEXT
    assert world.decode(np.array(SPEC_IDS, dtype=np.int32)[2:4]) == world.decode(SPEC_IDS[2:4])


def test_pickle_round_trip(world):
    clone = pickle.loads(pickle.dumps(world))
    assert clone.backend == world.backend
    assert clone.encode(SPEC_TEXT) == SPEC_IDS


def test_does_not_import_rwkv_model():
    had = "rwkv.model" in sys.modules
    WorldTokenizer(backend="python")
    if not had:
        assert "rwkv.model" not in sys.modules


# ----------------------------------------------------------------------------------------
# World: vocab file


def _byte_lines(as_bytes: bool = False) -> list[str]:
    """The 256 single-byte tokens, written like the official file (str for ASCII)."""
    return [f"{b + 1} {chr(b) if b < 128 and not as_bytes else bytes([b])!r} 1" for b in range(256)]


def test_custom_vocab_file_is_greedy_longest_match(tmp_path):
    lines = _byte_lines() + ["300 'ab' 2", "301 'abc' 3", "302 'abcd' 4", "303 b'\\xe4\\xbd' 2", "304 '你好' 6"]
    path = tmp_path / "vocab.txt"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    for backend in ("python", "auto"):
        tok = WorldTokenizer(vocab_file=path, backend=backend)
        assert tok.backend == ("pyrwkv-tokenizer" if HAVE_PYRWKV and backend == "auto" else "python")
        assert tok.encode("abcde") == [302, ord("e") + 1]
        assert tok.encode("abcab") == [301, 300]
        assert tok.encode("abx") == [300, ord("x") + 1]
        assert tok.encode("你好你") == [304, 303, 0xA0 + 1]
        assert tok.decode(tok.encode("xxabcdabc你好")) == "xxabcdabc你好"


@pytest.mark.skipif(not HAVE_PYRWKV, reason="pyrwkv-tokenizer not installed")
def test_falls_back_when_library_cannot_read_vocab(tmp_path):
    # Valid for our parser, but pyrwkv-tokenizer 0.9.1 panics on ASCII written as b'..'.
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(_byte_lines(as_bytes=True) + ["300 'ab' 2"]), encoding="utf-8")
    tok = None
    with pytest.warns(RuntimeWarning, match="pyrwkv-tokenizer not used") as record:
        tok = WorldTokenizer(vocab_file=path)
    assert record and tok.backend == "python"
    assert tok.encode("abc") == [300, ord("c") + 1]
    with pytest.raises(RWKVPeftError, match="pyrwkv-tokenizer not used"):
        WorldTokenizer(vocab_file=path, backend="pyrwkv")


def test_vocab_parser_never_evaluates_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(RWKVPeftError, match="line 257"):
        parse_world_vocab("\n".join(_byte_lines() + [f"300 {evil} 2"]), "evil.txt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ("300 'abc' 2", "3 bytes"),
        ("300 'abc'", "expected"),
        ("x 'ab' 2", "integers"),
        ("0 'ab' 2", "end-of-text"),
        ("300 '\\x41' 1", "duplicate"),
        ("300 [1, 2] 2", "literal"),
    ],
)
def test_vocab_parser_rejects_bad_lines(line, message):
    with pytest.raises(RWKVPeftError, match=message):
        parse_world_vocab("\n".join(_byte_lines() + [line]), "bad.txt")


def test_vocab_must_contain_all_bytes(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(_byte_lines()[1:]), encoding="utf-8")
    with pytest.raises(RWKVPeftError, match="single bytes"):
        WorldTokenizer(vocab_file=path)


def test_missing_vocab_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(RWKVPeftError, match="nope.txt"):
        WorldTokenizer(vocab_file=path)


def test_rwkv_package_missing(monkeypatch):
    def no_package(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(tokmod.resources, "files", no_package)
    with pytest.raises(RWKVPeftError, match="pip install rwkv"):
        find_world_vocab()
    with pytest.raises(RWKVPeftError, match="pip install rwkv"):
        load_tokenizer("world")


# ----------------------------------------------------------------------------------------
# Hugging Face tokenizers


def _train_bpe(path, special_tokens):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["hello world, hello tokenizer", "the quick brown fox jumps over the lazy dog"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip_and_eos(tmp_path):
    path = _train_bpe(tmp_path / "tok.json", ["<pad>", "<|endoftext|>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert isinstance(tok, Tokenizer)
    assert tok.eos_id == 1
    assert 256 < tok.vocab_size <= 400
    text = "hello world, the lazy tokenizer! 你好 😀\n\n  indented"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert load_tokenizer(path).encode(text) == ids  # a pathlib.Path works too


def test_hf_tokenizer_without_eos_uses_zero(tmp_path):
    path = _train_bpe(tmp_path / "plain.json", ["<unk>"])
    assert load_tokenizer(str(path)).eos_id == 0
    path2 = _train_bpe(tmp_path / "s.json", ["<unk>", "<pad>", "</s>"])
    assert load_tokenizer(str(path2)).eos_id == 2


def test_hf_missing_file(tmp_path):
    path = tmp_path / "missing_tokenizer.json"
    with pytest.raises(RWKVPeftError, match="missing_tokenizer.json"):
        load_tokenizer(str(path))


def test_hf_unreadable_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json", encoding="utf-8")
    with pytest.raises(RWKVPeftError, match="broken.json"):
        load_tokenizer(str(path))


# ----------------------------------------------------------------------------------------
# load_tokenizer


def test_load_tokenizer_world(monkeypatch):
    tok = load_tokenizer("world")
    assert isinstance(tok, WorldTokenizer) and tok.encode(SPEC_TEXT) == SPEC_IDS
    monkeypatch.setattr(tokmod, "WorldTokenizer", lambda: "world tokenizer")  # dispatch only
    assert load_tokenizer() == load_tokenizer(None) == load_tokenizer(" World ") == "world tokenizer"


@pytest.mark.parametrize("spec", ["gpt2", "rwkv_vocab_v20230424.txt", "", 42])
def test_load_tokenizer_unknown_spec(spec):
    with pytest.raises(RWKVPeftError) as info:
        load_tokenizer(spec)
    message = str(info.value)
    assert repr(spec) in message and "world" in message and ".json" in message
    assert "\n" not in message
