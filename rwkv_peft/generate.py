"""Sampling and RNN-mode generation, for the chat demo, the eval and scripts.

    from rwkv_peft.generate import generate, Sampling
    gen = generate(model, tokenizer, tokenizer.encode("User: hi\\n\\nAssistant:"), state=None,
                   sampling=Sampling(temperature=1.0, top_p=0.3), max_tokens=200)
    for piece in gen:              # decoded text, streamed as it becomes complete UTF-8
        print(piece, end="", flush=True)
    result = gen.result            # GenerationResult: .state (carry it into the next turn), .tokens, ...

Sampling (docs/formats.md section 3), one step:
  1. penalties: logits[t] -= presence + frequency * count[t] for every token t already in
     the occurrence table (generated tokens only, not the prompt);
  2. probs = softmax(logits); keep the top_k most likely (top_k > 0) and the smallest set of
     most likely tokens whose probabilities sum to >= top_p (ties with the last kept token
     are kept too); everything else gets probability 0;
  3. temperature on what is left: probs ** (1 / temperature), renormalised, then one draw;
  4. the table decays and counts the new token: count[t] *= penalty_decay for every t, then
     count[new] += 1.
temperature 0 or top_p 0 means greedy: the argmax of the penalised logits (first on ties).
The draw runs on the CPU in float32 with the caller's torch.Generator, so a seed gives the
same text on CPU and GPU whenever the logits agree.

Generation feeds every sampled token back into the model (so the returned state holds the
whole reply, its closing "\\n\\n" included) except the end-of-text token, and stops at
end-of-text, at a stop string (text from the stop string on is not yielded), or after
max_tokens. The prompt is fed in chunks of `chunk_len` tokens with last_only=True; each
generated token goes through the one-token Decoder (rwkv_peft/model/decode.py), whose
weight copies a caller that generates many times builds once (model.decoder()) and passes
as `decoder=`.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .model.config import SMALL_MODEL_PARAMS

__all__ = ["GenerationResult", "Penalties", "Sampling", "StreamDecoder", "generate", "generate_text",
           "prefill", "sample_logits", "sampling_probs", "set_threads"]


def set_threads(model, threads: int | None = None) -> int:
    """CPU threads for running model: `threads` if given, else 1 for a model under 20M
    parameters, whose per-token ops are too small to split (on a shared 2-core machine two
    threads made the demo model's decoding 60x slower), else torch's default. Returns it."""
    if threads is None:
        if model.emb.weight.device.type != "cpu":
            return torch.get_num_threads()
        small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
        threads = 1 if small else torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """The distribution sample_logits draws from, as float32 probabilities [V] on the CPU.

    Greedy (temperature 0 or top_p 0): one-hot at the argmax (the first one on ties).
    """
    logits = logits.detach().reshape(-1).float().cpu()
    if temperature <= 0 or top_p <= 0:
        out = torch.zeros_like(logits)
        out[int(torch.argmax(logits))] = 1.0
        return out
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    keep = sorted_probs.numel()
    if top_p < 1.0:
        cum = torch.cumsum(sorted_probs, dim=-1)
        # the first position where the running sum reaches top_p (round-off: the last one)
        reached = torch.nonzero(cum >= top_p)
        cutoff = sorted_probs[int(reached[0]) if reached.numel() else keep - 1]
        keep = int((sorted_probs >= cutoff).sum())  # ties with the last kept token stay
    if top_k > 0:
        keep = min(keep, top_k)
    kept = sorted_probs[:keep]
    if temperature != 1.0:
        # probs ** (1 / temperature), in log space so a low temperature cannot underflow all to 0
        kept = torch.softmax(torch.log(kept.clamp_min(1e-38)) / temperature, dim=-1)
    out = torch.zeros_like(probs)
    out[order[:keep]] = kept / kept.sum()
    return out


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None) -> int:
    """One token id from a [V] vector of logits: top_k and top_p, then temperature (see above)."""
    if temperature <= 0 or top_p <= 0:
        return int(torch.argmax(logits.detach().reshape(-1).float()))
    probs = sampling_probs(logits, temperature, top_p, top_k)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Sampling:
    """Sampling settings (see the module docstring); the defaults are plain sampling."""

    temperature: float = 1.0        # 0: greedy
    top_p: float = 1.0              # 1: no nucleus cut; 0: greedy
    top_k: int = 0                  # 0: no top-k cut
    presence_penalty: float = 0.0   # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per (decayed) occurrence
    penalty_decay: float = 0.996    # the occurrence table's decay per generated token

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_p <= 0


class Penalties:
    """The occurrence table of presence/frequency penalties, decaying each step."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0, decay: float = 0.996):
        self.presence, self.frequency, self.decay = float(presence), float(frequency), float(decay)
        self.counts: dict[int, float] = {}

    @property
    def active(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A penalised copy of logits [V]: logits[t] - (presence + frequency * count[t])."""
        if not self.active or not self.counts:
            return logits
        ids = torch.tensor(list(self.counts), dtype=torch.long, device=logits.device)
        counts = torch.tensor(list(self.counts.values()), dtype=torch.float32, device=logits.device)
        out = logits.float().clone()
        out[ids] -= self.presence + self.frequency * counts
        return out

    def update(self, token: int) -> None:
        """After a token is chosen: every count decays, then the token's count grows by 1."""
        for t in self.counts:
            self.counts[t] *= self.decay
        self.counts[token] = self.counts.get(token, 0.0) + 1.0


_REPLACEMENT = "\ufffd".encode()


class StreamDecoder:
    """Token ids in, text out, never splitting a UTF-8 character.

    The World tokenizer's decode_bytes gives a token's exact bytes, which may end inside a
    character; an incremental UTF-8 decoder holds such a tail until the next token completes
    it. A tokenizer that can only decode whole text (Hugging Face byte-level BPE) shows a cut
    character as U+FFFD instead: those tokens are held back (up to `max_pending`) and decoded
    together with the tokens that complete them.
    """

    def __init__(self, tokenizer, max_pending: int = 8):
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self._pending: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        self._pending.append(int(token))
        data = self.tokenizer.decode_bytes(self._pending)
        if data.endswith(_REPLACEMENT) and len(self._pending) < self.max_pending:
            return ""
        self._pending.clear()
        return self._utf8.decode(data)

    def flush(self) -> str:
        data = self.tokenizer.decode_bytes(self._pending) if self._pending else b""
        self._pending.clear()
        return self._utf8.decode(data, final=True)


@dataclass
class GenerationResult:
    """What a finished generate() leaves: carry `state` into the next turn."""

    state: object = None
    tokens: list[int] = field(default_factory=list)  # generated ids (eos excluded)
    text: str = ""                                     # the yielded text (stop string excluded)
    stop_reason: str = ""                              # "stop" (a stop string), "eos" or "length"
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0


@torch.inference_mode()
def prefill(model, ids: Sequence[int], state=None, chunk_len: int = 256):
    """Feed ids into the model in chunks; returns (logits [V] after the last id, state)."""
    if not len(ids):
        raise ValueError("prefill needs at least one token")
    device = model.emb.weight.device
    if state is None:
        state = model.zero_state(1)
    logits = None
    for i in range(0, len(ids), chunk_len):
        chunk = torch.tensor([list(ids[i:i + chunk_len])], dtype=torch.long, device=device)
        logits, state = model(chunk, state, last_only=True)
    return logits[0, -1], state


def _hold_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of text that could be the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _Generation:
    """The iterator generate() returns: yields text pieces; `.result` once exhausted."""

    def __init__(self, inner: Iterator[str]):
        self._inner = inner
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._inner)
        except StopIteration as e:
            self.result = e.value
            raise

    def close(self):
        self._inner.close()


def generate(model, tokenizer, prompt_ids: Sequence[int], state=None, max_tokens: int = 200,
             stop: Sequence[str] = ("\n\n",), sampling: Sampling | None = None,
             generator: torch.Generator | None = None, chunk_len: int = 256, eos_id: int | None = None,
             decoder=None, **sampling_kw) -> _Generation:
    """Stream a continuation of prompt_ids (after `state`, or from the zero state).

    Returns an iterator of decoded text pieces; when it is exhausted (or after a plain
    `for` loop) its `.result` is the GenerationResult, whose `.state` has consumed the
    prompt and every generated token except end-of-text. `sampling` (a Sampling) or its
    fields as keywords (temperature=..., top_p=..., ...) choose how tokens are drawn. The
    state passed in is not modified. decoder: a model.decoder() to reuse across calls (a new one
    is built when it is missing or the model's weights changed since it was built).
    """
    if sampling is None:
        sampling = Sampling(**sampling_kw)
    elif sampling_kw:
        raise TypeError("pass either sampling= or its fields as keywords, not both")
    return _Generation(_generate(model, tokenizer, list(prompt_ids), state, max_tokens, tuple(stop or ()),
                                 sampling, generator, chunk_len, eos_id, decoder))


@torch.inference_mode()  # on a generator: entered around each step of it, left at every yield
def _generate(model, tokenizer, prompt_ids, state, max_tokens, stops, sampling, generator, chunk_len, eos_id,
              decoder):
    eos = tokenizer.eos_id if eos_id is None else eos_id
    if decoder is None or decoder.model is not model or not decoder.is_current():
        decoder = model.decoder()
    result = GenerationResult(prompt_tokens=len(prompt_ids))
    t0 = time.perf_counter()
    if not prompt_ids:  # a state alone has no logits to sample from
        raise ValueError("generate needs at least one prompt token")
    logits, state = prefill(model, prompt_ids, state, chunk_len)  # a new state: updated in place below
    result.prefill_s = time.perf_counter() - t0
    result.state = state

    penalties = Penalties(sampling.presence_penalty, sampling.frequency_penalty, sampling.penalty_decay)
    text_decoder = StreamDecoder(tokenizer)
    text = ""      # all decoded text so far
    emitted = 0    # how much of it has been yielded
    t1 = time.perf_counter()
    try:
        while len(result.tokens) < max_tokens:
            token = sample_logits(penalties.apply(logits), sampling.temperature, sampling.top_p, sampling.top_k,
                                  generator)
            if token == eos:
                result.stop_reason = "eos"
                break
            penalties.update(token)
            result.tokens.append(token)
            logits, state = decoder.step(token, state)
            result.state = state
            text += text_decoder.push(token)
            cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0),
                      default=-1)
            if cut >= 0:
                result.stop_reason = "stop"
                text = text[:cut]
                break
            upto = len(text) - _hold_back(text, stops)
            if upto > emitted:
                piece, emitted = text[emitted:upto], upto
                yield piece
        else:
            result.stop_reason = "length"
        if result.stop_reason != "stop":
            text += text_decoder.flush()
        if len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)
    finally:
        result.decode_s = time.perf_counter() - t1
        result.text = text[:emitted]
    return result


def generate_text(model, tokenizer, prompt_ids: Sequence[int], state=None, **kw) -> GenerationResult:
    """generate() run to the end; the text is in the result's `.text`."""
    gen = generate(model, tokenizer, prompt_ids, state, **kw)
    for _ in gen:
        pass
    return gen.result
