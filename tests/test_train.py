"""train.py end to end on a tiny official-layout model: every method learns, ZeRO across
processes equals one process, resume is exact, gradient checkpointing keeps gradients."""

import json

import pytest
import torch

from official_layout import rwkv7_state_dict
from rwkv_peft import load_model
from rwkv_peft.peft.adapt import plan_adapters, prepare_peft
from rwkv_peft.peft.adapter_file import read_adapter
from rwkv_peft.peft.merge import merge_adapter
from rwkv_peft.train.engine import weights_only_load
from tiny_workspace import COMMON, ROOT, losses, make_workspace, run_script

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"))


def train(work, *args, nproc=1, check=True):
    return run_script(work, "train.py", *args, nproc=nproc, check=check)


ADAPTER_TENSORS = {"bone": {"bone"}, "bat": {"bat"}, "lora": {"lora_A", "lora_B"},
                   "pissa": {"lora_A", "lora_B", "init_A", "init_B"}}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bone", "bat", "lora", "pissa"])
def test_each_method_learns_and_writes_only_its_tensors(work, method):
    run = work / f"run-{method}"
    proc = train(work, *COMMON, "--peft", method, "--max_steps", "30", "--micro_bsz", "4",
                 "--train_parts", "ln", "--proj_dir", run.name)
    loss = losses(run)
    assert len(loss) == 30
    assert sum(loss[-3:]) / 3 < 0.5 * loss[0], loss
    assert "next: python merge.py" in proc.stdout and (run / "loss.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens_seen"] == 30 * 4 * 32 and summary["tokens_per_s"] > 0

    adapter = read_adapter(run / "adapter.safetensors")
    targets = {f"blocks.{i}.{t}" for i in (0, 1) for t in
               ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}
    assert set(adapter.layers) == targets
    assert all(set(ts) == ADAPTER_TENSORS[method] for ts in adapter.tensors.values())
    assert all(".ln" in k or k.startswith("ln_out") for k in adapter.parts) and adapter.parts

    # what the optimizer held: DeepSpeed saves exactly the trainable tensors
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    saved = weights_only_load(ckpt / "mp_rank_00_model_states.pt")["module"]
    trainable = {k for k in saved if k.split(".")[-1] in ADAPTER_TENSORS[method] or k in adapter.parts}
    assert set(saved) - trainable <= {k for k in saved if k.endswith(("init_A", "init_B"))}

    # merged, the run changed only the adapted layers and the trained norms
    base = torch.load(work / "base.pth", weights_only=True)
    merged = merge_adapter(base, adapter)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed <= {f"{t}.weight" for t in targets} | set(adapter.parts)
    assert {f"{t}.weight" for t in targets} <= changed


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_across_two_processes_equals_one_process(work, stage):
    args = [*COMMON, "--peft", "lora", "--max_steps", "6", "--strategy", f"deepspeed_stage_{stage}"]
    train(work, *args, "--micro_bsz", "2", "--proj_dir", f"z{stage}-one")
    train(work, *args, "--micro_bsz", "1", "--proj_dir", f"z{stage}-two", nproc=2)
    one, two = losses(work / f"z{stage}-one"), losses(work / f"z{stage}-two")
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    a, b = read_adapter(work / f"z{stage}-one/adapter.safetensors"), read_adapter(work / f"z{stage}-two/adapter.safetensors")
    for module in a.tensors:
        for name, t in a.tensors[module].items():
            torch.testing.assert_close(b.tensors[module][name], t, rtol=1e-2, atol=1e-4)


