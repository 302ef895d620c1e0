"""merge.py --format hf | gguf | peft (issue #21), each export proven by the other runtime's own code:

    hf     rwkv7-hf's RWKV7ForCausalLM (an independent pure-PyTorch RWKV-7), its own converter, and
           transformers' generate
    peft   Hugging Face peft's PeftModel on that model; adapters saved by peft are read back by --adapter DIR
    gguf   gguf's reader, against the tensor names, shapes and metadata keys of llama.cpp's RWKV-7 loader
           (src/models/rwkv7.cpp, src/llama-arch.cpp: facts written down here, not code). llama.cpp itself
           runs the file in bench/bench_export_llamacpp.py (it builds from source: too slow for CI).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from greedy_reference import greedy_tokens
from official_layout import rwkv6_state_dict, rwkv7_state_dict
from random_adapters import random_adapters
from rwkv_peft import load_model
from rwkv_peft.data.tokenizer import WorldTokenizer, load_tokenizer
from rwkv_peft.export.run import export_files
from rwkv_peft.io import load_tensor_file
from rwkv_peft.model.config import infer_config
from rwkv_peft.peft.adapter_file import describe_base, save_adapter
from tiny_workspace import clean_env, run_cases

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).parent.parent
DEMO_BASE = ROOT / "demo" / "base.pth"
DEMO_TOKENIZER = ROOT / "demo" / "tokenizer.json"
QUIET = {"log": lambda *a: None}

SETUPS = {  # name -> (default method, rules, train_parts)
    "lora": (("lora", {"r": 8, "alpha": 16}), "blocks.1.att.key=lora:4,alpha=3", ()),
    "pissa": (("pissa", {"r": 8, "svd_niter": 4}), "", ()),
    "bone": (("bone", {"r": 48}), "", ()),  # 128 % 48 != 0: a partial last block
    "bat": (("bat", {"r": 32}), "", ()),
    "mixed": (("bone", {"r": 32}), "blocks.0.*=none; blocks.*.att.key=lora:8,alpha=4; blocks.*.ffn.value=bat:32; "
              "head=lora:4", ("ln",)),
}


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


def make_adapter(sd, base_path, path, default, rules="", parts=(), seed=1, noise=0.02):
    """A model with nonzero random adapters saved as our adapter file; returns the adapted model (fp32)."""
    model, methods, part_params = random_adapters(sd, default, rules, parts, seed, noise)
    save_adapter(path, methods, part_params, describe_base(sd, model.config, base_path))
    return model.eval()


def world_base(seed=0):
    """A random RWKV-7 with the World vocabulary (head size 64, as every official RWKV-7)."""
    return rwkv7_state_dict(n_layer=2, n_embd=128, head_size=64, vocab=65536, seed=seed)


def tokens(vocab, length=40, seed=0):
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    torch.save(world_base(), d / "world.pth")
    return d


@pytest.fixture(scope="module")
def rwkv7_hf():
    return pytest.importorskip("rwkv7_hf")


# ------------------------------------------------------------------------------------------------
# hf


@pytest.fixture(scope="module")
def hf_exports(work):
    """Per setup: the demo base merged with it, as an official .pth and as an HF directory."""
    sd = load_tensor_file(DEMO_BASE)
    out = {}
    for name, (default, rules, parts) in SETUPS.items():
        adapter = work / f"{name}.safetensors"
        make_adapter(sd, DEMO_BASE, adapter, default, rules, parts)
        merged = export_files(None, str(adapter), str(work / f"{name}.pth"), **QUIET)
        directory = export_files(None, str(adapter), str(work / f"{name}-hf"), "hf", **QUIET)
        out[name] = (Path(merged), Path(directory))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_hf_directory_in_rwkv7_hf_gives_our_logits(rwkv7_hf, hf_exports, setup):
    merged, directory = hf_exports[setup]
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    theirs = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    x = tokens(1024)
    with torch.no_grad():
        ours = load_model(merged, dtype=torch.float32)(x)
        assert relative(ours, theirs(x).logits) < 1e-4


@pytest.mark.slow
def test_hf_generate_equals_our_greedy_generation(rwkv7_hf, hf_exports):
    merged, directory = hf_exports["bone"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)  # the tokenizer.json shipped in the directory
    ours_tok = load_tokenizer(DEMO_TOKENIZER)
    prompt = "User: What is the capital of France?\n\nAssistant:"
    ids = tok(prompt)["input_ids"]
    assert ids == ours_tok.encode(prompt)
    theirs = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = theirs.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    expected = greedy_tokens(load_model(merged, dtype=torch.float32), ids, 32, eos=ours_tok.eos_id)
    assert out[:len(expected)] == expected and len(expected) > 8
    assert out[len(expected):] in ([], [ours_tok.eos_id])  # generate keeps the end-of-text token it stopped at


def rwkv7_hf_convert(checkpoint: Path, output: Path, precision: str) -> Path:
    """rwkv7-hf's own converter (its command's options, thin layout: no code copied beside)."""
    import argparse

    from rwkv7_hf.converter import convert

    convert(argparse.Namespace(input=str(checkpoint), output=str(output), vocab_file=None, precision=precision,
                               attn_mode="chunk", adapter_layout="thin", runtime_package_version="0.9.0",
                               fuse_norm=False, max_shard_size="1000GB", low_memory=False))
    return output


@pytest.mark.slow
@pytest.mark.parametrize("which", ["world", "mixed"])
def test_hf_export_has_the_tensors_and_config_of_rwkv7_hf_converter(rwkv7_hf, work, hf_exports, which):
    """The random World model converted with no adapter (fp32), and the demo merged with the mixed
    setup (bf16): rwkv7-hf's converter, run on the same official .pth, makes the same tensors and sizes."""
    from safetensors.torch import load_file

    if which == "world":
        checkpoint, precision = work / "world.pth", "fp32"
        ours = Path(export_files(str(checkpoint), None, str(work / "world-hf"), "hf", **QUIET))
    else:
        (checkpoint, ours), precision = hf_exports["mixed"], "bf16"
    theirs = rwkv7_hf_convert(checkpoint, work / f"{which}-rwkv7hf", precision)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "intermediate_size",
                "decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim", "norm_eps",
                "attention_hidden_size", "value_dim", "model_type"):
        assert ca[key] == cb[key], key


