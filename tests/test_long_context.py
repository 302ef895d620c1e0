"""Long-context training (--chunk_ctx): a sample run in pieces with the state carried gives
the loss and gradients of one whole-sequence pass (rwkv_peft/train/long_context.py).

The references are built here from the model's plain forward: the whole sequence in one
call, or (for --chunk_detach) the pieces fed by hand with the state detached between them
and their logits concatenated; both go through masked_loss, never through the code under test.
"""

import json

import pytest
import torch

from official_layout import rwkv6_state_dict, rwkv7_state_dict
from rwkv_peft import load_model
from rwkv_peft.model.common import RWKVState
from rwkv_peft.peft.adapt import plan_adapters, prepare_peft
from rwkv_peft.train.long_context import chunked_loss
from rwkv_peft.loss import masked_loss
from tiny_workspace import COMMON, losses, make_workspace, run_script

pytestmark = pytest.mark.usefixtures("one_thread")

T = 200  # pieces of 64 leave a last partial piece of 8
METHODS = {"lora": ("lora", {"r": 8}), "pissa": ("pissa", {"r": 8}), "bone": ("bone", {"r": 16}),
           "bat": ("bat", {"r": 16}), "none": None}


def make_model(version, method, dtype=torch.float32, train_parts=()):
    """A tiny random official-layout model with `method` on the default targets; --peft none
    trains everything (RWKV-6 then carries a time_state, trained from the initial state)."""
    if version == 7:
        sd = rwkv7_state_dict(n_layer=2, seed=1)
    else:
        sd = rwkv6_state_dict(n_layer=2, seed=1, time_state=method == "none")
    model = load_model(sd, dtype=dtype).train()
    if METHODS[method] is None:
        model.requires_grad_(True)
    else:
        torch.manual_seed(0)
        prepare_peft(model, plan_adapters(model, [], METHODS[method]), train_parts)
    with torch.no_grad():  # move adapters off their zero start so that every gradient is informative
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return model