@pytest.mark.slow
def test_resume_continues_exactly(work):
    args = [*COMMON, "--peft", "lora", "--lora_dropout", "0.1", "--max_steps", "8", "--micro_bsz", "2",
            "--warmup_steps", "2"]
    train(work, *args, "--proj_dir", "straight")
    proc = train(work, *args, "--proj_dir", "halves", "--stop_at_step", "4")
    assert "stopped (--stop_at_step): saved a checkpoint at step 4" in proc.stdout
    assert (work / "halves/checkpoints/latest").read_text() == "step-00000004"
    assert not list((work / "halves/checkpoints").glob(".*.tmp"))
    proc = train(work, *args, "--proj_dir", "halves", "--resume")
    assert "resumed from" in proc.stdout
    assert losses(work / "halves") == losses(work / "straight")
    a = read_adapter(work / "straight/adapter.safetensors")
    b = read_adapter(work / "halves/adapter.safetensors")
    for module in a.tensors:
        for name, t in a.tensors[module].items():
            assert torch.equal(b.tensors[module][name], t), (module, name)
    # the summary describes the whole run, both segments; args.json names the real directory
    summary = json.loads((work / "halves/summary.json").read_text())
    first_half = json.loads((work / "halves/metrics.jsonl").read_text().splitlines()[3])["elapsed_s"]
    assert summary["segments"] == 2 and summary["tokens_seen"] == 8 * 2 * 32
    assert summary["time_s"] > first_half > 0
    assert summary["final_loss"] == pytest.approx(losses(work / "halves")[-1], abs=1e-6)
    assert json.loads((work / "halves/args.json").read_text())["proj_dir"] == "halves"

    # resuming a finished run says so and changes nothing
    before = {p: p.read_bytes() for p in (work / "halves").rglob("*") if p.is_file()}
    proc = train(work, *args, "--proj_dir", "halves", "--resume")
    assert "already complete (8 of 8 steps); nothing was changed" in proc.stdout
    assert {p: p.read_bytes() for p in (work / "halves").rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_resume_with_nothing_to_resume_fails_clearly(work):
    proc = train(work, *COMMON, "--proj_dir", "empty-run", "--resume", check=False)
    assert proc.returncode == 2
    assert "nothing to resume" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bf16_run_and_full_finetune(work):
    train(work, *COMMON, "--peft", "bone", "--precision", "bf16", "--max_steps", "4", "--proj_dir", "bf16")
    assert all(x == x and x < 10 for x in losses(work / "bf16"))
    assert (work / "bf16/adapter.safetensors").exists()
    proc = train(work, *COMMON, "--peft", "none", "--max_steps", "4", "--proj_dir", "full")
    assert "next: python -m rwkv_peft.run --model" in proc.stdout
    model = load_model(work / "full/model.pth")
    assert list(model.state_dict()) == list(torch.load(work / "base.pth", weights_only=True))


SCRATCH = ["--tokenizer", "tok.json", "--data_file", "text.jsonl", "--ctx_len", "32", "--n_layer", "2",
           "--n_embd", "64", "--head_size", "16", "--micro_bsz", "4", "--lr_init", "3e-3", "--warmup_steps", "0",
           "--precision", "fp32"]


@pytest.mark.slow
def test_training_from_scratch_trains_every_weight_by_default(work):
    proc = train(work, *SCRATCH, "--max_steps", "20", "--model_format", "safetensors", "--proj_dir", "scratch")
    assert "(100%): full training" in proc.stdout
    loss = losses(work / "scratch")
    assert loss[-1] < 0.7 * loss[0], loss
    model = load_model(work / "scratch/model.safetensors")
    assert model.config.vocab_size == 21 and model.config.n_layer == 2
    assert not (work / "scratch/adapter.safetensors").exists()


@pytest.mark.slow
def test_adapters_on_a_new_model_save_its_base_for_merge(work):
    train(work, *SCRATCH, "--peft", "bone", "--bone_r", "16", "--max_steps", "3", "--proj_dir", "scratch-bone")
    adapter = read_adapter(work / "scratch-bone/adapter.safetensors")
    assert adapter.base["path"] == str((work / "scratch-bone/base.pth").resolve())
    # merge.py finds the recorded base by itself, and the merged file holds base + delta
    proc = run_script(work, "merge.py", "--adapter", "scratch-bone/adapter.safetensors",
                      "--output", "scratch-bone/merged.safetensors")
    assert "verify: OK" in proc.stdout
    base = load_model(work / "scratch-bone/base.pth").state_dict()
    merged = load_model(work / "scratch-bone/merged.safetensors").state_dict()
    for key, W in merged.items():
        module = key.removesuffix(".weight")
        if module in adapter.layers:
            D = adapter.tensors[module]["bone"]
            torch.testing.assert_close(W, base[key] + D.T.repeat(1, W.shape[1] // D.shape[0]))
        else:
            assert torch.equal(W, base[key]), key


@pytest.mark.slow
def test_demo_base_on_your_own_data_picks_its_tokenizer(work):
    """No --tokenizer: the demo base (1024 words) gets the demo tokenizer, as in chat and eval."""
    proc = train(work, "--load_model", str(ROOT / "demo/base.pth"), "--data_file", "text.jsonl", "--ctx_len", "32",
                 "--max_steps", "2", "--proj_dir", "demo-base-own-data")
    assert len(losses(work / "demo-base-own-data")) == 2, proc.stderr[-2000:]


def test_help_shows_each_default_once(capsys):
    from rwkv_peft.eval import parse_args as eval_args
    from rwkv_peft.train.args import build_parser

    vocab = " ".join(build_parser().format_help().split("--vocab_size VOCAB_SIZE")[-1].split("--")[0].split())
    assert vocab.count("default") == 1, vocab
    with pytest.raises(SystemExit):
        eval_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "longest greedy reply for the task score (default: 64)" in text


@pytest.mark.slow
def test_short_runs_warm_up_briefly_and_say_how_to_train_more(work):
    args = [a for a in COMMON if a not in ("--warmup_steps", "0")]
    proc = train(work, *args, "--micro_bsz", "8", "--proj_dir", "short")  # one epoch of a few dozen samples
    lrs = [json.loads(line)["lr"] for line in (work / "short/metrics.jsonl").read_text().splitlines()]
    assert (f"make only {len(lrs)} optimizer steps; for more training pass --epochs N or --max_steps N"
            in proc.stdout)
    warmup = len(lrs) // 10  # a tenth of the run, not the default 10 steps that would eat it
    assert lrs[warmup] == 3e-2 and lrs[warmup:] == sorted(lrs[warmup:], reverse=True) and lrs[-1] < 1e-2


@pytest.mark.slow
def test_dry_run_shows_the_sft_loss_mask(work):
    proc = train(work, "--load_model", "base.pth", "--tokenizer", "tok.json", "--data_file", "chat.jsonl",
                 "--ctx_len", "32", "--dry_run")
    assert "⟦" in proc.stdout and "⟧" in proc.stdout and "fly over green hills" in proc.stdout
    assert not (work / "out").exists()


def test_gradient_checkpointing_keeps_adapter_gradients():
    """Non-reentrant checkpointing: same gradients as without it. The reentrant kind would
    return no gradient for the adapters, since a frozen block input does not require grad."""
    sd = rwkv7_state_dict(n_layer=3, seed=3)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for cp in (False, True):
        model = load_model(sd, dtype=torch.float64).train()
        torch.manual_seed(0)  # the same Kaiming init of A in both models
        prepare_peft(model, plan_adapters(model, [], ("lora", {"r": 4})))
        with torch.no_grad():  # LoRA's B starts at zero, which would zero A's gradient
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)
        model.grad_checkpointing = cp
        model(tokens).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 6 * 3
    for name, g in grads[0].items():
        assert grads[1][name] is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-10, atol=1e-12)

    # the failure mode this guards against, shown on the same model
    model = load_model(sd, dtype=torch.float64).train()
    prepare_peft(model, plan_adapters(model, [], ("lora", {"r": 4})))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = model.emb(tokens)
    assert not x.requires_grad
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        out, _, _ = torch.utils.checkpoint.checkpoint(model.blocks[0], x, None, None, use_reentrant=True)
    assert not out.requires_grad  # no graph: every adapter gradient in block 0 would be lost


def test_readme_documents_every_option():
    from rwkv_peft.train.args import markdown_table

    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "regenerate the README table: python -m rwkv_peft.train.args README.md"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "deepspeed_stage_2_offload", "offload_json"])