@pytest.mark.slow
def test_hf_world_model_logits_and_tokenizer_in_rwkv7_hf(rwkv7_hf, work):
    ours = work / "world-hf"
    if not ours.exists():
        export_files(str(work / "world.pth"), None, str(ours), "hf", **QUIET)
    model = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    x = tokens(65536)
    with torch.no_grad():
        assert relative(load_model(work / "world.pth", dtype=torch.float32)(x), model(x).logits) < 1e-4
    text = "Hello, world! 你好 \n\n 12345 RWKV-7"
    assert rwkv7_hf.RWKV7Tokenizer.from_pretrained(ours).encode(text) == WorldTokenizer().encode(text)


def test_hf_sharded_above_the_limit_loads_in_rwkv7_hf(rwkv7_hf, work):
    from rwkv_peft.export.hf import INDEX, write_hf

    sd = load_tensor_file(DEMO_BASE)
    directory = work / "sharded"
    directory.mkdir()
    write_hf(sd, load_tokenizer(DEMO_TOKENIZER), directory, shard_bytes=200_000)
    index = json.loads((directory / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 3 and not (directory / "model.safetensors").exists()
    model = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    x = tokens(1024)
    with torch.no_grad():
        assert relative(load_model(sd, dtype=torch.float32)(x), model(x).logits) < 1e-4


# ------------------------------------------------------------------------------------------------
# peft


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["lora", "pissa", "bone"])
def test_peft_directory_in_hf_peft_gives_base_plus_adapter(rwkv7_hf, work, setup):
    peft = pytest.importorskip("peft")
    base_hf = work / "demo-hf"
    if not base_hf.exists():
        export_files(str(DEMO_BASE), None, str(base_hf), "hf", **QUIET)
    default, rules, parts = SETUPS[setup]
    sd = load_tensor_file(DEMO_BASE)
    adapter = work / f"peft-{setup}.safetensors"
    ours_model = make_adapter(sd, DEMO_BASE, adapter, default, rules, parts, seed=3)
    out = Path(export_files(None, str(adapter), str(work / f"peft-{setup}"), "peft", **QUIET))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("MISS" if setup == "bone" else "LORA")
    model = peft.PeftModel.from_pretrained(
        rwkv7_hf.RWKV7ForCausalLM.from_pretrained(base_hf, dtype=torch.float32), out).eval()
    x = tokens(1024)
    with torch.no_grad():
        assert relative(ours_model(x), model(x).logits) < 1e-4


def _randomize(model, names=("lora_B", "miss_block"), seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "rslora", "miss"])
def test_peft_adapter_saved_on_official_names_is_read_by_adapter_dir(work, kind):
    peft = pytest.importorskip("peft")
    sd = {k: v.float() for k, v in load_tensor_file(DEMO_BASE).items()}
    if kind == "miss":
        config = peft.MissConfig(r=32, target_modules=["receptance", "value"])
    else:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["key", "output", "head"],
                                 rank_pattern={"blocks.1.att.key": 2}, alpha_pattern={"head": 3},
                                 use_rslora=kind == "rslora")
    model = peft.get_peft_model(load_model(sd, dtype=torch.float32), config)
    _randomize(model)
    out = work / f"saved-{kind}"
    model.save_pretrained(out)
    x = tokens(1024)
    with torch.no_grad():
        expected = model.eval()(x)
        got = load_model(sd, adapter=out, dtype=torch.float32)(x)
    assert relative(expected, got) < 1e-5


