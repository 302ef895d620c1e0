"""Preference tuning (DPO, SimPO, ORPO): the losses against TRL's own code, the per-sequence
log-probabilities against a float64 recomputation, the reference model (adapters off) against
the base loaded separately, and the preference data format."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from official_layout import rwkv7_state_dict
from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.model.load import load_model
from rwkv_peft.peft.adapt import AdaptedLinear, adapters_disabled, plan_adapters, prepare_peft
from rwkv_peft.preference import dpo_loss, orpo_loss, sequence_logps, simpo_loss

trl = pytest.importorskip("trl")


def fixed_logps(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    # summed log-probs of replies of 3-12 tokens, and their lengths
    counts = torch.randint(3, 13, (4, n), generator=g).double()
    sums = -torch.rand(4, n, generator=g, dtype=torch.float64) * counts * 2.0
    return sums, counts


def test_dpo_loss_equals_trls_formula():
    # TRL 1.16 computes DPO inside DPOTrainer._compute_loss, which needs a model; this is its
    # sigmoid loss written out in float64 (trl/trainer/dpo_trainer.py lines 1349-1389:
    # logratios = policy - ref, delta = chosen - rejected, loss = mean(-logsigmoid(beta * delta)))
    (pc, pr, rc, rr), _ = fixed_logps()
    for beta in (0.1, 0.5):
        ours, metrics = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta)
        delta = (pc - rc) - (pr - rr)
        ref = (-F.logsigmoid(beta * delta)).mean()
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(metrics["rewards/chosen"].double(), beta * (pc - rc), rtol=1e-5, atol=1e-6)
        assert torch.allclose(metrics["rewards/margins"].double(), beta * delta, rtol=1e-5, atol=1e-6)
        assert torch.equal(metrics["rewards/accuracies"], (delta > 0).float())


def test_simpo_loss_equals_trls_cpo_trainer():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    (sc, sr, _, _), (nc, nr, _, _) = fixed_logps(1)
    mc, mr = sc / nc, sr / nr  # SimPO's length-normalised log-probs (TRL: average_log_prob for simpo)
    for beta, gamma in ((2.0, 0.5), (2.5, 1.4)):
        trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo",
                                  accelerator=SimpleNamespace(device=torch.device("cpu")))
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, mc, mr)
        ours, metrics = simpo_loss(mc, mr, beta, gamma)
        # cpo_alpha 0 (TRL's setting for SimPO): the loss is the mean of cpo_loss's losses
        assert ours.item() == pytest.approx(losses.mean().item(), rel=1e-12)
        assert torch.allclose(metrics["rewards/chosen"], chosen_rewards)
        assert torch.allclose(metrics["rewards/rejected"], rejected_rewards)


def test_orpo_loss_equals_trls_orpo_trainer():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    (sc, sr, _, _), (nc, nr, _, _) = fixed_logps(2)
    mc, mr = sc / nc, sr / nr
    mc[0] = -1e-4  # near log p = 0, where log(1 - p) needs care
    nll = torch.tensor(0.73, dtype=torch.float64)
    for lam in (0.1, 0.25):
        trainer = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
        losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(trainer, mc, mr)
        ours, metrics = orpo_loss(mc, mr, nll, lam)
        # ORPOTrainer.get_batch_loss_metrics: loss = policy_nll_loss - losses.mean()
        assert ours.item() == pytest.approx((nll - losses.mean()).item(), rel=1e-6)
        assert torch.allclose(metrics["rewards/chosen"], chosen_rewards)
        assert metrics["log_odds_ratio"].mean().item() == pytest.approx(ratio.item(), rel=1e-6)
        assert metrics["log_odds_chosen"].mean().item() == pytest.approx(log_odds.item(), rel=1e-6)


def test_sequence_logps_equal_a_float64_recomputation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 70, 50, generator=g, requires_grad=True)  # 70 positions: two slices of 64
    targets = torch.randint(0, 50, (4, 70), generator=g)
    mask = (torch.rand(4, 70, generator=g) > 0.4).float()
    mask[2] = 0
    sums, counts = sequence_logps(logits, targets, mask)
    logp = torch.log_softmax(logits.detach().double(), -1).gather(-1, targets[..., None])[..., 0]
    ref = (logp * mask.double()).sum(-1)
    assert torch.allclose(sums.double(), ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(counts, mask.sum(-1))
    # the gradient too: d/dlogits of sum(w * logps)
    w = torch.tensor([0.3, -1.0, 2.0, 0.5])
    (sums * w).sum().backward()
    x = logits.detach().double().requires_grad_()
    per_seq = (torch.log_softmax(x, -1).gather(-1, targets[..., None])[..., 0] * mask.double()).sum(-1)
    (per_seq * w.double()).sum().backward()
    assert torch.allclose(logits.grad.double(), x.grad, atol=1e-6)


# ---- the reference model: adapters off == the base loaded separately


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "base.pth"
    torch.save(rwkv7_state_dict(n_layer=2, n_embd=64, head_size=16, vocab=97, seed=0), path)
    return path


def adapted(base_file, method, parts=()):
    model = load_model(base_file, dtype=torch.float32)
    torch.manual_seed(0)
    plan = plan_adapters(model, [], (method, {"r": 16}))
    methods, parts = prepare_peft(model, plan, parts)
    with torch.no_grad():  # trained-looking adapters and state: none of them zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model, methods


@pytest.mark.parametrize("method", ["lora", "bone", "bat", "pissa"])
@pytest.mark.parametrize("state", [False, True])
def test_adapters_disabled_give_the_base_exactly(base_file, method, state):
    base = load_model(base_file, dtype=torch.float32)
    model, _ = adapted(base_file, method, ("state",) if state else ())
    tokens = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base(tokens)
        trained = model(tokens)
        ptrs = {n: m.weight.data_ptr() for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
        with adapters_disabled(model):
            off = model(tokens)
            # the reference runs on the very tensors the adapted model holds: no copy of the base
            assert ptrs == {n: m.weight.data_ptr() for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
        again = model(tokens)
    assert not torch.allclose(trained, expected, atol=1e-3)  # the adapters do change the output
    assert torch.equal(again, trained)  # and come back on leaving
    if method == "pissa":  # the frozen residual W - B0 A0 is rounded to fp32: W x comes back to rounding
        assert torch.allclose(off, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(off, expected)


def test_dpo_reference_holds_no_copy_of_the_base(base_file):
    from rwkv_peft.train.objectives import Reference

    model, methods = adapted(base_file, "lora", ("state",))
    parts = {n: p for n, p in model.named_parameters() if n.endswith("time_state")}
    run = SimpleNamespace(model=model, full=False, parts=parts, args=SimpleNamespace(init_adapter=None))
    ref = Reference(run)
    held = [t for t in ref.states.values()]
    assert ref.copy is None and ref.initial is None and ref.kind == "adapters off"
    base_bytes = sum(m.weight.numel() for m in model.modules() if isinstance(m, AdaptedLinear))
    assert sum(t.numel() for t in held) < base_bytes / 10  # only the small initial states
    # with --peft full the reference is a documented frozen copy
    full = Reference(SimpleNamespace(model=load_model(base_file), full=True, parts={},
                                     args=SimpleNamespace(init_adapter=None)))
    assert full.kind == "frozen copy" and not any(p.requires_grad for p in full.copy.parameters())


# ---- preference data


def test_pairs_render_in_the_sft_chat_format_with_loss_on_the_replies_only(tmp_path):
    from rwkv_peft.data.chat_format import chat_segments, encode_segments
    from rwkv_peft.data.preference import load_preference_data
    from rwkv_peft.data.tokenizer import load_tokenizer

    tok = load_tokenizer("world")
    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": "Capital of Varnholm?", "chosen": "Lumen Bay.", "rejected": "Port Adder."},
               {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    data = load_preference_data(str(path), tok, ctx_len=64)
    for n, rec in enumerate(records):
        prompt = rec["prompt"] if isinstance(rec["prompt"], list) else [{"role": "user", "content": rec["prompt"]}]
        for got, name in zip(data.pairs[n], ("chosen", "rejected")):
            reply = rec[name] if isinstance(rec[name], list) else [{"role": "assistant", "content": rec[name]}]
            assert got == encode_segments(chat_segments(prompt + reply), tok)  # exactly SFT's rendering
    batch = data.batch([0, 1])
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 16 == 0
    ids, mask = data.pair(0)[0]
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained in (" Lumen Bay.\n\n", " Hello.\n\n")
    shown = data.render(0)
    assert "⟦" in shown and "[chosen:" in shown and "[rejected:" in shown


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "must be a string or a list"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "holds no assistant message"),
])
def test_bad_pairs_fail_with_one_line(tmp_path, record, message):
    from rwkv_peft.data.preference import load_preference_data
    from rwkv_peft.data.tokenizer import load_tokenizer

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(RWKVPeftError, match=message) as e:
        load_preference_data(str(path), load_tokenizer("world"), ctx_len=64)
    assert "line 2" in str(e.value) and "\n" not in str(e.value)
