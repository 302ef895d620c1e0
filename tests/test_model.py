"""The model against the official `rwkv` package, state carry, dtypes, config inference."""

import pytest
import torch

import rwkv_peft
from official_runner import run_official
from official_layout import rwkv6_state_dict, rwkv7_state_dict
from rwkv_peft import RWKVPeftError, infer_config, load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these models are tiny

CASES = {
    "v7": (7, lambda: rwkv7_state_dict(seed=1)),
    "v7-time-state": (7, lambda: rwkv7_state_dict(time_state=True, seed=5)),
    "v7-no-block0-v": (7, lambda: rwkv7_state_dict(block0_v=False, seed=2, dims=(8, 16, 4, 12))),
    "v6": (6, lambda: rwkv6_state_dict(seed=3)),
    "v6-time-state": (6, lambda: rwkv6_state_dict(time_state=True, seed=4)),
}
T = 37  # not a multiple of any chunk length


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def step_by_step(model, tokens):
    state, out = model.zero_state(tokens.shape[0]), []
    for t in range(tokens.shape[1]):
        logits, state = model(tokens[:, t:t + 1], state)
        out.append(logits[:, 0])
    return torch.stack(out, dim=1), state


def decoder_steps(model, tokens):
    """Logits [T, V] of generation's one-token Decoder fed tokens [T] one at a time."""
    decoder, state = model.decoder(), model.zero_state(1)
    out = []
    for t in tokens.tolist():
        logits, state = decoder.step(t, state)
        out.append(logits)
    return torch.stack(out), state


TOKENS = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def official_logits(tmp_path_factory):
    """The official runtime's logits for every case, one process per version."""
    pytest.importorskip("rwkv", reason="the official `rwkv` package is the parity reference")
    tmp = tmp_path_factory.mktemp("parity")
    refs = {}
    for version in (6, 7):
        names = [name for name, (v, _) in CASES.items() if v == version]
        paths = [tmp / f"{name}.pth" for name in names]
        for name, path in zip(names, paths):
            torch.save(CASES[name][1](), path)
        results = run_official(version, paths, TOKENS[0].tolist(), [p.with_suffix(".ref") for p in paths])
        refs.update(dict(zip(names, results)))
    return refs


@pytest.mark.parametrize("case", CASES)
def test_logits_match_official_runtime(case, official_logits):
    ref = official_logits[case]
    model = load_model(CASES[case][1](), dtype=torch.float32)
    with torch.no_grad():
        full = model(TOKENS)[0]
        steps = step_by_step(model, TOKENS)[0][0]
    decoded = decoder_steps(model, TOKENS[0])[0]
    assert rel_err(full, ref["full"]) <= 1e-5
    assert rel_err(steps, ref["steps"]) <= 1e-5
    for t in range(T):  # the decoder, token by token
        assert rel_err(decoded[t], ref["steps"][t]) <= 1e-5, f"token {t}"


@pytest.mark.parametrize("case", CASES)
def test_state_carry_pieces_equal_whole(case):
    version, make = CASES[case]
    model = load_model(make(), dtype=torch.float32)
    tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, whole_state = model(tokens, model.zero_state(2))
        state, pieces = model.zero_state(2), []
        for lo, hi in ((0, 5), (5, 6), (6, 30), (30, T)):
            logits, state = model(tokens[:, lo:hi], state)
            pieces.append(logits)
        pieces = torch.cat(pieces, dim=1)
        stepped, _ = step_by_step(model, tokens)
        decoded, decoded_state = decoder_steps(model, tokens[1])
    assert rel_err(pieces, whole) <= 1e-5
    assert rel_err(decoded, whole[1]) <= 1e-5
    for a, b in zip((decoded_state.att_shift, decoded_state.wkv, decoded_state.ffn_shift),
                    (whole_state.att_shift[:, 1:], whole_state.wkv[:, 1:], whole_state.ffn_shift[:, 1:])):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(stepped, whole) <= 1e-5
    for a, b in zip((state.att_shift, state.wkv, state.ffn_shift),
                    (whole_state.att_shift, whole_state.wkv, whole_state.ffn_shift)):
        assert rel_err(a, b) <= 1e-5
    # without a state, the model starts from the same initial state
    assert rel_err(model(tokens).detach(), whole) <= 1e-6


@pytest.mark.parametrize("case", ["v7", "v6"])
def test_bf16_within_bf16_tolerance_of_fp32(case):
    _, make = CASES[case]
    sd = make()
    tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = load_model(sd, dtype=torch.float32)(tokens)
        model = load_model(sd, dtype=torch.bfloat16)
        out = model(tokens)
        stepped, state = step_by_step(model, tokens[:, :8])
        decoded, _ = decoder_steps(model, tokens[0, :8])
    assert out.dtype == torch.bfloat16
    assert rel_err(decoded.float(), ref[0, :8]) < 5e-2
    assert state.wkv.dtype == torch.float32
    assert rel_err(out.float(), ref) < 5e-2
    assert rel_err(stepped.float(), ref[:, :8]) < 5e-2


def test_module_layout_is_official():
    sd = rwkv7_state_dict()
    model = load_model(sd, dtype=torch.float32)
    assert list(model.state_dict()) == list(sd)  # same keys, same order as the file
    assert isinstance(model.blocks[1].att.receptance, torch.nn.Linear)
    assert isinstance(model.blocks[0].ffn.key, torch.nn.Linear)
    logits = model(torch.zeros(3, 4, dtype=torch.long))
    assert logits.shape == (3, 4, 97)


