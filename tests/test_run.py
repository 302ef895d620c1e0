"""python -m rwkv_peft.run: the size summary and a greedy continuation, checked against a
decode by whole-sequence forwards."""

import torch

from greedy_reference import greedy_tokens
from rwkv_peft import load_model
from rwkv_peft.data.tokenizer import load_tokenizer
from rwkv_peft.run import main as run_main
from tiny_workspace import ROOT

BASE, TOKENIZER = ROOT / "demo" / "base.pth", ROOT / "demo" / "tokenizer.json"


def test_run_continues_greedily(capsys):
    prompt = "User: What is the capital of Varnholm?\n\nAssistant:"
    assert run_main(["--model", str(BASE), "--tokenizer", str(TOKENIZER), "--prompt", prompt, "--tokens", "9"]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(str(TOKENIZER))
    model = load_model(str(BASE), dtype=torch.float32).eval()
    expected = greedy_tokens(model, tok.encode(prompt), 9, eos=tok.eos_id)
    assert expected and out.splitlines()[0].startswith("RWKV-7: 4 layers, width 128, 2 heads of 64")
    assert prompt + tok.decode(expected) in out
    assert f"[{len(tok.encode(prompt))} prompt + {len(expected)} generated tokens" in out


def test_run_without_a_model_creates_and_saves_a_fresh_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(["--tokens", "3"]) == 0
    saved = tmp_path / "out" / "fresh-rwkv7-tiny.pth"
    assert "created an untrained tiny RWKV-7" in capsys.readouterr().out
    assert load_model(str(saved)).config.n_layer == 2  # loads back as an official checkpoint
