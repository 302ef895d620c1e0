"""Long-context training (--chunk_ctx) with the CUDA WKV kernels: their state input and state
gradient carry the gradient between pieces. Compared with the PyTorch op on the whole
sequence, and train.py --op cuda --chunk_ctx with train.py --op torch.

Skipped without a CUDA device (and, like tests/test_wkv_cuda.py, without nvcc or ninja).
"""

from __future__ import annotations

import json

import pytest
import torch

from test_wkv_cuda import _wkv_op as wkv_op
from test_wkv_cuda import kernels  # noqa: F401 - the module's autouse fixture: build the kernels or skip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"


def loss_and_grads(version, op, chunk_ctx):
    from official_layout import rwkv6_state_dict, rwkv7_state_dict

    from rwkv_peft import load_model
    from rwkv_peft.peft.adapt import plan_adapters, prepare_peft
    from rwkv_peft.train.long_context import chunked_loss
    from rwkv_peft.loss import masked_loss

    make = rwkv7_state_dict if version == 7 else rwkv6_state_dict
    model = load_model(make(n_layer=3, n_embd=128, head_size=64, vocab=97, seed=11), device=DEV).train()
    torch.manual_seed(0)
    prepare_peft(model, plan_adapters(model, [], ("lora", {"r": 8})), ("ln",))
    with torch.no_grad():  # LoRA's B starts at zero, which would zero A's gradient
        g = torch.Generator(device=DEV).manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g, device=DEV))
    g = torch.Generator().manual_seed(2)
    tokens, targets = (torch.randint(0, 97, (2, 300), generator=g).to(DEV) for _ in range(2))
    mask = torch.zeros(2, 300, device=DEV)
    mask[0, 40:250] = mask[1, 90:300] = 1  # spans across the piece boundaries
    with wkv_op(op):
        if chunk_ctx:
            loss = chunked_loss(model, tokens, targets, mask, chunk_ctx)
        else:
            loss = masked_loss(model(tokens), targets, mask)
        loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("version", [7, 6])
def test_cuda_pieces_equal_the_torch_whole_sequence(version):
    loss, grads = loss_and_grads(version, "cuda", 100)
    ref_loss, ref_grads = loss_and_grads(version, "torch", 0)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert ((grads[name] - g).norm() / g.norm()).item() < 1e-4, name


def test_train_py_cuda_chunked_matches_torch(tmp_path):
    from tiny_workspace import COMMON, losses, make_workspace, run_script

    work = make_workspace(tmp_path)
    args = [*COMMON, "--peft", "bone", "--max_steps", "3", "--micro_bsz", "2", "--ctx_len", "512"]
    run_script(work, "train.py", *args, "--op", "torch", "--proj_dir", "torch")
    run_script(work, "train.py", *args, "--op", "cuda", "--chunk_ctx", "128", "--proj_dir", "cuda")
    torch.testing.assert_close(torch.tensor(losses(work / "cuda")), torch.tensor(losses(work / "torch")),
                               rtol=1e-4, atol=1e-5)
    assert json.loads((work / "cuda" / "summary.json").read_text())["steps"] == 3
