"""The World chat format (docs/formats.md section 3): the one rendering of chats and SFT records that
training, chat, eval and validation share.

The exact strings:
    CHAT_SYSTEM "System: {}\\n\\n"   CHAT_USER "User: {}\\n\\n"
    CHAT_ASSISTANT "Assistant:"     CHAT_REPLY " {}\\n\\n"
so one exchange is `User: q\\n\\nAssistant: a\\n\\n` and turns follow each other directly.
The loss counts ONLY the reply `" {a}\\n\\n"`, i.e. the assistant's tokens and its
end-of-turn "\\n\\n"; never the system text, "User: ...", or "Assistant:". The space after
"Assistant:" belongs to the reply because inference prompts end in "Assistant:" (the model
generates " answer..."). Message contents are stripped and every run of blank lines inside
them becomes one "\\n", since "\\n\\n" ends a turn (generation stops there). An SFT record
`{Q: question, R: answer}` (sft_fields=(Q, R)) renders as one user turn and its reply.

Tokenization: each maximal run of text with the same mask is tokenized on its own and the
ids are concatenated, so mask boundaries fall exactly between tokens. The cuts are only
after "Assistant:" and after a reply's "\\n\\n"; for the World vocab this gives the same ids
as tokenizing the whole conversation (there is no ": x" or "\\n\\nX" token), while a BPE
tokenizer may merge differently across a cut than it would in one string.
"""

from __future__ import annotations

import re
from typing import Sequence

from rwkv_peft.errors import RWKVPeftError

__all__ = [
    "CHAT_ASSISTANT",
    "CHAT_REPLY",
    "CHAT_SYSTEM",
    "CHAT_TEMPLATE",
    "CHAT_USER",
    "RENDER_LOSS_END",
    "RENDER_LOSS_START",
    "chat_segments",
    "encode_segments",
    "encode_text",
    "fields_segments",
    "merge_runs",
]

# World chat format (docs/formats.md section 3). The reply template holds the trained text.
CHAT_SYSTEM = "System: {}\n\n"
CHAT_USER = "User: {}\n\n"
CHAT_ASSISTANT = "Assistant:"
CHAT_REPLY = " {}\n\n"
_BLANK_LINES = re.compile(r"\n[^\S\n]*(?:\n[^\S\n]*)*\n")
# everything that decides the rendered text: part of a token cache's key
CHAT_TEMPLATE = (CHAT_SYSTEM, CHAT_USER, CHAT_ASSISTANT, CHAT_REPLY, _BLANK_LINES.pattern)

# TrainingData.render() wraps the tokens whose loss counts in these markers.
RENDER_LOSS_START = "\u27e6"  # ⟦
RENDER_LOSS_END = "\u27e7"  # ⟧


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
    return merge_runs(raw)


def merge_runs(raw: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbouring (text, flag) pieces that have the same flag."""
    out: list[tuple[str, bool]] = []
    for text, trained in raw:
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        else:
            out.append((text, trained))
    return out


def fields_segments(rec: dict, fields: tuple[str, str], where: str) -> list[tuple[str, bool]]:
    """[(text, trained)] for an SFT record: fields=(question, answer) as one user turn and its reply."""
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


def encode_segments(segments: Sequence[tuple[str, bool]], tokenizer,
                    max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Tokenize each run separately and concatenate: (ids, per-token loss flags 0/1); at most
    max_tokens of them (encode_text), so that text beyond them is never tokenized."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments:
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        t = encode_text(text, tokenizer, None if max_tokens is None else max_tokens - len(ids))
        ids += t
        mask += [int(trained)] * len(t)
    return ids, mask


TEXT_PIECE = 1 << 20  # characters tokenized at once: what one call of the tokenizer may cost


def encode_text(text: str, tokenizer, max_tokens: int | None = None) -> list[int]:
    """tokenizer.encode(text), or its first max_tokens ids. A text longer than one piece (1 Mi
    characters, or far more than max_tokens ids can come from) is tokenized a piece at a time,
    stopping once max_tokens ids are there: a tokenizer's memory grows with what it is given
    (several GB for a 38 MB line), and a long record must cost no more than what is used of it.
    Pieces end after a newline followed by a non-space character where there is one, as .txt
    files are read (sources.py): the ids equal the whole text's; a cut inside a line of more
    than a piece can change a token next to it."""
    piece = TEXT_PIECE if max_tokens is None else min(TEXT_PIECE, 64 * max_tokens + 4096)
    if len(text) <= piece:
        ids = tokenizer.encode(text)
        return ids if max_tokens is None else ids[:max_tokens]
    ids, start = [], 0
    while start < len(text) and (max_tokens is None or len(ids) < max_tokens):
        end = len(text) if len(text) - start <= piece else _piece_end(text, start, start + piece)
        ids += tokenizer.encode(text[start:end])
        start = end
    return ids if max_tokens is None else ids[:max_tokens]


def _piece_end(text: str, start: int, end: int) -> int:
    """Just after the last newline in text[start:end] followed by a non-space character, else end."""
    cut = end - 1  # the newline needs a character after it
    while (j := text.rfind("\n", start, cut)) > start:
        if not text[j + 1].isspace():
            return j + 1
        cut = j
    return end

