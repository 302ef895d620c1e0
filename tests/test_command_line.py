"""Command-line rough edges (issue 25, class 9): a device that is not there, flag choices that
are refused, program names and "next:" hints, error lines after a progress bar, what a task
reply was expected to be, the early-stop hint, the trainable share under --quant, and empty
directories. Installed commands (rwkv-peft-*) are checked in tests/test_package.py."""

import re

import pytest
import torch

from tiny_workspace import COMMON, losses, make_workspace, run_cases, run_script

pytest.importorskip("deepspeed")

MODEL = ["--model", "base.pth", "--tokenizer", "tok.json"]
# (script, args, expected exit code, text of the one line holding "error:", or None: no error)
CASES = {
    "eval on a missing GPU": ("rwkv_peft/eval", [*MODEL, "--data", "chat.jsonl", "--device", "cuda"], 2,
                              "error: --device must be cpu: torch sees no CUDA GPU here, got cuda"),
    "run on a missing GPU": ("rwkv_peft/run", [*MODEL, "--device", "cuda:0"], 2,
                             "error: --device must be cpu: torch sees no CUDA GPU here, got cuda:0"),
    "chat on a missing GPU": ("demo/chat", [*MODEL, "--prompt", "hi", "--device", "cuda"], 2,
                              "error: --device must be cpu: torch sees no CUDA GPU here, got cuda"),
    "run on no device at all": ("rwkv_peft/run", [*MODEL, "--device", "gpu"], 2,
                                "error: --device must be cpu, cuda or cuda:N, got gpu"),
    "a data type --help does not offer": ("train", [*COMMON, "--data_type", "sft"], 2,
                                          "train.py: error: argument --data_type: invalid choice: 'sft'"),
    "train names itself": ("train", ["--no_such_flag"], 2, "train.py: error: unrecognized arguments"),
    "eval names itself": ("rwkv_peft/eval", ["--no_such_flag"], 2,
                          "python -m rwkv_peft.eval: error: unrecognized arguments"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("command_line"))


@pytest.fixture(scope="module")
def outcomes(work, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cases")
    return run_cases(work, [(name, script, args) for name, (script, args, *_) in CASES.items()], files=tmp)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_rough_edges_end_in_one_line(outcomes, case):
    _, _, code, expected = CASES[case]
    if "GPU" in case and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = outcomes[case]
    errors = [line for line in out["stderr"].splitlines() if "error:" in line]
    assert out["code"] == code, (out["code"], out["stderr"][-2000:])
    assert len(errors) == 1 and errors[0].startswith(expected), out["stderr"][-2000:]
    assert "Traceback" not in out["stderr"]
    assert out["new"] == [] and out["gone"] == []


def test_every_data_type_offered_is_accepted(tmp_path):
    from rwkv_peft.data.sources import resolve_data_type
    from rwkv_peft.train.args import build_parser

    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    offered = next(a for a in build_parser()._actions if a.dest == "data_type").choices
    for choice in offered:
        if choice != "binidx":  # a prefix, not this file
            resolve_data_type(tmp_path / "d.jsonl", choice)


def trainable_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("trainable "))


@pytest.mark.slow
def test_runs_say_what_works(work):
    """One table of real runs: each a rough edge a user met, and what the run must now say or leave."""
    val = ["--val_file", "chat.jsonl", "--eval_every", "1"]
    runs = {  # name: (args, check of (process, run directory))
        "the task reply shows what was expected": (
            [*val, "--eval_generate", "1", "--max_steps", "2"],
            lambda p, d: "expected exactly 'fly over green hills' (the record has no 'answer' field)" in p.stdout),
        "no empty adapters/ directory": (
            ["--max_steps", "2"], lambda p, d: (d / "adapter.safetensors").exists() and not (d / "adapters").exists()),
        "periodic adapters still go to adapters/": (
            ["--max_steps", "2", "--save_every", "1"],
            lambda p, d: [f.name for f in (d / "adapters").iterdir()] == ["step-00000001.safetensors"]),
        "the error starts its own line after the progress bar": (
            ["--lr_init", "1e30", "--max_steps", "3"],
            lambda p, d: p.returncode == 2 and re.search(r"(^|\n)error: loss became nan", p.stderr)
            and not re.search(r"[^\n]error:", p.stderr)),
    }
    for name, (args, check) in runs.items():
        proc = run_script(work, "train.py", *COMMON, *args, "--proj_dir", name, check=False)
        assert check(proc, work / name), f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


@pytest.mark.slow
def test_trainable_share_counts_quantized_weights(work):
    pytest.importorskip("torchao")
    plain = run_script(work, "train.py", *COMMON, "--peft", "lora", "--dry_run").stdout
    quant = run_script(work, "train.py", *COMMON, "--peft", "lora", "--quant", "nf4", "--dry_run").stdout
    assert trainable_line(quant) == trainable_line(plain)


@pytest.mark.slow
def test_early_stop_hint_works_as_printed(work):
    # a learning rate too small to move the loss: the second evaluation is no lower, the run stops early
    args = [*COMMON, "--val_file", "chat.jsonl", "--eval_every", "1", "--early_stop", "1", "--lr_init", "1e-30",
            "--max_steps", "4", "--proj_dir", "early"]
    first = run_script(work, "train.py", *args)
    assert "early stop: no lower validation loss in 1 evaluations" in first.stdout
    again = run_script(work, "train.py", *args, "--resume", "--max_steps", "8")
    hint = "train.py --resume --proj_dir early --early_stop 0"  # and it works as printed: test_run_dir.py
    assert "already stopped early" in again.stdout and hint in again.stdout
    more = run_script(work, "train.py", *args, "--resume", "--early_stop", "0")
    assert "resumed from" in more.stdout and len(losses(work / "early")) == 4
