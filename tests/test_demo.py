"""The quickstart end to end, on CPU, in a temporary directory: train a few steps on the
embedded demo data, merge with a bare `merge.py`, chat with the merged file and with the
base + adapter unmerged, and chat in a real terminal."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "demo"
QUESTION = "What is the capital of France?"


def env():
    # one thread: on a shared 2-core machine two threads made the tiny demo model 15x slower
    e = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(cwd, *cmd, input=None, check=True):
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, env=env(), input=input,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_embedded_demo_files():
    for name in ("base.pth", "tokenizer.json", "data/train.jsonl", "data/heldout.jsonl"):
        assert (DEMO / name).is_file(), name
    assert sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file() and ".rwkv_peft_cache" not in f.parts) < 8e6
    records = [json.loads(line) for line in (DEMO / "data" / "heldout.jsonl").read_text().splitlines()]
    assert records and all(r["answer"] in r["messages"][-1]["content"] for r in records)
    train_questions = {m["content"] for line in (DEMO / "data" / "train.jsonl").read_text().splitlines()
                       for m in json.loads(line)["messages"] if m["role"] == "user"}
    assert not train_questions & {r["messages"][0]["content"] for r in records}  # held out: other questions


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """`python train.py --peft bone --bone_r 64` (20 short steps) then a bare `python merge.py`.

    20 steps, not fewer: after 3 the greedy replies still matched the base model's, so a dropped
    adapter or a no-op merge went unnoticed (about 2 s of training on CPU)."""
    d = tmp_path_factory.mktemp("quickstart")
    run(d, ROOT / "train.py", "--peft", "bone", "--bone_r", "64", "--max_steps", "20", "--ctx_len", "64",
        "--precision", "fp32")
    adapters = list((d / "out").glob("run-*/adapter.safetensors"))
    assert len(adapters) == 1
    merge = run(d, ROOT / "merge.py")
    merged = adapters[0].with_name("merged.pth")
    assert merged.is_file(), merge.stdout
    return d, adapters[0], merged


@pytest.fixture(scope="module")
def chat():
    """demo/chat.py as a module, to call main() in this process (no torch import per call)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("demo_chat", DEMO / "chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # chat picks 1 thread for the tiny model


def chat_reply(chat, capsys, monkeypatch, cwd, *args, input=None):
    monkeypatch.chdir(cwd)
    if input is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(input))
    capsys.readouterr()
    rc = chat.main([*map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


UNSEEN = "What is the capital of Varnholm?"  # the base model's reply to it changes with the adapter
GREEDY = ["--prompt", QUESTION, "--prompt", "Tell me a story.", "--prompt", UNSEEN, "--seed", "0",
          "--temperature", "0", "--max_tokens", "24"]


@pytest.mark.slow
def test_chat_merged_equals_base_plus_adapter(quickstart, chat, capsys, monkeypatch):
    d, adapter, merged = quickstart
    # the command line itself, once: no --model picks the newest out/**/merged.pth
    proc = run(d, DEMO / "chat.py", *GREEDY)
    assert "tokens/s" in proc.stderr and str(merged.relative_to(d)) in proc.stderr
    replies = proc.stdout.splitlines()
    assert len(replies) == 3 and all(r.strip() for r in replies)  # one reply per --prompt
    for args in (["--model", merged], ["--model", DEMO / "base.pth", "--adapter", adapter],
                 ["--adapter", adapter]):  # the last: the base recorded in the adapter
        rc, out, err = chat_reply(chat, capsys, monkeypatch, d, *args, *GREEDY)
        assert rc == 0 and out == proc.stdout, (args, err)
    # the adapter must matter: the base alone answers the unseen question differently
    rc, out, err = chat_reply(chat, capsys, monkeypatch, d, "--model", DEMO / "base.pth", *GREEDY)
    assert rc == 0 and len(out.splitlines()) == 3, err
    assert out.splitlines()[2] != replies[2], f"base and merged both replied {replies[2]!r} to {UNSEEN!r}"


def test_chat_sampling_repeats_with_a_seed(chat, capsys, monkeypatch, tmp_path):
    args = ["--model", DEMO / "base.pth", "--prompt", "Tell me a story.", "--seed", "3", "--temperature", "1",
            "--top_p", "0.9", "--max_tokens", "16"]
    first = chat_reply(chat, capsys, monkeypatch, tmp_path, *args)
    assert first[0] == 0 and first[1].strip()
    assert chat_reply(chat, capsys, monkeypatch, tmp_path, *args)[1] == first[1]


def test_chat_errors_are_one_line(chat, capsys, monkeypatch, tmp_path):
    for args in (["--model", "missing.pth"], ["--model", DEMO / "base.pth", "--tokenizer", "world"],
                 ["--adapter", "missing.safetensors"]):
        rc, out, err = chat_reply(chat, capsys, monkeypatch, tmp_path, *args, "--prompt", "hi")
        assert rc == 2, err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_chat_ends_at_end_of_input(chat, capsys, monkeypatch, tmp_path):
    rc, out, err = chat_reply(chat, capsys, monkeypatch, tmp_path, "--model", DEMO / "base.pth", "--temperature", "0",
                              "--max_tokens", "8", input="Hello!\n/reset\nHi\n")
    assert rc == 0 and out.count("Assistant:") == 2 and "(conversation cleared)" in out


STATS = r"\[\d+ tokens in [\d.]+ s, [\d.]+ tokens/s"  # the line demo/chat.py writes after each reply


@pytest.mark.slow
def test_chat_in_a_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, [str(DEMO / "chat.py"), "--model", str(DEMO / "base.pth"),
                                           "--temperature", "0", "--max_tokens", "24"],
                          cwd=str(tmp_path), env=env(), encoding="utf-8", timeout=120)
    try:
        child.expect_exact("User: ")
        child.sendline("Hello!")
        child.expect_exact("Assistant:")
        child.expect(STATS)
        first = child.before  # the reply alone: what came between "Assistant:" and the stats line
        child.expect_exact("User: ")
        child.sendline(QUESTION)
        child.expect_exact("Assistant:")
        child.expect(STATS)
        assert child.before.strip(), "no second reply"
        child.expect_exact("User: ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("User: ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert first.strip(), "no first reply"
    assert child.exitstatus == 0, child.before
