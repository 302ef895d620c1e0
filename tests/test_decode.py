"""Generation's one-token Decoder beyond the official parity tests (tests/test_model.py):
unmerged adapters, weights changed after the build, and its use by generate()."""

import pytest
import torch

from official_layout import rwkv6_state_dict, rwkv7_state_dict
from rwkv_peft import load_model
from rwkv_peft.generate import generate_text
from rwkv_peft.peft.adapt import attach_adapters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these models are tiny

TOKENS = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
PLAN = {"blocks.0.att.key": ("lora", {"r": 4}), "blocks.1.att.output": ("pissa", {"r": 4}),
        "blocks.0.ffn.key": ("bone", {"r": 16}), "blocks.2.ffn.value": ("bat", {"r": 16}),
        "head": ("lora", {"r": 8})}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def decoded(decoder, model, tokens):
    state, out = model.zero_state(1), []
    for t in tokens.tolist():
        logits, state = decoder.step(t, state)
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("make", [rwkv7_state_dict, rwkv6_state_dict], ids=["v7", "v6"])
def test_unmerged_adapters_decode_like_the_sequence_forward(make):
    model = load_model(make(seed=6), dtype=torch.float32)
    methods = attach_adapters(model, PLAN)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for method in methods.values():  # trained-looking adapters: every delta non-zero
            for p in method.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        whole = model.eval()(TOKENS)[0]
    assert rel_err(decoded(model.decoder(), model, TOKENS[0]), whole) <= 1e-5


def test_lora_dropout_of_a_training_model_stays_out_of_the_decoder():
    model = load_model(rwkv7_state_dict(seed=10), dtype=torch.float32)
    attach_adapters(model, {"blocks.1.att.value": ("lora", {"r": 4, "dropout": 0.5})})
    with torch.no_grad():
        model.blocks[1].att.value.adapter.lora_B.normal_(generator=torch.Generator().manual_seed(11))
        whole = model.eval()(TOKENS)[0]
    model.train()  # e.g. GRPO sampling between training steps
    assert rel_err(decoded(model.decoder(), model, TOKENS[0]), whole) <= 1e-5


def test_decoder_notices_changed_weights_and_generate_rebuilds_it():
    model = load_model(rwkv7_state_dict(seed=8), dtype=torch.float32)
    decoder = model.decoder()
    assert decoder.is_current()
    with torch.no_grad():  # in place, as an optimizer step writes; each feeds a copy or a derived constant
        model.head.weight.mul_(-1.0)
        model.blocks[1].ffn.key.weight.add_(0.05)
        model.blocks[0].att.receptance.weight.mul_(1.5)
        model.blocks[1].att.k_a.add_(0.3)
        model.blocks[2].att.x_r.mul_(0.5)
        model.blocks[1].att.w1.mul_(2.0)
    assert not decoder.is_current()
    with torch.no_grad():
        whole = model(TOKENS)[0]
    assert rel_err(decoded(model.decoder(), model, TOKENS[0]), whole) <= 1e-5
    assert rel_err(decoded(decoder, model, TOKENS[0]), whole) > 1e-3  # the stale one would be wrong

    class Digits:  # token i is the character chr(48 + i % 10)
        eos_id = 0

        def decode_bytes(self, ids):
            return bytes(48 + i % 10 for i in ids)

    prompt = TOKENS[0, :5].tolist()
    stale = generate_text(model, Digits(), prompt, max_tokens=6, stop=(), temperature=0.0, decoder=decoder)
    fresh = generate_text(model, Digits(), prompt, max_tokens=6, stop=(), temperature=0.0)
    with torch.no_grad():  # greedy reference from the sequence forward of the changed model
        ids = list(prompt)
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert stale.tokens == fresh.tokens == ids[5:]


def test_decoder_runs_one_sequence():
    model = load_model(rwkv7_state_dict(seed=9), dtype=torch.float32)
    with pytest.raises(ValueError, match="batch size 2"):
        model.decoder().step(3, model.zero_state(2))
