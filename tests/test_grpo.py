"""GRPO's pieces: rollouts with a copied prefilled state against separate prefills, and the loss
and its gradient against a float64 element-by-element transcription of TRL 1.16's formula
(trl/trainer/grpo_trainer.py: advantages lines 2765-2800, per-token loss and reductions lines
3095-3165, token-level importance sampling, no delta clamp)."""

import math

import pytest
import torch

from official_layout import rwkv6_state_dict, rwkv7_state_dict
from rwkv_peft.grpo import group_advantages, grpo_loss
from rwkv_peft.model.load import load_model
from rwkv_peft.rollout import rollout, rollout_separately


@pytest.mark.slow
@pytest.mark.parametrize("version", [7, 6])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_state_copy_rollout_equals_separate_prefills(tmp_path, version, temperature):
    make = rwkv7_state_dict if version == 7 else rwkv6_state_dict
    torch.save(make(n_layer=2, n_embd=64, head_size=16, vocab=97, seed=0), tmp_path / "m.pth")
    model = load_model(tmp_path / "m.pth", dtype=torch.float32)
    prompt = torch.randint(1, 97, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    tokens, lengths = rollout(model, prompt, 6, 24, temperature=temperature, seed=5, stop=3)
    ref_tokens, ref_lengths = rollout_separately(model, prompt, 6, 24, temperature=temperature, seed=5, stop=3)
    assert torch.equal(tokens, ref_tokens) and torch.equal(lengths, ref_lengths)
    if temperature:
        assert len({tuple(r) for r in tokens.tolist()}) > 1  # the G completions do differ
    # and the sampled tokens are the model's own: the batch decode's logits are model(prompt + completion)'s
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens[0].tolist()]))[0]
        state = model(torch.tensor([prompt]), model.zero_state(1))[1]
        step = model(tokens[0:1], state)[0][0]
    torch.testing.assert_close(step, full[len(prompt):], rtol=1e-4, atol=1e-4)


def reference_loss(logps, old, ref, mask, rewards, group, beta, eps_low, eps_high, loss_type, max_len):
    """TRL's GRPO loss, written out element by element in float64."""
    n, t = logps.shape
    adv = []
    for p in range(n // group):
        rs = [float(r) for r in rewards[p * group:(p + 1) * group]]
        mean = sum(rs) / group
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (group - 1))
        adv += [(r - mean) / (std + 1e-4) if loss_type == "grpo" else r - mean for r in rs]
    total, per_seq = 0.0, []
    for i in range(n):
        s, count = 0.0, 0.0
        for j in range(t):
            ratio = torch.exp(logps[i, j] - old[i, j])
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            term = -torch.min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i, j] - logps[i, j]
                term = term + beta * (torch.exp(d) - d - 1)
            s = s + term * mask[i, j]
            count += float(mask[i, j])
        per_seq.append(s / max(count, 1.0))
        total = total + s
    return sum(per_seq) / n if loss_type == "grpo" else total / (n * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradient_equal_trls_formula(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    group, prompts, t = 4, 2, 7
    n = group * prompts
    mask = torch.ones(n, t, dtype=torch.float64)
    for i, length in enumerate([7, 3, 5, 1, 6, 7, 2, 4]):  # completions of different lengths
        mask[i, length:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.2], dtype=torch.float64)
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    ref = old + 0.1 * torch.randn(n, t, generator=g, dtype=torch.float64)
    # the policy moved: ratios inside and outside the clip range
    start = old + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)
    ours_in = start.clone().requires_grad_()
    loss, _ = grpo_loss(ours_in, old, mask, group_advantages(rewards, group, scale=loss_type == "grpo"),
                        ref_logps=ref, beta=beta, eps_low=0.2, eps_high=0.28, loss_type=loss_type, max_len=t)
    loss.backward()
    ref_in = start.clone().requires_grad_()
    expected = reference_loss(ref_in, old, ref, mask, rewards, group, beta, 0.2, 0.28, loss_type, t)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-12, atol=1e-14)
    assert (ours_in.grad[mask == 0] == 0).all()  # padding gets no gradient


def test_top_p_samples_only_from_the_nucleus():
    """Over many draws, every token is one of the smallest set of most likely tokens whose
    probability reaches top_p (written out here), and each of them does come up."""
    from rwkv_peft.rollout import _generators, _noise, _pick

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    probs = torch.softmax(logits.double(), -1)[0].tolist()
    nucleus, total = set(), 0.0
    for p, token in sorted(((p, i) for i, p in enumerate(probs)), reverse=True):
        nucleus.add(token)
        total += p
        if total >= 0.8:
            break
    (generator,) = _generators(0, [0])
    drawn = {_pick(logits, _noise([generator], 6, "cpu"), 1.0, 0.8).item() for _ in range(400)}
    assert drawn == nucleus and len(nucleus) < 6
