"""State tuning: the learned initial WKV state (att.time_state) trained, stored, merged and applied.

Parity of state-tuned checkpoints with the official `rwkv` package is in test_model.py
(cases v7-time-state, v6-time-state: the package's own initial state set from the same
file); merged state files in the official runtime are in test_peft.py (bone-state, state-v6).
"""

import io

import pytest
import torch

from official_layout import rwkv6_state_dict, rwkv7_state_dict
from rwkv_peft import RWKVPeftError, load_model
from rwkv_peft.chat import main as chat_main
from rwkv_peft.model.time_state import save_state_file
from rwkv_peft.peft.adapter_file import read_adapter
from tiny_workspace import COMMON, make_workspace, run_script

T = 23


def make_base(version, **kw):
    return (rwkv7_state_dict if version == 7 else rwkv6_state_dict)(**kw)


def tokens_for(sd, length=T, seed=0):
    return torch.randint(0, sd["emb.weight"].shape[0], (1, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("version", [7, 6])
def test_state_gradient_matches_float64_token_by_token(version):
    """d loss / d time_state of a whole-sequence fp32 pass (chunked WKV) against a float64 pass fed
    token by token from zero_state (the plain recurrence): the state's gradient flows both ways."""
    sd = make_base(version, time_state=True, seed=7)
    tokens = tokens_for(sd, length=40)  # longer than one WKV chunk
    weights = torch.randn(1, 40, sd["emb.weight"].shape[0], generator=torch.Generator().manual_seed(1))

    def grads(dtype, whole):
        model = load_model(sd, dtype=dtype)
        if whole:
            logits = model(tokens)
        else:
            state, out = model.zero_state(1), []
            for t in range(tokens.shape[1]):
                step, state = model(tokens[:, t:t + 1], state)
                out.append(step)
            logits = torch.cat(out, dim=1)
        (logits * weights.to(dtype)).sum().backward()
        return torch.stack([b.att.time_state.grad for b in model.blocks])

    got, ref = grads(torch.float32, whole=True), grads(torch.float64, whole=False)
    assert ref.abs().max() > 0
    assert rel_err(got.double(), ref) <= 1e-4


@pytest.fixture(scope="module")
def state_run(tmp_path_factory):
    """A real state-tuning run (--peft none --train_parts state), merged and written as a state file."""
    work = make_workspace(tmp_path_factory.mktemp("state"))
    run_script(work, "train.py", *COMMON, "--peft", "none", "--train_parts", "state", "--state_lr", "1.0",
               "--max_steps", "4", "--proj_dir", "run")
    run_script(work, "merge.py", "--adapter", "run/adapter.safetensors", "--output", "merged.pth")
    proc = run_script(work, "merge.py", "--state_only", "--adapter", "run/adapter.safetensors",
                      "--base", "base.pth", "--output", "state.pth")
    assert "--state state.pth" in proc.stdout
    return work


@pytest.mark.slow
def test_state_only_training_trains_just_the_state(state_run):
    adapter = read_adapter(state_run / "run" / "adapter.safetensors")
    assert adapter.layers == {}
    assert sorted(adapter.parts) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    for t in adapter.parts.values():
        assert t.dtype == torch.float32 and t.shape == (4, 16, 16) and t.abs().max() > 0
    state_file = torch.load(state_run / "state.pth", weights_only=True)
    assert state_file.keys() == adapter.parts.keys()


@pytest.mark.slow
def test_merged_state_file_and_adapter_give_identical_logits(state_run):
    base = torch.load(state_run / "base.pth", weights_only=True)
    tokens = tokens_for(base)
    with torch.no_grad():
        plain = load_model(base, dtype=torch.float32)(tokens)
        unmerged = load_model(base, adapter=state_run / "run" / "adapter.safetensors", dtype=torch.float32)(tokens)
        merged = load_model(state_run / "merged.pth", dtype=torch.float32)(tokens)
        applied = load_model(base, state=state_run / "state.pth", dtype=torch.float32)(tokens)
    assert rel_err(unmerged, plain) > 1e-3  # the trained state changes the model
    assert torch.equal(merged, unmerged)
    assert torch.equal(applied, unmerged)


@pytest.mark.slow
def test_chat_starts_and_resets_to_the_learned_state(state_run, capsys, monkeypatch):
    """chat --state on the base replies as the merged model does; /reset goes back to the state."""
    monkeypatch.chdir(state_run)
    common = ["--tokenizer", "tok.json", "--temperature", "0", "--max_tokens", "6", "--prompt", "red bird"]
    replies = {}
    for name, flags in {"merged": ["--model", "merged.pth"], "state": ["--model", "base.pth", "--state", "state.pth"],
                        "base": ["--model", "base.pth"]}.items():
        assert chat_main(flags + common) == 0
        replies[name] = capsys.readouterr().out
    assert replies["state"] == replies["merged"] != replies["base"]

    # interactively: the reply after /reset is the first reply again, from the learned state
    monkeypatch.setattr("sys.stdin", io.StringIO("red bird\n/reset\nred bird\n"))
    assert chat_main(["--model", "base.pth", "--state", "state.pth"] + common[:-2]) == 0
    turns = capsys.readouterr().out.split("Assistant:")
    first, after_reset = turns[1].split("\n")[0], turns[2].split("\n")[0]
    assert first.strip() == after_reset.strip() == replies["state"].strip()


@pytest.mark.parametrize("version", [7, 6])
def test_rwkv_peft_state_file_loads(version, tmp_path):
    """RWKV-PEFT's state-tuning .pth ('model.' prefix, bf16) applied to a base gives the logits of
    the state-tuned checkpoint holding the same tensors (test_model.py pins those to the official runtime)."""
    tuned = make_base(version, time_state=True, seed=3)
    base = {k: v for k, v in tuned.items() if not k.endswith("time_state")}
    states = {f"model.{k}": v.to(torch.bfloat16) for k, v in tuned.items() if k.endswith("time_state")}
    path = tmp_path / "rwkv-peft-state.pth"
    torch.save(states, path)
    tuned_bf16 = {k: v.to(torch.bfloat16).float() if k.endswith("time_state") else v for k, v in tuned.items()}
    tokens = tokens_for(base)
    with torch.no_grad():
        expected = load_model(tuned_bf16, dtype=torch.float32)(tokens)
        torch.testing.assert_close(load_model(base, state=path, dtype=torch.float32)(tokens), expected,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model(base, adapter=path, dtype=torch.float32)(tokens), expected,
                                   rtol=1e-5, atol=1e-5)


def _chat_error(capsys, *flags):
    assert chat_main(list(flags) + ["--prompt", "hi", "--max_tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_state_files_get_one_error_line(tmp_path, capsys):
    base7 = tmp_path / "base7.pth"
    torch.save(make_base(7), base7)
    states = {f"blocks.{i}.att.time_state": torch.randn(4, 16, 16) for i in range(3)}

    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save({**states, "blocks.1.att.time_state": torch.randn(4, 16, 8)}, wrong_shape)
    line = _chat_error(capsys, "--model", str(base7), "--state", str(wrong_shape))
    assert "'blocks.1.att.time_state' has shape [4, 16, 8]" in line and "needs [4, 16, 16]" in line

    other_version = tmp_path / "v6-state.safetensors"  # our state files record the version
    save_state_file(other_version, states, version=6)
    line = _chat_error(capsys, "--model", str(base7), "--state", str(other_version))
    assert "is a state for RWKV-6, but the base is RWKV-7" in line

    fewer_layers = tmp_path / "two-layers.pth"  # a state trained on another, smaller base
    torch.save({k: v for k, v in states.items() if not k.startswith("blocks.2")}, fewer_layers)
    line = _chat_error(capsys, "--model", str(base7), "--state", str(fewer_layers))
    assert "has no 'blocks.2.att.time_state'" in line

    not_a_state = tmp_path / "adapter.pth"
    torch.save({"blocks.0.att.key.bone": torch.randn(16, 64)}, not_a_state)  # an RWKV-PEFT Bone adapter
    line = _chat_error(capsys, "--model", str(base7), "--state", str(not_a_state))
    assert "is not a state file" in line

    with pytest.raises(RWKVPeftError, match="holds no learned state"):  # merge --state_only of a plain adapter
        from rwkv_peft.peft.merge import write_state_only

        write_state_only(str(not_a_state), str(tmp_path / "s.pth"))
    assert not (tmp_path / "s.pth").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", [7, 6])
def test_cuda_state_gradient_matches_cpu(version):
    """The kernels' s0 input and ds0 output carry the learned state and its gradient."""
    sd = make_base(version, time_state=True, seed=7)
    tokens = tokens_for(sd, length=40)

    def grads(device):
        model = load_model(sd, dtype=torch.float32, device=device)
        logits = model(tokens.to(device))
        (logits.float() ** 2).mean().backward()
        return logits.detach().cpu(), torch.stack([b.att.time_state.grad for b in model.blocks]).cpu()

    (cpu_logits, cpu_grad), (gpu_logits, gpu_grad) = grads("cpu"), grads("cuda")
    assert rel_err(gpu_logits, cpu_logits) <= 1e-4
    assert rel_err(gpu_grad, cpu_grad) <= 1e-3


@pytest.mark.slow
def test_state_only_next_step_names_the_recorded_base(state_run, tmp_path):
    """Without --base, merge --state_only's next step names the base the adapter records."""
    from rwkv_peft.peft.merge import write_state_only

    adapter = state_run / "run" / "adapter.safetensors"
    recorded = read_adapter(adapter).base["path"]
    assert recorded.endswith("base.pth")
    lines = []
    write_state_only(str(adapter), str(tmp_path / "s.pth"), log=lines.append)
    assert lines[-1] == f"next: python demo/chat.py --model {recorded} --state {tmp_path / 's.pth'}"
