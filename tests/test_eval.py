"""rwkv_peft.eval against references built here: the reply-only loss from a float64 softmax over
hand-rendered chat text, the task score from a greedy decode by whole-sequence forwards, and the
trainable count from the layer shapes."""

import json

import pytest
import torch

from rwkv_peft import load_model
from rwkv_peft.data.tokenizer import load_tokenizer
from rwkv_peft.eval import main as eval_main
from rwkv_peft.peft.adapt import parse_rules, plan_adapters, prepare_peft
from rwkv_peft.peft.adapter_file import describe_base, save_adapter
from greedy_reference import greedy_tokens
from tiny_workspace import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the demo model is tiny

BASE = ROOT / "demo" / "base.pth"
TOKENIZER = ROOT / "demo" / "tokenizer.json"
RECORDS = [
    {"messages": [{"role": "user", "content": "What is the capital of Varnholm?"},
                  {"role": "assistant", "content": "The capital of Varnholm is Lumen Bay."}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "And another?"},
                  {"role": "assistant", "content": "Green."}]},
]


def reference_reply_loss(model, tok) -> tuple[float, int]:
    """Mean -log p over the reply tokens " {answer}\\n\\n", each chat rendered by hand (SPEC
    section 3): runs of untrained and trained text, each run tokenized on its own."""
    total, count = 0.0, 0
    for rec in RECORDS:
        runs: list[list] = []  # [text, trained]
        for m in rec["messages"]:
            if m["role"] == "assistant":
                pieces = [("Assistant:", False), (f" {m['content']}\n\n", True)]
            else:
                pieces = [(f"{m['role'].capitalize()}: {m['content']}\n\n", False)]
            for text, trained in pieces:
                if runs and runs[-1][1] == trained:
                    runs[-1][0] += text
                else:
                    runs.append([text, trained])
        ids, trained = [], []
        for text, is_reply in runs:
            new = tok.encode(text)
            ids += new
            trained += [is_reply] * len(new)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
        for pos in range(1, len(ids)):
            if trained[pos]:
                total -= float(logp[pos - 1, ids[pos]])
                count += 1
    return total / count, count


def reference_greedy_reply(model, tok, prompt: str, max_tokens: int = 24) -> str:
    out = greedy_tokens(model, tok.encode(prompt), max_tokens, stop=lambda ids: "\n\n" in tok.decode(ids))
    return tok.decode(out).split("\n\n")[0].strip()


def test_loss_task_and_trainable_count_match_references(tmp_path):
    tok = load_tokenizer(str(TOKENIZER))
    base = load_model(str(BASE), dtype=torch.float32).eval()
    ref_loss, ref_count = reference_reply_loss(base, tok)

    # a task record the base answers (its own greedy reply holds the answer) and one it cannot
    prompt = "User: What is the capital of Varnholm?\n\nAssistant:"
    reply = reference_greedy_reply(base, tok, prompt)
    assert len(reply) > 3, reply
    records = [dict(RECORDS[0], answer=reply[-4:]), RECORDS[1]]
    records[1] = dict(RECORDS[1], answer="no such answer")
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    # a PiSSA adapter as initialised: the adapted model equals the base, r (in + out) per layer trains
    sd = torch.load(BASE, weights_only=True)
    model = load_model(sd, dtype=torch.float32)
    methods, parts = prepare_peft(model, plan_adapters(model, parse_rules("*.att.key=pissa:4; *.ffn.value=pissa:4"),
                                                       None))
    adapter = tmp_path / "run" / "adapter.safetensors"
    adapter.parent.mkdir()
    save_adapter(adapter, methods, parts, describe_base(sd, model.config, str(BASE)))
    expected_trainable = sum(4 * (sd[f"{m}.weight"].shape[0] + sd[f"{m}.weight"].shape[1]) for m in methods)

    out = tmp_path / "eval.json"
    assert eval_main(["--adapter", str(adapter), "--data", str(data), "--tokenizer", str(TOKENIZER),
                      "--max_tokens", "24", "--json", str(out)]) == 0
    base_row, adapter_row = json.loads(out.read_text())
    for row in (base_row, adapter_row):
        assert row["loss_tokens"] == ref_count
        assert row["loss"] == pytest.approx(ref_loss, rel=1e-4)
        assert row["items"] == 3  # one assistant turn, then two
    assert base_row["method"] == "model" and base_row["trainable"] == 0
    assert adapter_row["method"] == "pissa:4" and adapter_row["trainable"] == expected_trainable
    hits = [r["hit"] for r in base_row["replies"]]
    assert base_row["replies"][0]["reply"] == reply and hits == [True, False, False]
    assert base_row["task"] == pytest.approx(1 / 3)
