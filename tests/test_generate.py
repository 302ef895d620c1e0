"""Sampling and streaming generation (rwkv_peft.generate), with expected values worked out by hand."""

import pytest
import torch

from rwkv_peft import RWKVConfig, create_model
from rwkv_peft.generate import (Penalties, Sampling, StreamDecoder, generate, generate_text, prefill,
                                sample_logits, sampling_probs)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these models are tiny


# ------------------------------------------------------------------------------------------
# sampling


def logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def test_greedy_when_temperature_or_top_p_is_zero():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0, 2.0])  # a tie: the first maximum wins
    g = torch.Generator().manual_seed(0)
    for kw in ({"temperature": 0.0}, {"top_p": 0.0}, {"temperature": 0.0, "top_p": 0.9, "top_k": 3}):
        assert all(sample_logits(logits, generator=g, **kw) == 1 for _ in range(20))
        assert sampling_probs(logits, **kw).tolist() == [0, 1, 0, 0, 0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    # 0.5 < 0.7 <= 0.5 + 0.3: the first two, renormalised
    assert torch.allclose(sampling_probs(logits, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(sampling_probs(logits, top_p=0.5), torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(sampling_probs(logits, top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    assert torch.allclose(sampling_probs(logits, top_p=1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # ties with the last kept token are kept
    assert torch.allclose(sampling_probs(logits_of([0.4, 0.3, 0.3]), top_p=0.5), torch.tensor([0.4, 0.3, 0.3]))


def test_top_k_truncates():
    logits = logits_of([0.1, 0.4, 0.2, 0.3])
    assert torch.allclose(sampling_probs(logits, top_k=2), torch.tensor([0, 0.4, 0, 0.3]) / 0.7)
    assert torch.allclose(sampling_probs(logits, top_k=1), torch.tensor([0.0, 1, 0, 0]))
    # with top_p too: whichever keeps fewer
    assert torch.allclose(sampling_probs(logits, top_k=3, top_p=0.6), torch.tensor([0, 0.4, 0, 0.3]) / 0.7)


def test_top_p_is_chosen_before_temperature():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    # the set comes from the untempered probabilities, then p ** (1/T) on what is left
    for t in (0.5, 2.0):
        kept = torch.tensor([0.5, 0.3]) ** (1 / t)
        expected = torch.cat([kept / kept.sum(), torch.zeros(2)])
        assert torch.allclose(sampling_probs(logits, temperature=t, top_p=0.7), expected, atol=1e-6)
    # a very low temperature does not underflow: it tends to greedy
    assert torch.allclose(sampling_probs(logits, temperature=1e-4), torch.tensor([1.0, 0, 0, 0]))


def test_sampling_follows_the_distribution_and_the_seed():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    draws = [sample_logits(logits, 1.0, 0.7, 0, torch.Generator().manual_seed(s)) for s in range(2000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / len(draws) - 0.625) < 0.04
    a = [sample_logits(logits, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample_logits(logits, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b


def test_penalties_subtract_presence_and_decayed_frequency():
    d, pres, freq = 0.9, 0.5, 0.25
    pen = Penalties(presence=pres, frequency=freq, decay=d)
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert torch.equal(pen.apply(logits), logits)  # nothing generated yet
    for token in (3, 3, 5):
        pen.update(token)
    # after 3: {3: 1}; after 3: {3: d + 1}; after 5: {3: (d + 1) d, 5: 1}
    assert pen.counts == pytest.approx({3: (d + 1) * d, 5: 1.0})
    expected = logits.clone()
    expected[3] -= pres + freq * (d + 1) * d
    expected[5] -= pres + freq * 1.0
    assert torch.allclose(pen.apply(logits), expected)
    assert torch.equal(logits, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))  # not modified in place
    assert torch.equal(Penalties(0.0, 0.0).apply(logits), logits)


# ------------------------------------------------------------------------------------------
# generation with a scripted model and a byte tokenizer

EOS = 0
VOCAB = {1: b"Hi", 2: b" there", 3: b"\n", 4: b"\n\n", 5: b"\xe4\xbd", 6: b"\xa0", 7: b"!", 8: b"A", 9: b"B",
         10: b"\xf0\x9f", 11: b"\x98", 12: b"\x80"}  # 5+6: "\u4f60"; 10+11+12: "\U0001F600"
V = 16


class ByteTokenizer:
    """Exact bytes per token, like the World tokenizer."""

    vocab_size = V
    eos_id = EOS

    def encode(self, text):
        raise NotImplementedError

    def decode_bytes(self, ids):
        return b"".join(VOCAB.get(int(i), b"") for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class WholeTextTokenizer(ByteTokenizer):
    """Decodes only to text, cut characters as U+FFFD, like Hugging Face byte-level BPE."""

    def decode_bytes(self, ids):
        return super().decode_bytes(ids).decode("utf-8", errors="replace").encode("utf-8")


class ScriptedModel(torch.nn.Module):
    """Logits that favour a scripted sequence; the state counts and records the tokens fed."""

    def __init__(self, script, scores=None):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 1)
        self.script = list(script)
        self.scores = scores  # or: a fixed [V] logit vector at every step
        self.calls = []

    def zero_state(self, batch_size):
        return torch.zeros(0, dtype=torch.long)

    def forward(self, tokens, state, last_only=False):
        self.calls.append(tokens.shape[1])
        state = torch.cat([state, tokens[0]])
        if self.scores is not None:
            logits = self.scores.clone()
        else:
            step = len(state) - self.prompt_len
            logits = torch.full((V,), -10.0)
            logits[self.script[step] if 0 <= step < len(self.script) else EOS] = 10.0
        T = 1 if last_only else tokens.shape[1]
        return logits.expand(1, T, V), state

    def decoder(self):
        return self  # generation's one-token steps go through forward too

    def step(self, token, state):
        logits, state = self(torch.tensor([[token]]), state)
        return logits[0, -1], state


def run(model, prompt=(8, 9), tok=None, **kw):
    model.prompt_len = len(prompt)
    gen = generate(model, tok or ByteTokenizer(), list(prompt), None, **kw)
    pieces = list(gen)
    return pieces, gen.result


def test_stops_at_a_blank_line_and_keeps_it_in_the_state():
    pieces, res = run(ScriptedModel([1, 2, 3, 3, 7]), temperature=0.0)
    assert "".join(pieces) == "Hi there" and res.text == "Hi there"
    assert res.stop_reason == "stop"
    assert res.tokens == [1, 2, 3, 3]
    assert res.state.tolist() == [8, 9, 1, 2, 3, 3]  # the prompt, the reply and its "\n\n"
    assert "\n" not in "".join(pieces)  # the first "\n" was held back, never shown


def test_a_single_newline_is_released_when_no_blank_line_follows():
    pieces, res = run(ScriptedModel([1, 3, 2, 4]), temperature=0.0)
    assert "".join(pieces) == "Hi\n there"
    assert pieces[-1] == "\n there"  # "\n" came out with the token after it
    assert res.stop_reason == "stop" and res.tokens == [1, 3, 2, 4]


def test_stops_at_eos_without_feeding_it():
    pieces, res = run(ScriptedModel([1, 7, EOS, 2]), temperature=0.0)
    assert "".join(pieces) == "Hi!" and res.stop_reason == "eos"
    assert res.tokens == [1, 7] and res.state.tolist() == [8, 9, 1, 7]


def test_stops_after_max_tokens():
    pieces, res = run(ScriptedModel([8] * 10), temperature=0.0, max_tokens=4)
    assert "".join(pieces) == "AAAA" and res.stop_reason == "length" and len(res.tokens) == 4


@pytest.mark.parametrize("tok", [ByteTokenizer(), WholeTextTokenizer()], ids=["exact-bytes", "whole-text"])
def test_utf8_split_across_tokens_streams_whole_characters(tok):
    pieces, res = run(ScriptedModel([5, 6, 7, 10, 11, 12, 1, 4]), tok=tok, temperature=0.0)
    assert "".join(pieces) == "\u4f60!\U0001F600Hi"
    assert all("\ufffd" not in p for p in pieces)
    assert "\u4f60" in pieces[0]  # the character arrives whole, in the first piece
    dec = StreamDecoder(tok)
    assert [dec.push(t) for t in (10, 11, 12)] == ["", "", "\U0001F600"]


def test_a_cut_character_at_the_end_is_flushed_as_replacement():
    pieces, res = run(ScriptedModel([8, 5]), temperature=0.0, max_tokens=2)
    assert "".join(pieces) == "A\ufffd" and res.stop_reason == "length"


def test_penalties_inside_generate_decay_each_step():
    scores = torch.full((V,), -10.0)
    scores[8], scores[9] = 1.0, 0.5  # "A" preferred by 0.5 over "B"
    # frequency 0.3: count of A after n As without decay is n -> A, A, then 1 - 0.6 < 0.5: B
    _, res = run(ScriptedModel([], scores), temperature=0.0, max_tokens=3, frequency_penalty=0.3, penalty_decay=1.0)
    assert res.tokens == [8, 8, 9]
    # decay 0.5: counts 1, 1.5, 1.75 -> penalties 0.3, 0.45, 0.525: A, A, A, then B
    _, res = run(ScriptedModel([], scores), temperature=0.0, max_tokens=4, frequency_penalty=0.3, penalty_decay=0.5)
    assert res.tokens == [8, 8, 8, 9]
    # presence 0.6 alone: A once, then B, then both penalised equally: A again
    _, res = run(ScriptedModel([], scores), temperature=0.0, max_tokens=3, presence_penalty=0.6)
    assert res.tokens == [8, 9, 8]


def test_prompt_is_fed_in_chunks_with_one_logit_row():
    model = ScriptedModel([1, 4])
    model.prompt_len = 10
    gen = generate(model, ByteTokenizer(), [8] * 10, None, chunk_len=4, temperature=0.0)
    assert "".join(gen) == "Hi"
    assert model.calls == [4, 4, 2, 1, 1]  # prefill in 3 chunks, then one token at a time


# ------------------------------------------------------------------------------------------
# a real (tiny, untrained) RWKV-7 in RNN mode


@pytest.fixture(scope="module")
def tiny():
    cfg = RWKVConfig(version=7, n_layer=2, n_embd=64, head_size=16, vocab_size=V, dim_ffn=128,
                     d_decay=16, d_aaa=16, d_mv=16, d_gate=16)
    model = create_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)  # not the global RNG: the fixture must not depend on test order
    with torch.no_grad():  # an untrained model is too flat to sample anything but noise
        model.head.weight.normal_(0, 1.0, generator=g)
        model.emb.weight.normal_(0, 1.0, generator=g)
    return model


def test_chunked_prefill_equals_whole_sequence(tiny):
    ids = torch.randint(1, V, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        full = tiny(torch.tensor([ids]))[0, -1]
    for chunk in (1, 5, 16, 256):
        logits, state = prefill(tiny, ids, None, chunk_len=chunk)
        assert torch.allclose(logits, full, atol=1e-4, rtol=1e-4), chunk
        assert state.wkv.shape[0] == 2


def test_returned_state_continues_the_conversation(tiny):
    """Generating, then continuing from result.state, equals feeding everything from scratch."""
    tok = ByteTokenizer()
    res = generate_text(tiny, tok, [8, 9, 1], None, stop=(), max_tokens=6, temperature=1.0,
                        generator=torch.Generator().manual_seed(1))
    assert res.stop_reason in ("length", "eos")
    tail = [2, 7]
    logits_a, _ = prefill(tiny, tail, res.state)
    logits_b, _ = prefill(tiny, [8, 9, 1] + res.tokens + tail, None)
    assert torch.allclose(logits_a, logits_b, atol=1e-4, rtol=1e-4)
    # the same seed gives the same tokens; the caller's state is not changed
    _, st = prefill(tiny, [8, 9], None)
    before = st.wkv.clone()
    # eos_id=-1 can never be sampled, so both runs decode all 5 tokens
    a = generate_text(tiny, tok, [1], st, stop=(), max_tokens=5, eos_id=-1,
                      generator=torch.Generator().manual_seed(3))
    b = generate_text(tiny, tok, [1], st, stop=(), max_tokens=5, eos_id=-1,
                      generator=torch.Generator().manual_seed(3))
    assert len(a.tokens) == 5 and a.stop_reason == "length"
    assert a.tokens == b.tokens and torch.equal(st.wkv, before)
    assert a.tokens_per_s > 0  # decoding time was measured (0.0 means it was not)


def test_sampling_object_or_keywords():
    s = Sampling(temperature=0)
    assert s.greedy and not Sampling().greedy
    with pytest.raises(TypeError):
        generate(ScriptedModel([1]), ByteTokenizer(), [1], sampling=s, temperature=1.0)


@pytest.mark.parametrize("spec", ["world", "demo"])
def test_stream_decoder_with_real_tokenizers(spec):
    from pathlib import Path

    from rwkv_peft.data.tokenizer import load_tokenizer

    if spec == "demo":
        spec = Path(__file__).parent.parent / "demo" / "tokenizer.json"
    tok = load_tokenizer(spec)
    text = "caf\u00e9 \u4f60\u597d\uff0c\u4e16\u754c \U0001F600\U0001F469\u200d\U0001F52C ok\n\nUser"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some characters did span several tokens