def test_gradients_flow_to_every_parameter():
    model = load_model(rwkv7_state_dict(block0_v=False), dtype=torch.float32).train()
    tokens = torch.randint(0, 97, (2, 20))
    model(tokens).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_infer_config_reads_every_size():
    cfg = infer_config(rwkv7_state_dict(n_layer=2, n_embd=32, head_size=8, vocab=50, dims=(4, 6, 2, 10)))
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.n_head) == (7, 2, 32, 8, 4)
    assert (cfg.vocab_size, cfg.dim_ffn, cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (50, 128, 4, 6, 2, 10)
    assert cfg.block0_v_mix
    cfg = infer_config(rwkv6_state_dict(n_layer=4, n_embd=64, head_size=32, dims=(6, 10), time_state=True))
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.dim_ffn) == (6, 4, 64, 32, 224)
    assert (cfg.d_mix, cfg.d_decay, cfg.time_state) == (6, 10, True)


def _drop(sd, key):
    sd = dict(sd)
    del sd[key]
    return sd


def _reshape(sd, key, shape):
    sd = dict(sd)
    sd[key] = torch.zeros(shape)
    return sd


BAD = {
    "no-emb": (lambda: {"foo.weight": torch.zeros(2)}, "no 'emb.weight'"),
    "rwkv4": (lambda: {"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_mix_k": torch.zeros(4)},
              "only RWKV-6 (x060) and RWKV-7"),
    "unknown": (lambda: {"emb.weight": torch.zeros(4, 4), "blocks.0.att.foo": torch.zeros(4)},
                "neither 'blocks.0.att.r_k'"),
    "missing-key": (lambda: _drop(rwkv7_state_dict(), "blocks.2.att.w1"), "missing key 'blocks.2.att.w1'"),
    "bad-shape": (lambda: _reshape(rwkv7_state_dict(), "blocks.1.ffn.value.weight", (64, 100)),
                  "'blocks.1.ffn.value.weight' has shape [64, 100], expected [64, 256]"),
    "extra-key": (lambda: {**rwkv6_state_dict(), "blocks.0.att.lora_A": torch.zeros(2)},
                  "unexpected key 'blocks.0.att.lora_A'"),
    "v6-missing": (lambda: _drop(rwkv6_state_dict(), "blocks.0.att.time_maa_w1"),
                   "missing key 'blocks.0.att.time_maa_w1'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_fail_with_one_clear_line(case):
    make, expected = BAD[case]
    with pytest.raises(RWKVPeftError) as e:
        load_model(make())
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files_fail_with_one_clear_line(tmp_path):
    with pytest.raises(RWKVPeftError, match="not found"):
        load_model(tmp_path / "nope.pth")
    truncated = tmp_path / "truncated.pth"
    torch.save(rwkv7_state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(RWKVPeftError, match="truncated or corrupt"):
        load_model(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(RWKVPeftError, match="not a readable PyTorch file"):
        load_model(garbage)


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": payload}, path)
    with pytest.raises(RWKVPeftError, match="weights_only"):
        load_model(path)
    assert not marker.exists()


def test_create_model_follows_official_init():
    cfg = rwkv_peft.RWKVConfig(version=7, n_layer=3, n_embd=64, head_size=16, vocab_size=200, dim_ffn=256,
                               d_decay=8, d_aaa=8, d_mv=4, d_gate=16)
    model = rwkv_peft.create_model(cfg, seed=0)
    L, C, N = 3, 64, 16
    n = torch.arange(C, dtype=torch.float64)
    for l, block in enumerate(model.blocks):
        att = block.att
        r0, r1 = l / (L - 1), 1 - l / L
        ddd = n / C
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = z * z.abs()
        linear = n / (C - 1) - 0.5
        www = -6 + 6 * (n / (C - 1)) ** (1 + r0 ** 0.3)
        close = lambda p, ref: torch.testing.assert_close(p.detach().double().flatten(), ref, atol=1e-6, rtol=1e-5)
        close(att.x_r, 1 - ddd ** (0.2 * r1))
        close(att.x_w, 1 - ddd ** (0.9 * r1))
        close(att.x_k, 1 - ddd ** (0.7 * r1))
        close(att.w0, www + 0.5 + 2.5 * zigzag)
        close(att.a0, -0.19 + 0.3 * zigzag + 0.4 * linear)
        close(att.k_k, 0.71 - 0.1 * linear)
        close(block.ffn.x_k, 1 - ddd ** (r1 ** 4))
        close(att.ln_x.weight, torch.full((C,), ((l + 1) / L) ** 0.7, dtype=torch.float64))
        assert not hasattr(att, "v0") if l == 0 else torch.allclose(att.v0.flatten().double(), 0.73 - 0.4 * linear)
        assert att.w1.abs().sum() == 0 and att.output.weight.abs().sum() == 0
        # w2 is orthogonal with gain 0.1: rows orthonormal up to the gain
        gram = att.w2 @ att.w2.T
        torch.testing.assert_close(gram, 0.01 * torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
    assert model.emb.weight.abs().max() <= 1e-4
    head = model.head.weight
    torch.testing.assert_close(head.T @ head, (0.5 * (200 / 64) ** 0.5) ** 2 * torch.eye(C), atol=1e-4, rtol=1e-4)
    # a fresh model runs, and its state dict loads back as an official checkpoint
    reloaded = load_model(model.state_dict(), dtype=torch.float32)
    tokens = torch.randint(0, 200, (1, 9))
    torch.testing.assert_close(reloaded(tokens), model(tokens))
