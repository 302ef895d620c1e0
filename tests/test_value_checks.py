"""Numbers nobody checked reached PyTorch or DeepSpeed (issue 25, class 6): every numeric flag
is finite and in its declared range, an activation size the machine cannot hold is refused, and
a --deepspeed_config goes through DeepSpeed's own validation. Each: exit code 2, one `error:`
line naming the flag or the file and key, no traceback, nothing written."""

import json
from dataclasses import fields

import pytest

from tiny_workspace import COMMON, make_workspace, run_cases

pytest.importorskip("deepspeed")

CASES = {
    "lr nan": ("train", ["--lr_init", "nan"], "--lr_init must be a finite number, got nan"),
    "epochs inf": ("train", ["--max_steps", "0", "--epochs", "inf"], "--epochs must be a finite number, got inf"),
    "beta1 2": ("train", ["--beta1", "2"], "--beta1 must be in [0, 1), got 2.0"),
    "beta2 1": ("train", ["--beta2", "1"], "--beta2 must be in [0, 1), got 1.0"),
    "adam_eps -1": ("train", ["--adam_eps", "-1"], "--adam_eps must be positive, got -1.0"),
    "weight_decay nan": ("train", ["--weight_decay", "nan"], "--weight_decay must be a finite number"),
    "grad_clip inf": ("train", ["--grad_clip", "inf"], "--grad_clip must be a finite number"),
    "lora_dropout 1.5": ("train", ["--peft", "lora", "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    "lora_alpha nan": ("train", ["--peft", "lora", "--lora_alpha", "nan"], "--lora_alpha must be a finite number"),
    "svd_niter -1": ("train", ["--peft", "pissa", "--svd_niter", "-1"], "--svd_niter must not be negative"),
    "seed too large": ("train", ["--random_seed", str(2**70)], "--random_seed is too large"),
    "ctx_len beyond memory": ("train", ["--ctx_len", str(10**10)],
                              "--ctx_len 10000000000 x --micro_bsz 1 needs at least"),
    "micro_bsz beyond memory": ("train", ["--micro_bsz", str(10**9)], "x --micro_bsz 1000000000 needs at least"),
    "max_memory unitless text": ("train", ["--max_memory", "lots"], "--max_memory takes a size from 64M to 1024T "
                                                                  "such as 2.5G or 800M, got 'lots'"),
    "max_memory too small": ("train", ["--max_memory", "10M"], "--max_memory takes a size from 64M"),
    "ZeRO stage 7": ("train", ["--deepspeed_config", "stage7.json"],
                     "--deepspeed_config stage7.json: zero_optimization.stage: Input should be 0, 1, 2, 3"),
    "offload to a gpu": ("train", ["--deepspeed_config", "offload.json"],
                         "offload.json: zero_optimization.offload_optimizer.device: Input should be"),
    "micro batch as text": ("train", ["--deepspeed_config", "batch.json"],
                            "batch.json: train_micro_batch_size_per_gpu must be a positive integer, got '2'"),
    "bf16 and fp16": ("train", ["--deepspeed_config", "both.json"],
                      "both.json: DeepSpeed refuses it: bfloat16 and fp16 modes cannot be simultaneously enabled"),
    "eval ctx_len 0": ("rwkv_peft/eval", ["--model", "base.pth", "--tokenizer", "tok.json", "--data", "chat.jsonl",
                                          "--ctx_len", "0"], "--ctx_len must be positive, got 0"),
    "chat temperature nan": ("demo/chat", ["--model", "base.pth", "--tokenizer", "tok.json", "--prompt", "hi",
                                           "--temperature", "nan"], "--temperature must be a finite number"),
    "run tokens 0": ("rwkv_peft/run", ["--model", "base.pth", "--tokenizer", "tok.json", "--tokens", "0"],
                     "--tokens must be positive, got 0"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    work = make_workspace(tmp_path_factory.mktemp("values"))
    for name, config in {"stage7": {"zero_optimization": {"stage": 7}},
                         "offload": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
                         "batch": {"train_micro_batch_size_per_gpu": "2"},
                         "both": {"bf16": {"enabled": True}, "fp16": {"enabled": True}}}.items():
        (work / f"{name}.json").write_text(json.dumps(config))
    cases = [(name, script, [*COMMON, "--max_steps", "2", *args] if script == "train" else args)
             for name, (script, args, _) in CASES.items()]
    return run_cases(work, cases)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_value_out_of_range_is_one_line_and_leaves_nothing(outcomes, case):
    out = outcomes[case]
    errors = [line for line in out["stderr"].splitlines() if line.startswith("error:")]
    assert out["code"] == 2, (out["code"], out["stderr"][-2000:])
    assert len(errors) == 1 and CASES[case][2] in errors[0], out["stderr"][-2000:]
    assert "Traceback" not in out["stderr"]
    assert out["new"] == [] and out["gone"] == []


def test_every_numeric_flag_declares_its_range():
    from rwkv_peft.peft.methods import method_flags
    from rwkv_peft.train.args import TrainArgs

    own_checks = {"chunk_ctx", "grad_cp"}  # a range that depends on --ctx_len; choices (0, 1)
    for f in fields(TrainArgs):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind.removesuffix(" | None") in ("int", "float") and f.name not in own_checks:
            assert f.metadata["check"] is not None, f.name
    assert all(flag.check is not None for flag in method_flags())