@pytest.mark.slow
def test_peft_adapter_saved_on_the_hf_layout_merges_with_merge_py(rwkv7_hf, work):
    peft = pytest.importorskip("peft")
    base_hf = work / "demo-hf32"
    sd32 = {k: v.float() for k, v in load_tensor_file(DEMO_BASE).items()}
    torch.save(sd32, work / "demo32.pth")
    export_files(str(work / "demo32.pth"), None, str(base_hf), "hf", **QUIET)
    model = peft.get_peft_model(rwkv7_hf.RWKV7ForCausalLM.from_pretrained(base_hf, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=16, target_modules=["r_proj", "v_proj", "value"]))
    _randomize(model)
    model.save_pretrained(work / "hf-layout-lora")
    proc = subprocess.run([sys.executable, str(ROOT / "merge.py"), "--base", "demo32.pth", "--adapter",
                           "hf-layout-lora", "--output", "hf-layout-merged.pth"], cwd=work, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    x = tokens(1024)
    with torch.no_grad():
        assert relative(model.eval()(x).logits, load_model(work / "hf-layout-merged.pth")(x)) < 1e-5


# ------------------------------------------------------------------------------------------------
# gguf: what llama.cpp's RWKV-7 loader reads (src/models/rwkv7.cpp), written down from its source

GGUF_KEYS = ("general.architecture", "rwkv7.context_length", "rwkv7.embedding_length", "rwkv7.block_count",
             "rwkv7.feed_forward_length", "rwkv7.attention.layer_norm_epsilon", "rwkv7.wkv.head_size",
             "rwkv7.attention.decay_lora_rank", "rwkv7.attention.iclr_lora_rank",
             "rwkv7.attention.value_residual_mix_lora_rank", "rwkv7.attention.gate_lora_rank",
             "rwkv7.attention.head_count", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
             "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def llama_cpp_shapes(n_layer, C, V, ffn, d_w, d_a, d_v, d_g, H, N):
    """Every tensor llama.cpp's RWKV-7 loader creates, with its ggml ne (innermost first)."""
    s = {"token_embd.weight": (C, V), "token_embd_norm.weight": (C,), "token_embd_norm.bias": (C,),
         "output_norm.weight": (C,), "output_norm.bias": (C,), "output.weight": (C, V)}
    for i in range(n_layer):
        b = f"blk.{i}."
        d_value = d_a if i == 0 else d_v  # block 0: a dummy value mix of the iclr rank
        s |= {b + "attn_norm.weight": (C,), b + "attn_norm.bias": (C,), b + "attn_norm_2.weight": (C,),
              b + "attn_norm_2.bias": (C,), b + "time_mix_w0.weight": (C,), b + "time_mix_w1.weight": (C, d_w),
              b + "time_mix_w2.weight": (d_w, C), b + "time_mix_a0.weight": (C,), b + "time_mix_a1.weight": (C, d_a),
              b + "time_mix_a2.weight": (d_a, C), b + "time_mix_v0.weight": (C,),
              b + "time_mix_v1.weight": (C, d_value), b + "time_mix_v2.weight": (d_value, C),
              b + "time_mix_g1.weight": (C, d_g), b + "time_mix_g2.weight": (d_g, C),
              b + "time_mix_lerp_fused.weight": (C, 1, 1, 6), b + "time_mix_k_k.weight": (C,),
              b + "time_mix_k_a.weight": (C,), b + "time_mix_r_k.weight": (H * N,),
              b + "time_mix_key.weight": (C, C), b + "time_mix_value.weight": (C, C),
              b + "time_mix_receptance.weight": (C, C), b + "time_mix_ln.weight": (C,), b + "time_mix_ln.bias": (C,),
              b + "time_mix_output.weight": (C, C), b + "channel_mix_lerp_k.weight": (C,),
              b + "channel_mix_key.weight": (C, ffn), b + "channel_mix_value.weight": (ffn, C)}
    return s


def read_gguf_file(path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    return reader, fields, shapes


@pytest.mark.slow
def test_gguf_world_model_has_llama_cpp_names_shapes_metadata_and_vocab(work):
    pytest.importorskip("gguf")
    path = export_files(str(work / "world.pth"), None, str(work / "world.gguf"), "gguf", **QUIET)
    reader, fields, shapes = read_gguf_file(path)
    assert all(k in fields for k in GGUF_KEYS), [k for k in GGUF_KEYS if k not in fields]
    assert fields["general.architecture"] == "rwkv7" and fields["tokenizer.ggml.model"] == "rwkv"
    assert fields["rwkv7.wkv.head_size"] == 64 and fields["rwkv7.block_count"] == 2
    assert shapes == llama_cpp_shapes(2, 128, 65536, 512, 16, 12, 8, 20, 2, 64)
    # the World vocabulary as llama.cpp's rwkv tokenizer reads it: escaped byte strings, id 0 a control token
    toks = fields["tokenizer.ggml.tokens"]
    world = WorldTokenizer()
    assert len(toks) == 65536 and toks[0] == "<s>"
    for text, escaped in (("\n\n", "\\n\\n"), (" the", " the"), ("\t", "\\t")):
        assert toks[world.encode(text)[0]] == escaped
    # the values too, in llama.cpp's layout: lerp r,w,k,v,a,g stacked; low-rank matrices transposed
    t = {t.name: t.data for t in reader.tensors}
    sd = load_tensor_file(work / "world.pth")
    assert torch.equal(torch.from_numpy(t["blk.1.time_mix_lerp_fused.weight"].copy()).reshape(6, -1)[4],
                       sd["blocks.1.att.x_a"].reshape(-1))
    assert torch.equal(torch.from_numpy(t["blk.1.time_mix_w1.weight"].copy()), sd["blocks.1.att.w1"].T)
    assert torch.equal(torch.from_numpy(t["blk.1.time_mix_r_k.weight"].copy()), sd["blocks.1.att.r_k"].reshape(-1))


def test_gguf_demo_model_embeds_its_bpe_vocabulary_and_quantizes_as_llama_cpp(work):
    gguf = pytest.importorskip("gguf")
    path = export_files(str(DEMO_BASE), None, str(work / "demo.gguf"), "gguf", gguf_type="q8_0", **QUIET)
    reader, fields, shapes = read_gguf_file(path)
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.time_mix_key.weight"] == Q.Q8_0 and types["output.weight"] == Q.Q8_0
    # llama.cpp's quantizer keeps RWKV's small low-rank matrices and the stacked mixes unquantized
    assert types["blk.0.time_mix_w1.weight"] == Q.F32 and types["blk.0.time_mix_lerp_fused.weight"] == Q.F32
    spec = json.loads(DEMO_TOKENIZER.read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "bloom"
    assert fields["tokenizer.ggml.tokens"][:5] == sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)[:5]
    assert fields["tokenizer.ggml.merges"][0] == " ".join(spec["model"]["merges"][0])
    assert fields["tokenizer.ggml.eos_token_id"] == 0
    c = infer_config(load_tensor_file(DEMO_BASE))
    assert shapes == llama_cpp_shapes(c.n_layer, c.n_embd, c.vocab_size, c.dim_ffn, c.d_decay, c.d_aaa, c.d_mv,
                                      c.d_gate, c.n_head, c.head_size)


def llama_cpp_shapes_v6(n_layer, C, V, ffn, d_mix, d_decay, H, N):
    """Every tensor llama.cpp's RWKV-6 loader (src/models/rwkv6.cpp) creates, with its ggml ne."""
    s = {"token_embd.weight": (C, V), "token_embd_norm.weight": (C,), "token_embd_norm.bias": (C,),
         "output_norm.weight": (C,), "output_norm.bias": (C,), "output.weight": (C, V)}
    for i in range(n_layer):
        b = f"blk.{i}."
        s |= {b + "attn_norm.weight": (C,), b + "attn_norm.bias": (C,), b + "attn_norm_2.weight": (C,),
              b + "attn_norm_2.bias": (C,), b + "time_mix_w1.weight": (C, 5 * d_mix),
              b + "time_mix_w2.weight": (d_mix, C, 5), b + "time_mix_lerp_x.weight": (C, 1, 1),
              b + "time_mix_lerp_fused.weight": (C, 1, 1, 5), b + "time_mix_first.weight": (N, H),
              b + "time_mix_decay.weight": (C,), b + "time_mix_decay_w1.weight": (C, d_decay),
              b + "time_mix_decay_w2.weight": (d_decay, C), b + "time_mix_key.weight": (C, C),
              b + "time_mix_value.weight": (C, C), b + "time_mix_receptance.weight": (C, C),
              b + "time_mix_gate.weight": (C, C), b + "time_mix_ln.weight": (C,), b + "time_mix_ln.bias": (C,),
              b + "time_mix_output.weight": (C, C), b + "channel_mix_lerp_k.weight": (C, 1, 1),
              b + "channel_mix_lerp_r.weight": (C, 1, 1), b + "channel_mix_key.weight": (C, ffn),
              b + "channel_mix_value.weight": (ffn, C), b + "channel_mix_receptance.weight": (C, C)}
    return s


def test_gguf_rwkv6_has_llama_cpp_names_shapes_and_metadata(work):
    pytest.importorskip("gguf")
    sd = rwkv6_state_dict(n_layer=2, n_embd=64, head_size=16, vocab=1024, dims=(8, 16), seed=3)
    torch.save(sd, work / "v6.pth")
    path = export_files(str(work / "v6.pth"), None, str(work / "v6.gguf"), "gguf", tokenizer=str(DEMO_TOKENIZER),
                        **QUIET)
    reader, fields, shapes = read_gguf_file(path)
    assert fields["general.architecture"] == "rwkv6"
    for key in ("rwkv6.wkv.head_size", "rwkv6.time_mix_extra_dim", "rwkv6.time_decay_extra_dim",
                "rwkv6.attention.layer_norm_epsilon", "rwkv6.feed_forward_length", "rwkv6.block_count"):
        assert key in fields, key
    assert (fields["rwkv6.time_mix_extra_dim"], fields["rwkv6.time_decay_extra_dim"]) == (8, 16)
    ffn = sd["blocks.0.ffn.key.weight"].shape[0]
    assert shapes == llama_cpp_shapes_v6(2, 64, 1024, ffn, 8, 16, 4, 16)
    t = {t.name: t.data for t in reader.tensors}  # the 5 mixes stacked w,k,v,r,g; w2 as [5, C, D]
    assert torch.equal(torch.from_numpy(t["blk.1.time_mix_lerp_fused.weight"].copy()).reshape(5, -1)[3],
                       sd["blocks.1.att.time_maa_r"].reshape(-1))
    assert torch.equal(torch.from_numpy(t["blk.1.time_mix_w2.weight"].copy()), sd["blocks.1.att.time_maa_w2"].permute(0, 2, 1))


# ------------------------------------------------------------------------------------------------
# the command line: the quickstart's adapter with no other flags, conversion, and bad input


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """A workspace as after `python train.py --peft bone --bone_r 64`: out/run-1/adapter.safetensors,
    trained on the demo base it records."""
    d = tmp_path_factory.mktemp("quickstart")
    (d / "out" / "run-1").mkdir(parents=True)
    make_adapter(load_tensor_file(DEMO_BASE), DEMO_BASE, d / "out" / "run-1" / "adapter.safetensors",
                 ("bone", {"r": 64}))
    return d


def merge_py(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / "merge.py"), *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,name", [("hf", "merged-hf"), ("gguf", "merged.gguf"), ("peft", "peft-adapter")])
def test_quickstart_adapter_exports_with_no_other_flags(quickstart, fmt, name):
    proc = merge_py(quickstart, "--format", fmt)
    assert proc.returncode == 0, proc.stderr
    # merged and checked against base + adapter, then the written file read back and run (peft: no merge)
    assert proc.stdout.count("verify: OK") == (1 if fmt == "peft" else 2) and "next:" in proc.stdout
    assert (quickstart / "out" / "run-1" / name).exists()
    assert not list(quickstart.rglob("*.tmp"))


@pytest.mark.slow
def test_conversion_with_no_adapter(work):
    proc = merge_py(work, "--base", "world.pth", "--format", "safetensors", "--output", "world.safetensors")
    assert proc.returncode == 0, proc.stderr
    a, b = load_tensor_file(work / "world.pth"), load_tensor_file(work / "world.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)


BAD = {  # name -> (args, expected in the one error line)
    "unknown format": (["--adapter", "bat.safetensors", "--format", "onnx"], "--format onnx: unknown format"),
    "unknown gguf type": (["--adapter", "bat.safetensors", "--format", "gguf", "--gguf_type", "q4_k"],
                          "--gguf_type q4_k: unknown type"),
    "bat as peft": (["--adapter", "bat.safetensors", "--format", "peft", "--output", "p"],
                    "Bat has no exact peft form"),
    "whole tensors as peft": (["--adapter", "mixed.safetensors", "--format", "peft", "--output", "p"],
                              "also trains whole tensors or a state"),
    "two methods as peft": (["--adapter", "two.safetensors", "--format", "peft", "--output", "p"],
                            "the adapter mixes bone, lora"),
    "state as hf": (["--adapter", "state.safetensors", "--format", "hf", "--output", "s-hf"],
                    "holds a learned initial state"),
    "existing output dir": (["--adapter", "bat.safetensors", "--format", "hf", "--output", "full"],
                            "--output full is a non-empty directory"),
    "peft dir of IA3": (["--base", "base.pth", "--adapter", "ia3", "--output", "m.pth"],
                        "peft_type IA3 is not supported"),
    "peft dir of MiSS bat": (["--base", "base.pth", "--adapter", "missbat", "--output", "m.pth"],
                             "MiSS's bat mode indexes its blocks by output block"),
    "peft dir on another base": (["--base", "world.pth", "--adapter", "lora-dir", "--output", "m.pth"],
                                 "but base world.pth needs"),
    "gguf of a word-level tokenizer": (["--base", "base.pth", "--format", "gguf", "--tokenizer", "word.json",
                                        "--output", "m.gguf"], "is not a byte-level BPE tokenizer"),
    "RWKV-6 as hf": (["--base", "v6.pth", "--format", "hf", "--output", "v6-hf"], "exports RWKV-7 only"),
    "gguf output named otherwise": (["--adapter", "bat.safetensors", "--format", "gguf", "--output", "m.bin"],
                                    "does not end in .gguf"),
}


@pytest.fixture(scope="module")
def bad_outcomes(tmp_path_factory):
    """Every BAD case through merge.py's main in one process (tests/script_cases.py)."""
    d = tmp_path_factory.mktemp("bad")
    sd = load_tensor_file(DEMO_BASE)
    shutil.copy(DEMO_BASE, d / "base.pth")
    torch.save(world_base(), d / "world.pth")
    torch.save(rwkv6_state_dict(), d / "v6.pth")
    make_adapter(sd, d / "base.pth", d / "bat.safetensors", ("bat", {"r": 32}))
    make_adapter(sd, d / "base.pth", d / "mixed.safetensors", *SETUPS["mixed"])
    make_adapter(sd, d / "base.pth", d / "two.safetensors", ("bone", {"r": 32}), "blocks.*.att.key=lora:8")
    make_adapter(sd, d / "base.pth", d / "state.safetensors", None, "", ("state",))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "cat": 2}, unk_token="[UNK]")).save(str(d / "word.json"))
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("mine")
    for name, config, tensors in (
            ("ia3", {"peft_type": "IA3"}, {"base_model.model.blocks.0.att.key.ia3_l": torch.ones(128, 1)}),
            ("missbat", {"peft_type": "MISS", "init_weights": "bat", "r": 32},
             {"base_model.model.blocks.0.att.key.miss_block": torch.zeros(4, 32, 32)}),
            ("lora-dir", {"peft_type": "LORA", "r": 4, "lora_alpha": 8},
             {"base_model.model.blocks.0.att.key.lora_A.weight": torch.zeros(4, 128),
              "base_model.model.blocks.0.att.key.lora_B.weight": torch.zeros(256, 4)})):
        from safetensors.torch import save_file

        (d / name).mkdir()
        (d / name / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, d / name / "adapter_model.safetensors")
    cases = [(name, "merge", args) for name, (args, _) in BAD.items()]
    return run_cases(d, cases)


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD)
def test_bad_export_input_fails_with_one_line_and_writes_nothing(bad_outcomes, case):
    out = bad_outcomes[case]
    errors = [line for line in out["stderr"].splitlines() if line.startswith("error:")]
    assert out["code"] == 2, out["stderr"][-2000:]
    assert len(errors) == 1 and BAD[case][1] in errors[0], out["stderr"][-2000:]
    assert out["new"] == [] and out["gone"] == []
