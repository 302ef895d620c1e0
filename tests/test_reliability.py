"""Bad inputs, interruptions, non-finite losses and untrusted files.

Every bad input: a non-zero exit, one `error:` line naming the file/key/flag/line and what
to do, no traceback, and nothing new left on disk.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from official_layout import rwkv7_state_dict
from rwkv_peft import load_model
from rwkv_peft.peft.adapt import plan_adapters, prepare_peft
from rwkv_peft.peft.adapter_file import describe_base, save_adapter
from tiny_workspace import COMMON, ROOT, clean_env, losses, make_workspace, run_cases, run_script

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.slow  # end-to-end runs: python -m pytest -m 'not slow' skips them


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = make_workspace(tmp_path_factory.mktemp("reliability"))
    base = torch.load(d / "base.pth", weights_only=True)
    torch.save({**base, "blocks.0.att.evil": Payload(d / "PWNED")}, d / "evil.pth")
    torch.save({"blocks.0.disha": Payload(d / "PWNED")}, d / "evil-adapter.pth")
    (d / "truncated.pth").write_bytes((d / "base.pth").read_bytes()[:4000])
    torch.save({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_mix_k": torch.zeros(4)}, d / "rwkv4.pth")
    # an adapter trained on a different base
    other = rwkv7_state_dict(vocab=21, n_layer=2, n_embd=64, head_size=16, seed=7)
    model = load_model(other)
    methods, parts = prepare_peft(model, plan_adapters(model, [], ("bone", {"r": 16})))
    save_adapter(d / "other-base.safetensors", methods, parts, describe_base(other, model.config, None))
    model = load_model(base)
    methods, parts = prepare_peft(model, plan_adapters(model, [], ("bone", {"r": 16})))
    save_adapter(d / "good.safetensors", methods, parts, describe_base(base, model.config, d / "base.pth"))
    # RWKV-PEFT LoRA/PiSSA files, which say neither alpha nor which method they are
    C = base["emb.weight"].shape[1]
    torch.save({"blocks.0.att.key.lora_A": torch.ones(4, C), "blocks.0.att.key.lora_B": torch.ones(C, 4)},
               d / "peft-lora.pth")
    torch.save({"model.blocks.0.att.key.init_lora_A": torch.ones(4, C)}, d / "init-of-another-run.pth")
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    (d / "empty.jsonl").write_text("")
    (d / "malformed.jsonl").write_text('{"text": "the cat"}\n{"text": "sat on\n')
    (d / "plain.txt").write_text("the cat sat on a mat\n")
    (d / "nofields.jsonl").write_text('{"query": "red", "response": "bird"}\n{"query": "cat"}\n')
    # a binidx pair that disagree: the .idx says more tokens than the .bin holds
    subprocess.run([sys.executable, "-m", "rwkv_peft.data.prepare", "text.jsonl", "pair", "--tokenizer", "tok.json"],
                   cwd=d, env=clean_env(), check=True, capture_output=True)
    with open(d / "pair.bin", "r+b") as f:
        f.truncate(os.path.getsize(d / "pair.bin") // 2)
    (d / "a_file").write_text("not a directory")
    (d / "ds.json").write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2}))
    return d


TRAIN = ["--max_steps", "2"]
CASES = {
    "missing checkpoint": ("train", ["--load_model", "nope.pth"], "checkpoint not found: nope.pth"),
    "truncated checkpoint": ("train", ["--load_model", "truncated.pth"], "truncated.pth is not a readable PyTorch file"),
    "neither RWKV-6 nor 7": ("train", ["--load_model", "rwkv4.pth"], "only RWKV-6 (x060) and RWKV-7"),
    "malicious checkpoint": ("train", ["--load_model", "evil.pth"], "evil.pth holds Python objects other than tensors"),
    "malicious adapter": ("merge", ["--base", "base.pth", "--adapter", "evil-adapter.pth"],
                          "evil-adapter.pth holds Python objects other than tensors"),
    "adapter of another base": ("merge", ["--base", "base.pth", "--adapter", "other-base.safetensors"],
                                "was trained on a different base"),
    "bat rank": ("train", ["--peft", "bat", "--bat_r", "24"], "--peft at layer blocks.0.att.receptance: bat rank 24"),
    "unknown method": ("train", ["--peft_rules", "blocks.*=dora:4"], "unknown method 'dora'"),
    "learned state in pieces under ZeRO-3": ("train", ["--train_parts", "state", "--chunk_ctx", "8",
                                                       "--strategy", "deepspeed_stage_3"],
                                             "--chunk_ctx with --train_parts state needs ZeRO stage 1 or 2"),
    "rule matching nothing": ("train", ["--peft_rules", "blocks.*.att.gate=bone:8"],
                              "rule 'blocks.*.att.gate=bone:8' matches no linear layer"),
    "ctx_len 0": ("train", ["--ctx_len", "0"], "--ctx_len must be positive"),
    "micro_bsz 0": ("train", ["--micro_bsz", "0"], "--micro_bsz must be positive"),
    "accumulation -1": ("train", ["--accumulate_grad_batches", "-1"], "--accumulate_grad_batches must be positive"),
    "empty data": ("train", ["--data_file", "empty.jsonl"], "empty.jsonl"),
    "malformed jsonl": ("train", ["--data_file", "malformed.jsonl"], "malformed.jsonl line 2"),
    "missing sft field": ("train", ["--data_file", "nofields.jsonl", "--sft_fields", "query", "response"],
                          "nofields.jsonl line 2"),
    "token ids >= vocab": ("train", ["--tokenizer", "world"], "has 65536 ids but the model's vocabulary has 21"),
    "chat with a bigger tokenizer": ("demo/chat", ["--model", "base.pth", "--tokenizer", "world", "--prompt", "hi"],
                                     "--tokenizer world has 65536 ids but the model's vocabulary has 21"),
    "bin/idx disagree": ("train", ["--data_file", "pair", "--data_type", "binidx"], "pair."),
    "unwritable output": ("train", ["--proj_dir", "a_file/run"], "--proj_dir a_file/run cannot be written"),
    "resume nothing": ("train", ["--proj_dir", "fresh", "--resume"], "nothing to resume in fresh"),
    "deepspeed json conflict": ("train", ["--deepspeed_config", "ds.json"], "train_batch_size 7 != micro batch 2"),
    "fp16 without a GPU": ("train", ["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
    "peft full with rules": ("train", ["--peft", "full", "--peft_rules", "blocks.*=bone:16"],
                             "--peft full trains every weight, so --peft_rules cannot apply"),
    "corrupt safetensors": ("train", ["--load_model", "garbage.safetensors"],
                            "garbage.safetensors is not a readable safetensors file"),
    "run with a bigger tokenizer": ("rwkv_peft/run", ["--model", "base.pth", "--tokenizer", "world"],
                                    "--tokenizer world has 65536 ids but the model's vocabulary has 21"),
    "run with no fitting tokenizer": ("rwkv_peft/run", ["--model", "base.pth"],
                                      "the model has 21 vocabulary rows, which fits neither"),
    "eval with a bigger tokenizer": ("rwkv_peft/eval", ["--model", "base.pth", "--tokenizer", "world",
                                                        "--data", "chat.jsonl"],
                                     "--tokenizer world has 65536 ids but the model's vocabulary has 21"),
    "RWKV-PEFT LoRA without alpha": ("merge", ["--base", "base.pth", "--adapter", "peft-lora.pth"],
                                     "records neither alpha nor which of the two it is; pass --lora_alpha"),
    "PiSSA init of another run": ("merge", ["--base", "base.pth", "--adapter", "peft-lora.pth", "--pissa_init",
                                            "init-of-another-run.pth"], "missing tensor 'blocks.0.att.key.init_lora_B'"),
    "merge to an unknown format": ("merge", ["--base", "base.pth", "--adapter", "good.safetensors", "--output",
                                             "m.bin"], "--output m.bin: unknown checkpoint format '.bin'"),
    "empty validation file": ("train", ["--val_file", "empty.jsonl"], "--val_file empty.jsonl: "),
    "malformed validation file": ("train", ["--val_file", "malformed.jsonl"], "malformed.jsonl line 2"),
    "eval_every without held-out data": ("train", ["--eval_every", "2"],
                                         "--eval_every needs held-out data: add --val_file FILE or --val_split"),
    "val_split too large": ("train", ["--val_split", "0.6"], "--val_split must be a fraction in (0, 0.5], got 0.6"),
    "val_split negative": ("train", ["--val_split", "-0.1"], "--val_split must be a fraction in (0, 0.5]"),
    "val_split of plain text": ("train", ["--data_file", "plain.txt", "--val_split", "0.2"],
                                "--val_split holds out records of a .jsonl file"),
    "unknown --quant": ("train", ["--quant", "nf3"], "--quant: unknown format 'nf3'; choose one of none, nf4, int8"),
    "--quant with full training": ("train", ["--peft", "full", "--quant", "nf4"],
                                   "--quant nf4 quantizes the frozen base under adapters, but --peft full adapts"),
    "--quant with nothing adapted": ("train", ["--peft", "none", "--train_parts", "ln", "--quant", "int8"],
                                     "but --peft none adapts no layer"),
    "--quant_targets without --quant": ("train", ["--quant_targets", "all"], "--quant_targets all needs --quant"),
    "merge over its base": ("merge", ["--base", "base.pth", "--adapter", "good.safetensors", "--output",
                                      "base.pth"], "--output base.pth is the same file as --base"),
    "merge into a file's dir": ("merge", ["--base", "base.pth", "--adapter", "good.safetensors", "--output",
                                          "a_file/merged.pth"], "a_file is not a writable directory"),
}


@pytest.fixture(scope="module")
def outcomes(work, tmp_path_factory):
    """Every case of CASES, run by tests/script_cases.py in one process (one start-up for all)."""
    tmp = tmp_path_factory.mktemp("cases")
    cases = [(name, script, [*COMMON, *TRAIN, *args] if script == "train" else args)
             for name, (script, args, _) in CASES.items()]
    return run_cases(work, cases, files=tmp)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_with_one_line_and_leaves_nothing(outcomes, case):
    _, _, expected = CASES[case]
    if case == "fp16 without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, where fp16 training is valid")
    out = outcomes[case]
    errors = [line for line in out["stderr"].splitlines() if line.startswith("error:")]
    assert out["code"] == 2, (out["code"], out["stderr"][-2000:])
    assert len(errors) == 1 and expected in errors[0], out["stderr"][-2000:]
    assert "Traceback" not in out["stderr"]
    assert out["new"] == [] and out["gone"] == []
    assert not out["pwned"]


def test_debug_shows_the_traceback(work):
    proc = run_script(work, "train.py", *COMMON, "--ctx_len", "0", "--debug", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(work):
    args = [*COMMON, "--peft", "lora", "--micro_bsz", "2", "--proj_dir", "sigint"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--max_steps", "400"], cwd=work,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = work / "sigint" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved a checkpoint at step" in out
    step = len(losses(work / "sigint"))
    assert (work / "sigint/checkpoints/latest").read_text() == f"step-{step:08d}"
    # a different --max_steps changes the schedule but not the state: the run continues from `step`
    resumed = run_script(work, "train.py", *args, "--max_steps", str(step + 2), "--resume")
    assert f"resumed from sigint/checkpoints/step-{step:08d} at step {step}" in resumed.stdout
    assert len(losses(work / "sigint")) == step + 2


def poisoned_samples(work, data_file, ctx_len, seed, token, count):
    """Which of the first `count` samples hold `token` (as train.py will draw them, micro_bsz 1)."""
    from rwkv_peft.data.datasets import load_training_data
    from rwkv_peft.data.tokenizer import load_tokenizer

    data = load_training_data(str(work / data_file), load_tokenizer(str(work / "tok.json")), ctx_len, mode="pad",
                              seed=seed, progress=False)
    return [i for i in range(count) if token in data.sample(i)["input_ids"].tolist()]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(work):
    from tiny_workspace import VOCAB

    base = torch.load(work / "base.pth", weights_only=True)
    # finite (loading refuses NaN and Inf), but samples holding 'fell' overflow to a NaN loss
    width = base["emb.weight"].shape[1]
    base["emb.weight"][VOCAB["fell"]] = 1e30 * torch.where(torch.arange(width) % 2 == 0, 1.0, -1.0)
    torch.save(base, work / "nan-base.pth")
    docs = ["the cat sat on a mat"] * 30 + ["rain fell softly"] * 2 + ["the cat"] * 30
    (work / "nan.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    for seed in range(100):  # a seed whose first poisoned sample comes after a few good steps
        bad = poisoned_samples(work, "nan.jsonl", 4, seed, VOCAB["fell"], 40)
        if bad and 3 <= bad[0] < 30:
            break
    assert bad and 3 <= bad[0] < 30, "no seed in 0..99 has its first poisoned sample at index 3..29 (of the first 40)"
    args = [*COMMON, "--load_model", "nan-base.pth", "--data_file", "nan.jsonl", "--ctx_len", "4", "--max_steps",
            "40", "--save_every", "1", "--data_mode", "pad", "--random_seed", str(seed)]

    proc = run_script(work, "train.py", *args, "--proj_dir", "nan-stop", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: loss became nan at step {bad[0] + 1} " in proc.stderr
    assert (work / "nan-stop/checkpoints/latest").read_text() == f"step-{bad[0]:08d}"
    assert (work / f"nan-stop/checkpoints/step-{bad[0]:08d}/trainer.json").exists()
    assert len(losses(work / "nan-stop")) == bad[0]

    run_script(work, "train.py", *args, "--proj_dir", "nan-skip", "--skip_nonfinite", str(len(bad)))
    summary = json.loads((work / "nan-skip/summary.json").read_text())
    assert summary["steps"] == 40 and summary["skipped_micro_batches"] == len(bad)
    assert all(np.isfinite(losses(work / "nan-skip")))


def test_tampered_deepspeed_checkpoint_is_not_executed(work):
    run_script(work, "train.py", *COMMON, "--max_steps", "4", "--stop_at_step", "2", "--proj_dir", "tamper")
    ckpt = work / "tamper/checkpoints/step-00000002"
    optim = next(ckpt.glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload(work / "PWNED")}, optim)
    proc = run_script(work, "train.py", *COMMON, "--max_steps", "4", "--proj_dir", "tamper", "--resume", check=False)
    assert proc.returncode == 2 and "could not be loaded safely" in proc.stderr, proc.stderr[-2000:]
    assert not (work / "PWNED").exists()
