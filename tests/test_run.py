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


def test_run_picks_the_tokenizer_that_fits_the_model_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """What train.py's `next:` hint runs on a fully trained demo model: no --tokenizer given, a
    1024-word vocabulary (the World tokenizer's ids would index past it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(BASE))
    assert run_main(["--model", "model.safetensors", "--tokens", "3"]) == 0
    assert run_main(["--tokens", "3"]) == 0  # no --model: the embedded demo base
    assert capsys.readouterr().out.count("RWKV-7: 4 layers, width 128") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def safetensors_bytes(path) -> bytes:
    from safetensors.torch import save

    return save(torch.load(path, weights_only=True))
