"""Rules, adapter files and merging, checked against the official runtime and explicit deltas."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from official_runner import run_official
from official_layout import rwkv6_state_dict, rwkv7_state_dict
from random_adapters import random_adapters
from rwkv_peft import RWKVPeftError, load_model
from rwkv_peft.peft.adapt import parse_rules, plan_adapters, prepare_peft
from rwkv_peft.peft.adapter_file import describe_base, read_adapter, save_adapter
from rwkv_peft.peft.merge import check_merge, merge_adapter, merge_files

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these models are tiny

ROOT = Path(__file__).parent.parent
T = 29

SETUPS = {  # name -> (version, default method, rules, train_parts)
    "lora": (7, ("lora", {"r": 8, "alpha": 16}), "", ()),
    "pissa": (7, ("pissa", {"r": 8, "svd_niter": 4}), "", ()),
    "bone": (7, ("bone", {"r": 24}), "", ()),  # 64 % 24 != 0: a partial last block
    "bat": (7, ("bat", {"r": 16}), "", ()),
    "mixed": (7, ("bone", {"r": 16}),
              "blocks.0.*=none; blocks.*.att.key=lora:8,alpha=4; blocks.*.ffn.value=bat:32; "
              "blocks.2.att.output=pissa:4; head=lora:4", ("ln", "time")),
    "mixed-v6": (6, ("bat", {"r": 16}), "blocks.*.att.gate=bone:8; blocks.1.ffn.*=lora:4", ("ln", "time", "emb")),
    "bone-state": (7, ("bone", {"r": 16}), "", ("state",)),  # state tuning beside an adapter
    "state-v6": (6, None, "", ("state",)),  # state tuning alone
}


def make_base(version, seed=0):
    return rwkv7_state_dict(seed=seed) if version == 7 else rwkv6_state_dict(seed=seed)


def tokens_for(sd, seed=0, length=T):
    return torch.randint(0, sd["emb.weight"].shape[0], (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def merged_runs(tmp_path_factory):
    """Per setup: our adapted model's logits, and the official runtime's on the merged file."""
    pytest.importorskip("rwkv")
    tmp = tmp_path_factory.mktemp("merge")
    ours, files = {}, {6: [], 7: []}
    for name, (version, default, rules, parts) in SETUPS.items():
        sd = make_base(version)
        base = tmp / f"{name}-base.pth"
        torch.save(sd, base)
        model, methods, part_params = random_adapters(sd, default, rules, parts)
        adapter = tmp / f"{name}.safetensors"
        save_adapter(adapter, methods, part_params, describe_base(sd, model.config, base))
        merged = merge_files(str(base), str(adapter), str(tmp / f"{name}-merged.pth"), log=lambda *_: None)
        with torch.no_grad():
            ours[name] = model(tokens_for(sd))[0]
        files[version].append((name, merged))
    refs = {}
    for version, items in files.items():
        outs = [tmp / f"{name}.ref.pt" for name, _ in items]
        results = run_official(version, [m for _, m in items], tokens_for(make_base(version))[0].tolist(), outs)
        refs.update({name: r for (name, _), r in zip(items, results)})
    return ours, refs


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_merged_file_in_official_runtime_equals_adapted_model(setup, merged_runs):
    ours, refs = merged_runs
    ref = refs[setup]["full"]
    assert ((ours[setup] - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_adapters_change_the_model():
    """The parity above is only meaningful if the adapters moved the logits."""
    sd = make_base(7)
    tokens = tokens_for(sd)
    base = load_model(sd, dtype=torch.float32)(tokens)
    for name, (version, default, rules, parts) in SETUPS.items():
        if version == 7:
            adapted = random_adapters(sd, default, rules, parts)[0](tokens)
            assert (adapted - base).abs().max() > 1e-2, name


def test_pissa_starts_at_the_base_model_and_merges_after_training(tmp_path):
    sd = make_base(7)
    tokens = tokens_for(sd)
    base_logits = load_model(sd, dtype=torch.float32)(tokens)
    model, methods, parts = random_adapters(sd, ("pissa", {"r": 8}), noise=0.0)
    torch.testing.assert_close(model(tokens), base_logits, atol=1e-4, rtol=1e-4)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(tokens)
    assert (trained - base_logits).abs().max() > 1e-3
    path = tmp_path / "pissa.safetensors"
    save_adapter(path, methods, parts, describe_base(sd, model.config, None))
    merged = load_model(merge_adapter(sd, read_adapter(path)), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), trained, atol=1e-4, rtol=1e-4)


def test_adapter_file_round_trip(tmp_path):
    sd = make_base(7)
    version, default, rules, parts = SETUPS["mixed"]
    model, methods, part_params = random_adapters(sd, default, rules, parts)
    path = tmp_path / "a.safetensors"
    save_adapter(path, methods, part_params, describe_base(sd, model.config, None))
    adapter = read_adapter(path)
    assert set(adapter.layers) == set(methods)
    for module, method in methods.items():
        assert adapter.layers[module] == (method.name, method.hparams())
        for name, t in method.tensors().items():
            assert torch.equal(adapter.tensors[module][name], t.detach())
    assert set(adapter.parts) == set(part_params)
    # the file holds only trained tensors, under official module names
    names = {f"{m}.{n}" for m, ts in adapter.tensors.items() for n in ts}
    assert "blocks.1.att.key.lora_A" in names and "blocks.1.ffn.value.bat" in names
    assert "blocks.2.att.output.init_A" in names and "blocks.1.att.receptance.bone" in names
    assert not any(k.endswith("receptance.weight") for k in adapter.parts)
    tokens = tokens_for(sd)
    reloaded = load_model(sd, adapter=path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), model(tokens), atol=0, rtol=0)


def test_rwkv_peft_adapter_import(tmp_path):
    """RWKV-PEFT .pth files: .disha 2-D = Bone, 3-D = Bat, lora_A/lora_B, a 'model.' prefix."""
    sd = make_base(7)
    g = torch.Generator().manual_seed(5)
    C = sd["emb.weight"].shape[1]
    bone = torch.randn(16, C, generator=g) * 0.1                 # D [r, out]
    bat = torch.randn(C // 16, 16, 16, generator=g) * 0.1         # D [in/r, r, r]
    lora_A, lora_B = torch.randn(4, C, generator=g) * 0.1, torch.randn(4 * C, 4, generator=g) * 0.1
    ln = torch.randn(C, generator=g)
    path = tmp_path / "rwkv-peft.pth"
    torch.save({"model.blocks.0.att.receptance.disha": bone, "blocks.1.att.value.disha": bat,
                "blocks.2.ffn.key.lora_A": lora_A, "blocks.2.ffn.key.lora_B": lora_B,
                "blocks.1.ln1.weight": ln}, path)
    adapter = read_adapter(path, lora_alpha=8)
    assert adapter.layers["blocks.0.att.receptance"] == ("bone", {"r": 16})
    assert adapter.layers["blocks.1.att.value"] == ("bat", {"r": 16})
    assert adapter.layers["blocks.2.ffn.key"][0] == "lora"

    # explicit merge, written from the conventions
    ref = dict(sd)
    W = sd["blocks.0.att.receptance.weight"]
    ref["blocks.0.att.receptance.weight"] = W + bone.T.repeat(1, C // 16)
    W = sd["blocks.1.att.value.weight"].clone()
    out = W.clone()
    for a in range(C // 16):
        for b in range(C // 16):
            blk = W[a * 16:(a + 1) * 16, b * 16:(b + 1) * 16]
            out[a * 16:(a + 1) * 16, b * 16:(b + 1) * 16] += blk @ bat[b] + bat[b]
    ref["blocks.1.att.value.weight"] = out
    ref["blocks.2.ffn.key.weight"] = sd["blocks.2.ffn.key.weight"] + (8 / 4) * lora_B @ lora_A
    ref["blocks.1.ln1.weight"] = ln
    tokens = tokens_for(sd)
    with torch.no_grad():
        expected = load_model(ref, dtype=torch.float32)(tokens)
        torch.testing.assert_close(load_model(sd, adapter=adapter, dtype=torch.float32)(tokens), expected,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_model(merge_adapter(sd, adapter), dtype=torch.float32)(tokens),
                                   expected, atol=1e-4, rtol=1e-4)


def test_rwkv_peft_pissa_merges_with_its_init_file(tmp_path, capsys):
    """RWKV-PEFT writes a PiSSA run as lora_A/lora_B plus init_pissa.pth (init_lora_A/B):
    merged = W + B A - B0 A0. Read as plain LoRA it would silently lose the - B0 A0."""
    from rwkv_peft.commands import merge

    sd = make_base(7)
    g = torch.Generator().manual_seed(3)
    modules = ["blocks.0.att.key", "blocks.1.ffn.value"]
    adapter, init, ref = {}, {}, dict(sd)
    for m in modules:
        out_f, in_f = sd[f"{m}.weight"].shape
        A0, B0 = torch.randn(4, in_f, generator=g) * 0.1, torch.randn(out_f, 4, generator=g) * 0.1
        A, B = A0 + torch.randn(4, in_f, generator=g) * 0.05, B0 + torch.randn(out_f, 4, generator=g) * 0.05
        adapter[f"{m}.lora_A"], adapter[f"{m}.lora_B"] = A.bfloat16(), B.bfloat16()
        init[f"model.{m}.init_lora_A"], init[f"model.{m}.init_lora_B"] = A0, B0
        W = sd[f"{m}.weight"]
        ref[f"{m}.weight"] = (W.float() + B.bfloat16().float() @ A.bfloat16().float() - B0 @ A0).to(W.dtype)
    torch.save(sd, tmp_path / "base.pth")
    torch.save(adapter, tmp_path / "adapter.pth")
    torch.save(init, tmp_path / "init_pissa.pth")
    assert merge(["--base", str(tmp_path / "base.pth"), "--adapter", str(tmp_path / "adapter.pth"),
                  "--pissa_init", str(tmp_path / "init_pissa.pth"), "--output", str(tmp_path / "m.pth")]) == 0
    assert "verify: OK" in capsys.readouterr().out
    merged = torch.load(tmp_path / "m.pth", weights_only=True)
    for key, t in ref.items():
        torch.testing.assert_close(merged[key].float(), t.float(), atol=1e-5, rtol=1e-5)
    # the same reading serves running it unmerged
    tokens = tokens_for(sd)
    unmerged = load_model(sd, adapter=read_adapter(tmp_path / "adapter.pth",
                                                   pissa_init=tmp_path / "init_pissa.pth"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(tokens), load_model(ref, dtype=torch.float32)(tokens),
                                   atol=1e-4, rtol=1e-4)


def test_rules_first_match_none_and_defaults():
    model = load_model(make_base(6), dtype=torch.float32)
    plan = plan_adapters(model, parse_rules("blocks.0.*=none; blocks.*.att.key=lora:4; blocks.*.att.*=bone:8"),
                         ("bat", {"r": 16}))
    assert "blocks.0.att.key" not in plan and "blocks.0.ffn.key" not in plan
    assert plan["blocks.1.att.key"] == ("lora", {"r": 4})
    assert plan["blocks.1.att.gate"] == ("bone", {"r": 8})        # RWKV-6 has att.gate
    assert plan["blocks.2.ffn.receptance"] == ("bat", {"r": 16})  # default target via --peft
    assert "head" not in plan                                     # not a default target
    # a rule for the default method inherits the flags' other hyperparameters
    plan = plan_adapters(model, parse_rules("blocks.1.*=lora:2"), ("lora", {"r": 8, "alpha": 32}))
    assert plan["blocks.1.att.key"] == ("lora", {"r": 2, "alpha": 32})


def test_rules_from_json_file(tmp_path):
    model = load_model(make_base(7), dtype=torch.float32)
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"blocks.1.*": "none", "blocks.*.att.value": "bone:16"}))
    assert plan_adapters(model, parse_rules(str(path)), None) == {
        "blocks.0.att.value": ("bone", {"r": 16}), "blocks.2.att.value": ("bone", {"r": 16})}
    path.write_text(json.dumps([{"pattern": "head", "method": "lora", "r": 4, "alpha": 8}]))
    assert plan_adapters(model, parse_rules(str(path)), None) == {"head": ("lora", {"r": 4, "alpha": 8})}


@pytest.mark.parametrize("rules, default, message", [
    ("blocks.*.att.gate=bone:8", None, "rule 'blocks.*.att.gate=bone:8' matches no linear layer"),
    ("blocks.*=dora:8", None, "unknown method 'dora'"),
    ("blocks.*.ffn.key=bat:48", None, "rule 'blocks.*.ffn.key=bat:48' at layer blocks.0.ffn.key: bat rank 48"),
    ("blocks.*.att.key=lora:x", None, "rule 'blocks.*.att.key=lora:x': 'x' is not a number"),
    ("blocks.*.att.key", None, "write 'glob=method:rank'"),
    ("", ("bat", {"r": 48}), "--peft at layer blocks.0.att.receptance: bat rank 48"),
    ("", ("bone", {"r": 8, "alpha": 3}), "--peft: bad hyperparameter for bone"),
])
def test_rule_errors_name_the_rule(rules, default, message):
    model = load_model(make_base(7), dtype=torch.float32)
    with pytest.raises(RWKVPeftError) as e:
        plan_adapters(model, parse_rules(rules), default)
    assert message in str(e.value)


def test_train_parts_select_whole_groups():
    model = load_model(make_base(7), dtype=torch.float32)
    _, parts = prepare_peft(model, {}, ("ln", "time", "emb", "head"))
    assert "blocks.0.ln0.weight" in parts and "blocks.2.att.ln_x.bias" in parts and "ln_out.weight" in parts
    assert "blocks.1.att.w1" in parts and "blocks.1.att.r_k" in parts and "blocks.0.ffn.x_k" in parts
    assert "emb.weight" in parts and "head.weight" in parts
    assert not any(k.endswith(("receptance.weight", "key.weight", "value.weight", "output.weight")) for k in parts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(parts)
    with pytest.raises(RWKVPeftError, match="unknown part 'norms'"):
        prepare_peft(load_model(make_base(7)), {}, ("norms",))


def test_adapter_on_a_different_base_is_refused(tmp_path):
    sd = make_base(7)
    model, methods, parts = random_adapters(sd, ("bone", {"r": 16}))
    path = tmp_path / "a.safetensors"
    save_adapter(path, methods, parts, describe_base(sd, model.config, None))
    with pytest.raises(RWKVPeftError, match="trained on a different base"):
        load_model(make_base(7, seed=9), adapter=path)
    small = rwkv7_state_dict(n_embd=32, head_size=16)
    with pytest.raises(RWKVPeftError, match=r"'blocks.0.att.receptance.bone' has shape \[16, 64\], but base .* "
                                            r"needs \[16, 32\]"):
        load_model(small, adapter=path)


def test_merge_refuses_a_wrong_result(tmp_path):
    sd = make_base(7)
    model, methods, parts = random_adapters(sd, ("lora", {"r": 4}))
    path = tmp_path / "a.safetensors"
    save_adapter(path, methods, parts, describe_base(sd, model.config, None))
    adapter = read_adapter(path)
    merged = merge_adapter(sd, adapter)
    assert check_merge(sd, adapter, merged, torch.float32).startswith("verify: OK, the merged model matches")
    merged["blocks.1.att.key.weight"] = merged["blocks.1.att.key.weight"] * 1.5
    with pytest.raises(RWKVPeftError, match="^verify FAILED: .* refusing to write"):
        check_merge(sd, adapter, merged, torch.float32)


def run_merge(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / "merge.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_merge_cli_bare_uses_newest_adapter_and_its_base(tmp_path):
    sd = make_base(7)
    base = tmp_path / "base.pth"
    torch.save(sd, base)
    (tmp_path / "out" / "run1").mkdir(parents=True)
    model, methods, parts = random_adapters(sd, ("bat", {"r": 16}))
    adapter = tmp_path / "out" / "run1" / "adapter.safetensors"
    save_adapter(adapter, methods, parts, describe_base(sd, model.config, base))
    proc = run_merge(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "verify: OK" in proc.stdout and "next:" in proc.stdout
    merged = tmp_path / "out" / "run1" / "merged.pth"
    tokens = tokens_for(sd)
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged, dtype=torch.float32)(tokens), model(tokens),
                                   atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.rglob("*.tmp"))

    proc = run_merge(tmp_path, "--adapter", str(adapter), "--output", str(base))
    assert proc.returncode == 2 and "same file as --base" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_merge(tmp_path / "out", "--adapter", "missing.safetensors")
    assert proc.returncode == 2 and "adapter not found: missing.safetensors" in proc.stderr
