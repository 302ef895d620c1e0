"""train.py --objective grpo: the objective's loss and gradient against a float64 recomputation of
TRL's formula on fixed completions, the built-in rewards, one error line for bad input through the
real train.py, and a real run on the embedded demo that trains, logs and resumes exactly."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from rwkv_peft.assets import DEMO_BASE, DEMO_PROMPTS
from rwkv_peft.data.prompts import load_prompt_data
from rwkv_peft.data.tokenizer import tokenizer_for
from rwkv_peft.model.load import load_model
from rwkv_peft.peft.adapter_file import read_adapter
from rwkv_peft.train.args import parse_args
from rwkv_peft.train.grpo_objective import GRPO
from rwkv_peft.train.rewards import contains, exact, load_reward
from test_grpo import reference_loss
from tiny_workspace import losses, run_cases

pytest.importorskip("deepspeed")

REWARDS = '''
import math
CALLS = []
def boom(prompts, completions, **fields):
    raise ValueError("no score today")
def short(prompts, completions, **fields):
    return [1.0]
def nan(prompts, completions, **fields):
    return [math.nan] * len(completions)
def length(prompts, completions, **fields):  # varies within every group: the adapter must move
    return [len(c) / 10 for c in completions]
'''
DEMO = ["--load_model", str(DEMO_BASE), "--precision", "fp32", "--ctx_len", "64", "--num_generations", "4",
        "--max_completion_length", "12", "--lr_init", "1e-3", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    (d / "my_rewards.py").write_text(REWARDS)
    (d / "noprompt.jsonl").write_text(json.dumps({"question": "Capital of Varnholm?", "answer": "Lumen Bay"}) + "\n")
    return d


def test_builtin_rewards():
    answers = {"answer": ["Lumen Bay", "the snow hare", "1642"]}
    completions = ["  lumen   BAY. ", "The national animal of Varnholm is the snow hare.", "16420"]
    assert exact(None, completions, **answers) == [1.0, 0.0, 0.0]
    assert contains(None, completions, **answers) == [1.0, 1.0, 0.0]  # whole words: 16420 does not hold 1642
    assert load_reward("regex", r"\d{4}$")(None, completions) == [0.0, 0.0, 1.0]


class Engine:
    """What the objective uses of DeepSpeed's engine."""

    def __init__(self, module):
        self.module = module

    def __call__(self, inputs):
        return self.module(inputs)