def test_zero3_and_offload_match_stage_1(work, strategy):
    args = [*COMMON, "--peft", "bone", "--max_steps", "4", "--micro_bsz", "2"]
    if not (work / "stage1/metrics.jsonl").exists():
        train(work, *args, "--proj_dir", "stage1")
    if strategy == "offload_json":  # offload asked for in the user's DeepSpeed JSON, not by --strategy
        (work / "offload.json").write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
        extra = ["--deepspeed_config", "offload.json"]
    else:
        extra = ["--strategy", strategy]
    train(work, *args, *extra, "--proj_dir", strategy)
    torch.testing.assert_close(torch.tensor(losses(work / strategy)), torch.tensor(losses(work / "stage1")),
                               rtol=1e-4, atol=1e-5)


def test_learning_rate_default_depends_on_the_data_not_on_the_value_given():
    from rwkv_peft.train.args import LR_INIT, TrainArgs
    from rwkv_peft.train.settings import DEMO_LR, resolve

    cases = [({}, DEMO_LR),                                    # the embedded demo
             ({"lr_init": LR_INIT}, LR_INIT),                 # asked for explicitly: kept, even on the demo
             ({"data_file": "mine.jsonl", "load_model": "m.pth"}, LR_INIT),
             ({"data_file": "mine.jsonl", "load_model": "m.pth", "lr_init": 3e-5}, 3e-5)]
    for given, expected in cases:
        args, _ = resolve(TrainArgs(**given, proj_dir="unused"), world=1)
        assert args.lr_init == expected, given
