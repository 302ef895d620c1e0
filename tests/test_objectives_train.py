"""train.py --objective dpo / simpo / orpo end to end: runs, exact resume, --init_adapter (SFT then
DPO, merged afterwards), --peft full's frozen reference, and one error line for bad input."""

import json
import math
import random

import pytest
import torch

from rwkv_peft.peft.adapter_file import read_adapter
from tiny_workspace import COMMON, WORDS, losses, make_workspace, run_script

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = make_workspace(tmp_path_factory.mktemp("objectives"))
    rng = random.Random(0)
    with open(d / "prefs.jsonl", "w") as f:  # chosen: the pattern continued; rejected: random words
        for _ in range(16):
            k = rng.randrange(8)
            f.write(json.dumps({"prompt": " ".join(WORDS[k:k + 3]), "chosen": " ".join(WORDS[k + 3:k + 6]),
                                "rejected": " ".join(rng.sample(WORDS, 3))}) + "\n")
    return d


BASE = COMMON[:COMMON.index("--data_file")] + COMMON[COMMON.index("--data_file") + 2:]  # each test names its data


def train(work, *args, check=True):
    return run_script(work, "train.py", *BASE, *args, check=check)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def prefs(*args):
    return ["--data_file", "prefs.jsonl", "--micro_bsz", "2", *args]


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_each_objective_trains_logs_and_resumes_exactly(work, objective):
    args = prefs("--objective", objective, "--peft", "lora", "--lora_dropout", "0.1", "--max_steps", "6",
                 "--train_parts", "state")
    train(work, *args, "--proj_dir", f"{objective}-straight")
    first = records(work / f"{objective}-straight")[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert key in first
    if objective == "dpo":  # policy == reference at the start: the loss is log 2, the rewards 0
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0
    train(work, *args, "--proj_dir", f"{objective}-halves", "--stop_at_step", "3")
    proc = train(work, *args, "--proj_dir", f"{objective}-halves", "--resume")
    assert "resumed from" in proc.stdout
    assert losses(work / f"{objective}-halves") == losses(work / f"{objective}-straight")
    assert records(work / f"{objective}-halves")[-1]["rewards/margins"] == \
        records(work / f"{objective}-straight")[-1]["rewards/margins"]
    a = read_adapter(work / f"{objective}-straight/adapter.safetensors")
    b = read_adapter(work / f"{objective}-halves/adapter.safetensors")
    for module in a.tensors:
        for name, t in a.tensors[module].items():
            assert torch.equal(b.tensors[module][name], t), (module, name)
    for key, t in a.parts.items():
        assert torch.equal(b.parts[key], t), key


@pytest.mark.parametrize("method", ["bone", "pissa"])
def test_sft_then_dpo_from_the_sft_adapter_merges(work, method):
    train(work, "--data_file", "text.jsonl", "--peft", method, "--max_steps", "4", "--proj_dir", f"sft-{method}")
    sft = work / f"sft-{method}/adapter.safetensors"
    train(work, *prefs("--objective", "dpo", "--init_adapter", str(sft), "--max_steps", "4"),
          "--proj_dir", f"dpo-{method}")
    # the reference is the SFT adapter as it started: log 2 at the first step
    assert records(work / f"dpo-{method}")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    dpo = read_adapter(work / f"dpo-{method}/adapter.safetensors")
    assert dpo.base["init_adapter"]["path"] == str(sft.resolve())
    assert dpo.layers == read_adapter(sft).layers
    proc = run_script(work, "merge.py", "--adapter", f"dpo-{method}/adapter.safetensors", "--output",
                      f"merged-{method}.pth")
    assert "wrote" in proc.stdout


def test_full_finetune_dpo_uses_a_frozen_reference(work):
    train(work, *prefs("--objective", "dpo", "--peft", "full", "--max_steps", "2"), "--proj_dir", "dpo-full")
    assert records(work / "dpo-full")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_in_pieces_trains_as_the_whole_sequences(work):
    """--chunk_ctx 4 (every pair several pieces long) under ZeRO-2, whose gradient hooks allow one
    gradient per parameter and step, and under ZeRO-3 with --grad_cp: the losses and figures of
    the unchunked run (the reference runs in pieces too). A trained initial state in pieces:
    tests/test_preference_chunked.py."""
    args = prefs("--objective", "dpo", "--peft", "lora", "--max_steps", "4")
    train(work, *args, "--proj_dir", "dpo-whole")
    proc = train(work, *args, "--chunk_ctx", "4", "--strategy", "deepspeed_stage_2", "--proj_dir", "dpo-pieces")
    assert "in pieces of 4 tokens" in proc.stdout
    train(work, *args, "--chunk_ctx", "4", "--strategy", "deepspeed_stage_3", "--grad_cp", "1",
          "--proj_dir", "dpo-pieces3")
    whole = records(work / "dpo-whole")
    assert len(whole) == 4 and whole[-1]["rewards/margins"] > 0.01  # it trains
    for run in ("dpo-pieces", "dpo-pieces3"):
        for got, ref in zip(records(work / run), whole, strict=True):
            for key in ("loss", "rewards/margins", "logps/chosen"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), (run, key)


@pytest.mark.parametrize("args, message", [
    (["--data_file", "bad.jsonl", "--objective", "dpo"], "bad.jsonl line 1: a preference record needs prompt"),
    (["--data_file", "prefs.jsonl", "--objective", "dpo", "--val_split", "0.1"], "--val_split splits SFT data"),
    (["--data_file", "prefs.jsonl", "--objective", "grpo", "--reward", "exact", "--chunk_ctx", "16"],
     "--chunk_ctx is not supported with --objective grpo"),
    (["--data_file", "prefs.jsonl", "--init_adapter", "nowhere.safetensors"], "--init_adapter nowhere"),
])
def test_bad_input_gives_one_error_line(work, args, message):
    (work / "bad.jsonl").write_text(json.dumps({"prompt": "the cat", "chosen": "sat"}) + "\n")
    proc = train(work, *args, "--max_steps", "1", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr[-2000:]


def test_dpo_across_two_processes_equals_one_process(work):
    # the reference runs on each process's own model; the figures are averaged over the processes
    args = prefs("--objective", "dpo", "--peft", "lora", "--max_steps", "4", "--strategy", "deepspeed_stage_2")
    args[args.index("--micro_bsz") + 1] = "2"
    train(work, *args, "--proj_dir", "dpo-one")
    args[args.index("--micro_bsz") + 1] = "1"
    run_script(work, "train.py", *BASE, *args, "--proj_dir", "dpo-two", nproc=2)
    one, two = records(work / "dpo-one"), records(work / "dpo-two")
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in one]),
                                   rtol=1e-4, atol=1e-5)
