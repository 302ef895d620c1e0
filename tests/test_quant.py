"""A quantized frozen base (--quant nf4 / int8): each method's layer against x @ (Q(W) + delta)^T
built here from the library's own dequantized weight and an explicitly written delta; what the
backward pass keeps; what a quantizing load holds."""

import re
import sys

import pytest
import torch

from official_layout import rwkv7_state_dict
from official_runner import run_official
from rwkv_peft import load_model
from rwkv_peft.peft.adapt import AdaptedLinear, plan_adapters, prepare_peft, quantize_linears
from rwkv_peft.peft.adapter_file import read_adapter
from rwkv_peft.peft.methods import make_method
from rwkv_peft.peft.quant import QuantizedLinear, QuantizedWeight
from tiny_workspace import COMMON, losses, make_workspace, run_script

pytest.importorskip("torchao")

OUT, IN = 64, 128
METHODS = {"lora": {"r": 4, "alpha": 8.0}, "pissa": {"r": 4}, "bone": {"r": 16}, "bat": {"r": 16}}


def reference_dequantized(W: torch.Tensor, fmt: str) -> torch.Tensor:
    """Q(W) as the test sees it: torchao's NF4 directly; int8 written out (symmetric, per row)."""
    if fmt == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        return to_nf4(W.float(), 64, 128).get_original_weight().float()  # [64, 128]: 128 blocks of 64, one group
    scale = W.abs().amax(dim=1, keepdim=True) / 127.5  # torchao's symmetric scale: absmax / ((127 - -128) / 2)
    return (W * (1.0 / scale)).round().clamp(-128, 127) * scale  # x * (1/scale), as torchao rounds it


