"""--chunk_ctx with --objective dpo / simpo / orpo: the sequences run as pieces with the state
carried give the loss, the figures and the parameter gradients of whole-sequence passes
(rwkv_peft/train/objectives.py's docstring). The reference is the objective's own unchunked
path (one model call per sequence batch), which tests/test_preference.py checks against TRL.
"""

from types import SimpleNamespace

import pytest
import torch

from rwkv_peft.model.time_state import add_time_state
from rwkv_peft.train.objective_base import Reference
from rwkv_peft.train.objectives import DPO, ORPO, SimPO
from test_long_context import make_model

pytestmark = pytest.mark.usefixtures("one_thread")

T = 30  # pieces of 8 leave a last partial piece of 6


class Engine:
    """What the objectives call: the model, as a DeepSpeed engine exposes it."""

    def __init__(self, model):
        self.module = model

    def __call__(self, *args):
        return self.module(*args)


def pairs(V=97):
    """Two pairs (rows: chosen 0, 1, rejected 0, 1) whose replies cross the piece boundaries
    at 8, 16 and 24, and end in padding (target 0, mask 0) where they are shorter."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, V, (4, T), generator=g)
    targets = torch.randint(0, V, (4, T), generator=g)
    mask = torch.zeros(4, T)
    for row, (start, end) in enumerate([(5, 30), (12, 20), (6, 26), (12, 29)]):
        mask[row, start:end] = 1
        targets[row, end:] = 0
    return {"input_ids": tokens, "targets": targets, "loss_mask": mask}


def tiny_model(case):
    """float64 RWKV-7 with LoRA (the reference: adapters off), with LoRA and a trained initial
    state (the reference's state: the one before training), or RWKV-6 fully trained with a state
    (the reference: a frozen copy); the trained state moves off the reference's once taken."""
    model = make_model(6 if case == "full" else 7, "none" if case == "full" else "lora", dtype=torch.float64)
    parts = {}
    if case == "lora+state":
        parts = add_time_state(model)
        for p in parts.values():
            p.requires_grad_(True)
    run = SimpleNamespace(model=model, full=case == "full", parts=parts, args=SimpleNamespace(init_adapter=None))
    reference = Reference(run)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith("att.time_state"):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model, reference


def objective(name, reference, chunk_ctx):
    if name == "dpo":
        return DPO(0.5, reference, chunk_ctx=chunk_ctx)
    if name == "simpo":
        return SimPO(2.0, 0.5, chunk_ctx=chunk_ctx)
    return ORPO(0.3, chunk_ctx=chunk_ctx)


def loss_figures_grads(obj, model):
    """One micro batch's loss, figures and parameter gradients, and the widest model call."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    widths = []
    hook = model.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    loss = obj.micro_batch_loss(Engine(model), pairs())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    hook.remove()
    return loss.detach(), obj.step_metrics(), {n: g for n, g in zip(params, grads) if g is not None}, max(widths)


@pytest.mark.parametrize("name, case", [("dpo", "lora"), ("dpo", "lora+state"), ("dpo", "full"),
                                        ("simpo", "lora"), ("orpo", "lora")])
def test_pieces_of_8_equal_the_whole_sequences(name, case):
    model, reference = tiny_model(case)
    ref_loss, ref_figures, ref_grads, width = loss_figures_grads(objective(name, reference, 0), model)
    loss, figures, grads, piece_width = loss_figures_grads(objective(name, reference, 8), model)
    assert (width, piece_width) == (T, 8)
    # the log-probabilities are summed in fp32 (sequence_logps), piece by piece here: a row sum
    # near -100 is exact to about 1e-5, and the figures are rounded to 6 decimals (step_metrics)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert figures.keys() == ref_figures.keys()
    for key, value in ref_figures.items():
        assert figures[key] == pytest.approx(value, rel=1e-5, abs=2e-5), key
    assert grads.keys() == ref_grads.keys() and len(grads) > 4
    if case == "lora+state":
        assert "blocks.0.att.time_state" in grads
    for n, g in ref_grads.items():
        assert g.abs().max() > 0, n  # a vanishing gradient would compare equal to anything
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=n)


def test_a_detached_boundary_would_be_caught():
    """The comparison above can fail: cutting the gradient at the boundaries changes it."""
    model, reference = tiny_model("lora")
    _, _, exact, _ = loss_figures_grads(objective("simpo", reference, 8), model)
    obj = SimPO(2.0, 0.5, chunk_ctx=8, chunk_detach=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(obj.micro_batch_loss(Engine(model), pairs()), list(params.values()), allow_unused=True)
    differs = [((g - exact[n]).norm() / exact[n].norm()).item() for n, g in zip(params, grads) if g is not None]
    assert max(differs) > 1e-3, differs
