"""The training loss against a float64 computation written out here (SPEC section 6)."""

import torch

from rwkv_peft.loss import masked_loss


def test_masked_loss_value_and_gradient_with_the_l2_nudge():
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 5, 11
    logits = (torch.randn(B, T, V, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.float32)

    loss = masked_loss(logits, targets, mask)
    loss.backward()

    x = logits.detach().double()
    p = torch.softmax(x, -1)
    nll = -torch.log(p.gather(-1, targets[..., None]))[..., 0]
    n = mask.sum().item()
    torch.testing.assert_close(loss.double(), (nll * mask).sum() / n)
    # d(mean CE)/dlogits = (softmax - onehot) / n on trained positions, plus 1e-4/(B*T) * max logit
    # at each position's argmax, trained or not (the official L2Wrap)
    expected = (p - torch.nn.functional.one_hot(targets, V)) * mask[..., None] / n
    top = x.argmax(-1, keepdim=True)
    expected.scatter_add_(-1, top, x.gather(-1, top) * 1e-4 / (B * T))
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_masked_loss_of_an_all_masked_batch_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = masked_loss(logits, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_sliced_loss_equals_the_whole_tensor_computation_bit_for_bit():
    """Several slices of positions (ROWS_PER_SLICE) and a partial last one, fp32 and bf16: the
    value and gradient are exactly those of F.cross_entropy and the L2 nudge on the whole tensor."""
    from rwkv_peft.loss import ROWS_PER_SLICE

    g = torch.Generator().manual_seed(1)
    B, T, V = 2, ROWS_PER_SLICE + 37, 300
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
        logits = x.clone().requires_grad_()
        masked_loss(logits, targets, mask).backward()

        whole = x.clone().requires_grad_()
        ce = torch.nn.functional.cross_entropy(whole.float().flatten(0, 1), targets.flatten(), reduction="none")
        expected = (ce * mask.flatten()).sum() / mask.sum()
        expected.backward()
        top, ids = torch.max(x, -1, keepdim=True)
        nudge = torch.zeros_like(x).scatter_(-1, ids, top * (1e-4 / (B * T)))
        assert torch.equal(masked_loss(x, targets, mask), expected.detach())
        assert torch.equal(logits.grad, whole.grad + nudge)