def explicit_delta(name: str, p: dict[str, torch.Tensor], Wq: torch.Tensor) -> torch.Tensor:
    """Each method's delta written out from SPEC section 4, on the weight the layer holds (Q(W))."""
    if name == "lora":
        return 8.0 / 4 * p["lora_B"] @ p["lora_A"]
    if name == "pissa":
        return p["lora_B"] @ p["lora_A"]  # the layer holds Q(W - B0 A0) and learns B A
    if name == "bone":
        return torch.cat([p["bone"].T] * (IN // 16), dim=1)
    r, D = 16, p["bat"]
    delta = torch.zeros(OUT, IN)
    for a in range(OUT // r):
        for b in range(IN // r):
            W_ab = Wq[a * r:(a + 1) * r, b * r:(b + 1) * r]
            delta[a * r:(a + 1) * r, b * r:(b + 1) * r] = W_ab @ D[b] + D[b]
    return delta


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("name", list(METHODS))
def test_layer_over_a_quantized_base_is_the_explicit_form(name, fmt):
    torch.manual_seed(0)
    W = torch.randn(OUT, IN) * 0.1
    method = make_method(name, IN, OUT, **METHODS[name])
    method.reset_parameters(W)
    with torch.no_grad():  # trained-looking values, not the zero initialisation
        for p in method.parameters():
            p.normal_(0, 0.05)
    frozen = W - method.init_B @ method.init_A if name == "pissa" else W
    layer = AdaptedLinear(QuantizedWeight(method.frozen_weight(W), fmt, torch.float32), method)

    x = torch.randn(3, 5, IN, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    Wq = reference_dequantized(frozen, fmt)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in method.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ (Wq + explicit_delta(name, params, Wq)).T
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for n, p in method.named_parameters():
        torch.testing.assert_close(p.grad, params[n].grad, rtol=1e-4, atol=1e-5, msg=f"grad of {n}")
    # and the quantization is real: Q(W) is not W
    assert (Wq - frozen).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["bat", "bone"])
def test_backward_keeps_no_dequantized_weight(name):
    """Between forward and backward, autograd keeps nothing of the [out, in] weight's size."""
    method = make_method(name, IN, OUT, **METHODS[name])
    layer = AdaptedLinear(QuantizedWeight(torch.randn(OUT, IN), "nf4", torch.float32), method)
    saved = []
    x = torch.randn(2, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert saved and max(saved) < OUT * IN, saved
    y.sum().backward()
    assert method.bat.grad is not None if name == "bat" else method.bone.grad is not None


@pytest.mark.parametrize("targets", ["adapted", "all"])
def test_quantizing_load_holds_no_full_precision_adapted_weight(tmp_path, targets):
    torch.save({k: v.bfloat16() for k, v in rwkv7_state_dict(vocab=256, n_layer=2, n_embd=64, head_size=16,
                                                            seed=0).items()}, tmp_path / "base.pth")
    model = load_model(tmp_path / "base.pth", dtype=torch.float32, quantizing=True)
    plan = plan_adapters(model, [], ("bone", {"r": 16}))
    _, parts = prepare_peft(model, plan, ["head"] if targets == "adapted" else [], quant="nf4", quant_targets=targets)

    for name in plan:
        layer = model.get_submodule(name)
        assert isinstance(layer.weight, QuantizedWeight) and not list(layer.weight.parameters())
        assert layer.weight.nbytes <= 0.3 * layer.weight.shape[0] * layer.weight.shape[1] * 2
    full = {n for n, t in [*model.named_parameters(), *model.named_buffers()]  # plain frozen matrices of a layer's size
            if type(t) in (torch.Tensor, torch.nn.Parameter) and not t.requires_grad and t.numel() >= 64 * 64}
    # what stays a frozen full-precision matrix: the embedding (the head is quantized, or trained here)
    assert full == {"emb.weight"}
    assert isinstance(model.head, QuantizedLinear) == (targets == "all")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the rest in the working dtype
    if targets == "adapted":  # a trained head stays the parameter --train_parts chose
        assert parts["head.weight"] is model.head.weight and model.head.weight.requires_grad
    # the quantized model still computes (and a cast does not dequantize it)
    model.float()
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)
    assert isinstance(model.get_submodule(next(iter(plan))).weight.quantized, torch.Tensor)


def test_quantize_linears_on_an_adapted_full_precision_model_matches_training_time_layers():
    """The merge verification quantizes base+adapter afterwards; that gives the layers training had."""
    sd = rwkv7_state_dict(vocab=256, n_layer=1, n_embd=64, head_size=16, seed=0)
    trained = load_model(sd, dtype=torch.float32)
    prepare_peft(trained, plan_adapters(trained, [], ("bone", {"r": 16})), quant="int8")
    later = load_model(sd, dtype=torch.float32)
    prepare_peft(later, plan_adapters(later, [], ("bone", {"r": 16})))
    quantize_linears(later, "int8")
    tokens = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(later(tokens), trained(tokens), rtol=0, atol=0)


def test_missing_library_is_one_error_line(tmp_path, monkeypatch, capsys):
    from rwkv_peft.commands import train

    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(sys.modules, "torchao", None)  # what `import torchao` meets without the package
    before = sorted(p.name for p in tmp_path.iterdir())
    assert train([*COMMON, "--quant", "nf4", "--proj_dir", "run"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--quant nf4 needs the torchao package" in errors[0] and "pip install" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_demo_over_an_nf4_base_learns_merges_and_loads_in_the_official_package(tmp_path):
    """train.py --quant nf4 on the embedded demo, merge.py with its verification, the official runtime."""
    run_script(tmp_path, "train.py", "--quant", "nf4", "--max_steps", "40", "--ctx_len", "128", "--micro_bsz", "4",
               "--proj_dir", "run")
    loss = losses(tmp_path / "run")
    assert sum(loss[-5:]) / 5 < 0.7 * sum(loss[:5]) / 5, loss
    assert read_adapter(tmp_path / "run/adapter.safetensors").quant == {"format": "nf4", "targets": "adapted"}

    proc = run_script(tmp_path, "merge.py", "--adapter", "run/adapter.safetensors")
    assert "verify: OK" in proc.stdout
    cost = re.search(r"quantization: the training-time model \(its base stored nf4\) differs from full-precision "
                     r"base\+adapter by ([0-9.e-]+) of the logit scale", proc.stdout)
    assert cost and 0 < float(cost.group(1)) < 0.5, proc.stdout

    merged = tmp_path / "run/merged.pth"
    tokens = [1, 20, 30, 40, 50, 60, 70, 80]
    official = run_official(7, [merged], tokens, [tmp_path / "official.pt"])[0]["full"]
    ours = load_model(merged, dtype=torch.float32)(torch.tensor([tokens]))[0]
    torch.testing.assert_close(official, ours, rtol=1e-4, atol=1e-4)


def test_unknown_recorded_quantization_is_refused_naming_the_file(tmp_path):
    """An adapter file recording a quantization this version does not know is refused on read."""
    from rwkv_peft import RWKVPeftError
    from rwkv_peft.peft.adapter_file import save_adapter

    methods = {"blocks.0.att.key": make_method("bone", IN, OUT, r=16)}
    path = tmp_path / "a.safetensors"
    save_adapter(path, methods, {}, {}, {"format": "fp3", "targets": "adapted"})
    with pytest.raises(RWKVPeftError, match=rf"adapter {re.escape(str(path))}: malformed rwkv_peft config "
                                            r"\(unknown quantization .*fp3"):
        read_adapter(path)