@pytest.mark.slow
def test_objective_loss_and_gradient_equal_trls_formula_in_float64():
    """GRPO.micro_batch_loss on fixed completions and rewards against each completion's own float64
    forward and tests/test_grpo.py's element-by-element formula, with the KL term to a reference."""
    torch.manual_seed(0)
    model = load_model(DEMO_BASE, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(True)
    tokenizer = tokenizer_for(model.config.vocab_size, "auto")
    group, length, beta = 3, 6, 0.05
    args = parse_args(["--objective", "grpo", "--reward", "contains", "--num_generations", str(group),
                       "--max_completion_length", str(length), "--beta", str(beta), "--epsilon", "0.2"])
    run = SimpleNamespace(args=args, model=model, tokenizer=tokenizer, full=True, parts={},
                          ds_config={"zero_optimization": {"stage": 2}})
    objective = GRPO(run)  # --peft full: the reference is a frozen copy of the model as it is now
    with torch.no_grad():  # the policy moves away from its reference: a KL term with a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    data = load_prompt_data(str(DEMO_PROMPTS), tokenizer, 64, length)
    batch = data.batch([3, 17])
    end = objective.stop
    completions = torch.randint(300, 900, (2 * group, length))
    lengths = torch.tensor([6, 2, 4, 1, 5, 3])
    for n, m in enumerate(lengths.tolist()):  # each ends with the end-of-turn token, then filler
        completions[n, m - 1:] = end
    seen = {}

    def reward(prompts, completions, **fields):
        seen.update(prompts=prompts, completions=completions, fields=fields)
        return [1.0, 0.0, 0.5, 0.2, 0.2, 0.9]

    objective.reward = reward
    objective.sample = lambda model, batch: (completions, lengths)
    loss = objective.micro_batch_loss(Engine(model), batch)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    records = batch["records"]
    assert seen["prompts"] == [r["prompt"] for r in records for _ in range(group)]
    assert seen["fields"]["answer"] == [r["answer"] for r in records for _ in range(group)]
    assert seen["completions"] == [tokenizer.decode(c[:m - 1].tolist()).strip()
                                   for c, m in zip(completions, lengths.tolist())]
    logps = torch.zeros(2 * group, length, dtype=torch.float64)
    ref = torch.zeros(2 * group, length, dtype=torch.float64)
    mask = torch.zeros(2 * group, length, dtype=torch.float64)
    rows = []
    for n in range(2 * group):  # each completion on its own: prompt + completion, no padding
        prompt, m = batch["prompt_ids"][n // group], int(lengths[n])
        ids = torch.tensor([prompt + completions[n, :m].tolist()])
        lp = torch.log_softmax(model(ids)[0, len(prompt) - 1:-1], -1)
        with torch.no_grad():
            rp = torch.log_softmax(objective.reference.copy(ids)[0, len(prompt) - 1:-1], -1)
        rows.append(lp.gather(-1, ids[0, len(prompt):, None])[:, 0])
        ref[n, :m] = rp.gather(-1, ids[0, len(prompt):, None])[:, 0]
        mask[n, :m] = 1
    logps = torch.stack([torch.cat([r, r.new_zeros(length - len(r))]) for r in rows])
    expected = reference_loss(logps, logps.detach(), ref, mask, torch.tensor(reward(0, 0)), group, beta, 0.2, 0.2,
                              "grpo", length)
    expected.backward()
    # the objective's log-probs are fp32 (loss.VocabCrossEntropy, as SFT's): agreement to fp32's precision
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    figures = objective.step_metrics()
    assert figures["reward"] == pytest.approx(sum(reward(0, 0)) / 6)
    assert figures["completions/mean_length"] == pytest.approx(3.5)
    assert figures["kl"] > 0 and figures["clip_ratio"] == 0


BAD = {  # name: (extra train.py args, the error line holds)
    "no reward": ([], "--objective grpo needs --reward"),
    "reward raises": (["--reward", "my_rewards.py:boom"], "--reward my_rewards.py:boom raised ValueError: no score"),
    "wrong length": (["--reward", "my_rewards.py:short"], "returned 1 values for 4 completions"),
    "nan": (["--reward", "my_rewards.py:nan"], "--reward my_rewards.py:nan returned non-finite rewards ([nan"),
    "no prompt": (["--reward", "exact", "--data_file", "noprompt.jsonl"], "noprompt.jsonl line 1: a GRPO prompt "
                  "record needs 'prompt'"),
    "missing module": (["--reward", "no_such_rewards:fn"], "no module named 'no_such_rewards'"),
    "regex without pattern": (["--reward", "regex"], "--reward regex needs --reward_regex"),
}


RUN = ["--objective", "grpo", *DEMO, "--data_file", str(DEMO_PROMPTS), "--reward", "my_rewards:length",
       "--beta", "0.04", "--micro_bsz", "2", "--peft", "lora", "--max_steps", "4"]
RUNS = {"straight": [*RUN, "--proj_dir", "straight"], "first half": [*RUN, "--proj_dir", "halves", "--stop_at_step", "2"],
        "resumed": [*RUN, "--proj_dir", "halves", "--resume"]}


@pytest.fixture(scope="module")
def outcomes(work):
    """Every BAD case, then RUNS in order, through train.py's main in one process (tests/script_cases.py:
    one interpreter start for all)."""
    cases = [(name, "train", ["--objective", "grpo", *DEMO, "--max_steps", "1", *(
        [] if "--data_file" in args else ["--data_file", str(DEMO_PROMPTS)]), *args, "--proj_dir", f"bad-{n}"])
             for n, (name, (args, _)) in enumerate(BAD.items())]
    cases += [(name, "train", args) for name, args in RUNS.items()]
    return run_cases(work, cases)


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_one_error_line(outcomes, case):
    out = outcomes[case]
    # (a reward function fails during the first step: the progress bar has started above the line)
    errors = [line for line in out["stderr"].splitlines() if line.strip() and "step/s" not in line]
    assert out["code"] == 2, (out["code"], out["stderr"][-2000:])
    assert len(errors) == 1 and errors[0].startswith("error:") and BAD[case][1] in errors[0], out["stderr"][-2000:]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_demo_run_trains_logs_and_resumes_exactly(work, outcomes):
    """A user's reward module, the KL term (the reference: adapters off), two prompts a micro batch;
    the same run stopped at step 2 and resumed ends in the same losses, figures and adapter."""
    for name in RUNS:
        assert outcomes[name]["code"] in (0, None), outcomes[name]["stderr"][-3000:]
    assert "resumed from" in outcomes["resumed"]["stdout"]
    first = records(work / "straight")[0]
    for key in ("reward", "reward_std", "completions/mean_length", "kl", "clip_ratio"):
        assert math.isfinite(first[key]), key
    assert first["kl"] == 0 and records(work / "straight")[-1]["kl"] > 0  # the policy left its reference
    assert losses(work / "halves") == losses(work / "straight")
    for key in ("reward", "reward_std", "completions/mean_length", "kl"):
        assert [r[key] for r in records(work / "halves")] == [r[key] for r in records(work / "straight")], key
    a, b = read_adapter(work / "straight/adapter.safetensors"), read_adapter(work / "halves/adapter.safetensors")
    moved = False
    for module, tensors in a.tensors.items():
        for name, t in tensors.items():
            assert torch.equal(b.tensors[module][name], t), (module, name)
            moved |= name.endswith("lora_B") and bool(t.abs().sum() > 0)  # LoRA's B starts at zero
    assert moved
