"""Memory (issue 25, class 10): a record costs no more memory than what is used of it, and a run
keeps no copy of its base (with --quant, the mapped checkpoint is let go once quantized)."""

import json
import random
import subprocess
import sys

import pytest
import torch

from tiny_workspace import COMMON, ROOT, WORDS, clean_env, losses, make_workspace, run_script

pytest.importorskip("deepspeed")

LINE_MB = 8  # one record of 8 MB: tokenized whole, it cost the tokenizer over 1 GB


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = make_workspace(tmp_path_factory.mktemp("memory"))
    rng = random.Random(0)
    big = " ".join(rng.choice(WORDS) for _ in range((LINE_MB << 20) // 5))  # words of 4 letters on average
    (d / "big-text.jsonl").write_text(json.dumps({"text": "the cat sat"}) + "\n" + json.dumps({"text": big}) + "\n")
    (d / "big-pack.jsonl").write_bytes((d / "big-text.jsonl").read_bytes())  # a token cache of its own
    chat = {"messages": [{"role": "user", "content": "red bird"}, {"role": "assistant", "content": big}]}
    (d / "big-chat.jsonl").write_text((d / "chat.jsonl").read_text() + json.dumps(chat) + "\n")
    return d


def peak_rss_mb(work, *command) -> int:
    """Peak RSS (MB) of one command, read by a parent process that runs nothing else."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True); "
            "sys.exit(p.stderr.decode()[-2000:]) if p.returncode else "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, command)], cwd=work, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


TRAIN = [sys.executable, ROOT / "train.py", *COMMON, "--dry_run"]
EVAL = [sys.executable, "-m", "rwkv_peft.eval", "--model", "base.pth", "--tokenizer", "tok.json", "--ctx_len", "32",
        "--max_tokens", "2"]
# name: (command with a record of LINE_MB, the same command on small records, MB the big record may add)
CASES = {
    "a validation record (one sample per record)": ([*TRAIN, "--val_file", "big-text.jsonl"],
                                                    [*TRAIN, "--val_file", "text.jsonl"], 6 * LINE_MB),
    "a chat record in eval": ([*EVAL, "--data", "big-chat.jsonl"], [*EVAL, "--data", "chat.jsonl"], 6 * LINE_MB),
    "a record packed into training windows": ([*TRAIN, "--data_file", "big-pack.jsonl"], TRAIN, 40 * LINE_MB),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_long_record_costs_what_is_used_of_it(work, case):
    big, small, allowed = CASES[case]
    extra = peak_rss_mb(work, *big) - peak_rss_mb(work, *small)
    print(f"{case}: {extra} MB more peak RSS")
    assert extra < allowed, f"{case}: {extra} MB more peak RSS for one {LINE_MB} MB record (allowed {allowed})"


def test_records_that_fit_keep_their_tokens_and_long_ones_their_first():
    from rwkv_peft.data.chat_format import encode_text
    from rwkv_peft.data.tokenizer import load_tokenizer

    tok = load_tokenizer("world")
    rng = random.Random(1)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 30))) for _ in range(4000))
    whole = tok.encode(text)
    assert encode_text(text, tok) == whole
    for cap in (1, 33, 129, 4097):
        assert encode_text(text, tok, cap) == whole[:cap]
    short = text[:5000]
    assert encode_text(short, tok, 10**6) == tok.encode(short)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_no_copy_of_the_base_stays_mapped(tmp_path, monkeypatch, quant):
    pytest.importorskip("torchao")
    import gc

    from rwkv_peft.train.args import parse_args
    from rwkv_peft.train.engine import destroy_process_group, init_process_group
    from rwkv_peft.train.run_dir import RunDirectory
    from rwkv_peft.train.trainer import _prepare

    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)  # a world of one, as plain train.py makes it

    work = make_workspace(tmp_path)
    torch.save({k: v.to(torch.bfloat16) for k, v in torch.load(work / "base.pth").items()}, work / "bf16.pth")
    args = parse_args([*COMMON, "--load_model", str(work / "bf16.pth"), "--data_file", str(work / "text.jsonl"),
                       "--tokenizer", str(work / "tok.json"), "--peft", "pissa", "--quant", quant,
                       "--proj_dir", str(tmp_path / "run")])
    init_process_group()
    try:
        with RunDirectory() as run_dir:
            run = _prepare(args, None, run_dir)
    finally:
        destroy_process_group()
    gc.collect()
    maps = open("/proc/self/maps").read()
    assert str(work / "bf16.pth") not in maps
    assert run.new_base is None and len(run.base_info["fingerprint"]) == 16


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_pissa_resume_rereads_its_base_exactly(work, quant):
    pytest.importorskip("torchao")
    args = [*COMMON, "--peft", "pissa", "--quant", quant, "--max_steps", "4", "--micro_bsz", "2"]
    run_script(work, "train.py", *args, "--proj_dir", f"straight-{quant}")
    run_script(work, "train.py", *args, "--proj_dir", f"halves-{quant}", "--stop_at_step", "2")
    run_script(work, "train.py", *args, "--proj_dir", f"halves-{quant}", "--resume")
    assert losses(work / f"halves-{quant}") == losses(work / f"straight-{quant}")