def batch(B=2, V=97):
    """Tokens, targets and a loss mask whose trained spans cross the piece boundaries at 64,
    128 and 192; row 1 ends in padding (target 0, mask 0), as padded chat samples do."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T)
    mask[0, 50:80] = mask[0, 120:200] = 1
    mask[1, 0:10] = mask[1, 60:140] = 1
    targets[1, 170:] = 0
    return tokens, targets, mask


def loss_and_grads(model, loss_fn, extra=()):
    params = [p for p in model.parameters() if p.requires_grad] + list(extra)
    for p in params:
        p.grad = None
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # block 0's unused v0, v1, v2 get none
    names = [n for n, p in model.named_parameters() if p.requires_grad] + [f"state{i}" for i in range(len(extra))]
    return loss.detach(), {n: g for n, g in zip(names, grads) if g is not None}


def assert_same(got, ref, rtol):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name  # a vanishing gradient would compare equal to anything
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=rtol * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("version", [7, 6])
def test_pieces_of_64_equal_the_whole_sequence(version, method):
    parts = ("ln", "time") if method == "bone" else ()
    model = make_model(version, method, train_parts=parts)
    tokens, targets, mask = batch()
    ref = loss_and_grads(model, lambda: masked_loss(model(tokens), targets, mask))
    got = loss_and_grads(model, lambda: chunked_loss(model, tokens, targets, mask, 64))
    assert_same(got, ref, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("version", [7, 6])
def test_pieces_of_one_token_equal_the_whole_sequence_in_float64(version):
    model = make_model(version, "bone", dtype=torch.float64, train_parts=("ln",))
    tokens, targets, mask = (t[:1] for t in batch())
    ref = loss_and_grads(model, lambda: masked_loss(model(tokens), targets, mask))
    got = loss_and_grads(model, lambda: chunked_loss(model, tokens, targets, mask, 1))
    # the cross entropy is taken in fp32 (masked_ce_sum), the model in float64
    assert_same(got, ref, rtol=1e-6)


@pytest.mark.parametrize("version", [7, 6])
def test_a_trained_initial_state_gets_the_whole_sequence_gradient(version):
    """State tuning: the state before the first token requires grad."""
    model = make_model(version, "lora")
    tokens, targets, mask = batch()
    g = torch.Generator().manual_seed(3)
    zero = model.zero_state(2)
    init = [(torch.randn(t.shape, generator=g) * 0.3).requires_grad_() for t in (zero.att_shift, zero.wkv, zero.ffn_shift)]
    ref = loss_and_grads(model, lambda: masked_loss(model(tokens, RWKVState(*init))[0], targets, mask), init)
    got = loss_and_grads(model, lambda: chunked_loss(model, tokens, targets, mask, 64, state=RWKVState(*init)), init)
    assert_same(got, ref, rtol=1e-5)


@pytest.mark.parametrize("version", [7, 6])
def test_chunk_detach_is_truncated_backpropagation(version):
    model = make_model(version, "bone")
    tokens, targets, mask = batch()

    def by_hand():  # each piece from the previous piece's final state, detached
        state, logits = model.zero_state(2), []
        for start in range(0, T, 64):
            piece_logits, state = model(tokens[:, start:start + 64], state.detach())
            logits.append(piece_logits)
        return masked_loss(torch.cat(logits, 1), targets, mask)

    ref = loss_and_grads(model, by_hand)
    got = loss_and_grads(model, lambda: chunked_loss(model, tokens, targets, mask, 64, detach=True))
    assert_same(got, ref, rtol=1e-5)
    # and it is not the exact gradient: the exact test above would catch a detached boundary
    exact = loss_and_grads(model, lambda: chunked_loss(model, tokens, targets, mask, 64))
    torch.testing.assert_close(got[0], exact[0], rtol=1e-5, atol=0)  # the forward pass is the same
    differs = [((got[1][n] - g).norm() / g.norm()).item() for n, g in exact[1].items()]
    assert max(differs) > 1e-2, differs


@pytest.mark.slow
def test_train_py_chunked_matches_unchunked_and_resumes_exactly(tmp_path):
    """train.py --ctx_len 1024 --chunk_ctx 128 (with --grad_cp and ZeRO-3), stopped after two
    steps and resumed, gives the loss sequence of the plain --ctx_len 1024 run; so does it
    under ZeRO-2, whose gradient hooks allow one gradient per parameter and step."""
    work = make_workspace(tmp_path)
    args = [*COMMON, "--peft", "bone", "--max_steps", "3", "--micro_bsz", "2", "--ctx_len", "1024"]
    chunked = [*args, "--chunk_ctx", "128", "--grad_cp", "1", "--strategy", "deepspeed_stage_3", "--proj_dir", "chunked"]
    run_script(work, "train.py", *args, "--proj_dir", "whole")
    assert "in pieces of 128 tokens" in run_script(work, "train.py", *chunked, "--stop_at_step", "2").stdout
    assert "resumed from" in run_script(work, "train.py", *chunked, "--resume").stdout
    run_script(work, "train.py", *args, "--chunk_ctx", "128", "--strategy", "deepspeed_stage_2", "--proj_dir", "zero2")
    whole = torch.tensor(losses(work / "whole"))
    assert len(whole) == 3
    for run in ("chunked", "zero2"):
        torch.testing.assert_close(torch.tensor(losses(work / run)), whole, rtol=1e-5, atol=1e-6, msg=run)


@pytest.mark.slow
def test_bad_chunk_options_give_one_error_line(tmp_path):
    cases = [["negative", "train", [*COMMON, "--chunk_ctx", "-1"]],
             ["too long", "train", [*COMMON, "--chunk_ctx", "64"]],
             ["detach alone", "train", [*COMMON, "--chunk_detach"]]]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run_script(tmp_path, "tests/script_cases.py", "cases.json", "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    expected = {"negative": "--chunk_ctx must be between 1 and --ctx_len (32), or 0 for off; got -1",
                "too long": "--chunk_ctx must be between 1 and --ctx_len (32), or 0 for off; got 64",
                "detach alone": "--chunk_detach needs --chunk_ctx N: it cuts the gradient between pieces of N tokens"}
    for name, text in expected.items():
        lines = results[name]["stderr"].strip().splitlines()
        assert results[name]["code"] == 2 and len(lines) == 1, results[name]
        assert lines[0] == f"error: {text}", lines[0]
        assert not results[name]["new"], results[name]["new"]
