"""A GGUF file for llama.cpp (and Ollama) with the `gguf` package, llama.cpp's own Python writer.

Names, shapes and metadata are those llama.cpp's RWKV-7 and RWKV-6 loaders read
(src/models/rwkv7.cpp, rwkv6.cpp). RWKV-7: the six token-shift mixes r,w,k,v,a,g stacked as
time_mix_lerp_fused [6, 1, 1, C], the low-rank matrices transposed to [out, in] like every
other weight, [1, 1, C] vectors flat; block 0 must carry value-mix tensors although it never
uses them: a copy of its a0/a1/a2 (the shape llama.cpp expects there). RWKV-6: the mixes
w,k,v,r,g stacked [5, 1, 1, C], time_maa_w2 as [5, C, D].

Vocabulary: the World vocabulary as llama.cpp's "rwkv" tokenizer reads it (id 0 a control
token, every other token as its Python bytes-literal text, unused ids padded); a Hugging Face
byte-level BPE tokenizer.json as a "gpt2" vocabulary with its merges, and the llama.cpp
pre-tokenizer ("tokenizer.ggml.pre") that splits text as it does: GPT-2's own for GPT-2's rule;
for the demo's rule, which llama.cpp does not have, "bloom", the one that reproduced the demo's
ids on every demo chat when all of llama.cpp's were tried (bench/README.md); it still splits
runs of spaces differently. Any other split rule is refused: use --format hf.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..data.tokenizer import HFTokenizer, WorldTokenizer, parse_world_vocab
from ..errors import RWKVPeftError
from ..model.config import infer_config
from .hf import NORM_EPS

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# a tokenizer.json's split rule -> llama.cpp's pre-tokenizer for it (None: GPT-2's ByteLevel regex)
_PRE = {None: "gpt-2",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\n+|[^\S\n]+": "bloom"}  # demo/make_base.py
LERP_V7 = ("r", "w", "k", "v", "a", "g")  # the order of time_mix_lerp_fused
LERP_V6 = ("w", "k", "v", "r", "g")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise RWKVPeftError("--format gguf needs the gguf package (llama.cpp's writer): pip install gguf") from None
    return gguf


def tensor_plan(config) -> list[tuple[str, tuple[str, ...], str]]:
    """(llama.cpp tensor, our official keys, how) for every tensor of the GGUF file. how: "same",
    "T" (transposed), "flat", "perm" (RWKV-6 time_maa_w2: [5, D, C] -> [5, C, D]) or "stack"
    (several [1, 1, C] mixes stacked as [n, 1, 1, C])."""
    plan = [("token_embd.weight", ("emb.weight",), "same"), ("output.weight", ("head.weight",), "same")]
    plan += [(f"token_embd_norm.{s}", (f"blocks.0.ln0.{s}",), "same") for s in ("weight", "bias")]
    plan += [(f"output_norm.{s}", (f"ln_out.{s}",), "same") for s in ("weight", "bias")]
    for i in range(config.n_layer):
        b, blk = f"blocks.{i}.", f"blk.{i}."
        for ours, theirs in (("ln1", "attn_norm"), ("ln2", "attn_norm_2"), ("att.ln_x", "time_mix_ln")):
            plan += [(f"{blk}{theirs}.{s}", (f"{b}{ours}.{s}",), "same") for s in ("weight", "bias")]
        linears = ["key", "value", "receptance", "output"] + (["gate"] if config.version == 6 else [])
        plan += [(f"{blk}time_mix_{x}.weight", (f"{b}att.{x}.weight",), "same") for x in linears]
        plan += [(f"{blk}channel_mix_{x}.weight", (f"{b}ffn.{x}.weight",), "same")
                 for x in (("key", "value") if config.version == 7 else ("key", "value", "receptance"))]
        plan += _block_plan_v7(b, blk, i) if config.version == 7 else _block_plan_v6(b, blk)
    return plan


def _block_plan_v7(b: str, blk: str, i: int) -> list:
    plan = [(blk + "time_mix_lerp_fused.weight", tuple(f"{b}att.x_{x}" for x in LERP_V7), "stack"),
            (blk + "channel_mix_lerp_k.weight", (b + "ffn.x_k",), "flat")]
    for x in ("w", "a", "v", "g"):
        src = "a" if x == "v" and i == 0 else x  # block 0's unused value mix: a stand-in of the expected shape
        if x != "g":
            plan.append((f"{blk}time_mix_{x}0.weight", (f"{b}att.{src}0",), "flat"))
        plan += [(f"{blk}time_mix_{x}{n}.weight", (f"{b}att.{src}{n}",), "T") for n in (1, 2)]
    plan += [(f"{blk}time_mix_{x}.weight", (f"{b}att.{x}",), "flat") for x in ("k_k", "k_a", "r_k")]
    return plan


def _block_plan_v6(b: str, blk: str) -> list:
    return [(blk + "time_mix_lerp_x.weight", (b + "att.time_maa_x",), "same"),
            (blk + "time_mix_lerp_fused.weight", tuple(f"{b}att.time_maa_{x}" for x in LERP_V6), "stack"),
            (blk + "time_mix_w1.weight", (b + "att.time_maa_w1",), "T"),
            (blk + "time_mix_w2.weight", (b + "att.time_maa_w2",), "perm"),
            (blk + "time_mix_first.weight", (b + "att.time_faaaa",), "same"),
            (blk + "time_mix_decay.weight", (b + "att.time_decay",), "flat"),
            (blk + "time_mix_decay_w1.weight", (b + "att.time_decay_w1",), "T"),
            (blk + "time_mix_decay_w2.weight", (b + "att.time_decay_w2",), "T"),
            (blk + "channel_mix_lerp_k.weight", (b + "ffn.time_maa_k",), "same"),
            (blk + "channel_mix_lerp_r.weight", (b + "ffn.time_maa_r",), "same")]


def gguf_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model sd (official keys) as llama.cpp's tensors, fp32, in torch's [out, in] order."""
    out = {}
    for name, keys, how in tensor_plan(infer_config(sd)):
        t = sd[keys[0]].float()
        if how == "stack":
            t = torch.stack([sd[k].float().reshape(1, 1, -1) for k in keys])
        elif how == "T":
            t = t.T
        elif how == "flat":
            t = t.reshape(-1)
        elif how == "perm":
            t = t.permute(0, 2, 1)
        out[name] = t.contiguous()
    return out


def official_from_gguf(tensors: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> dict:
    """The inverse of gguf_tensors, into template's keys and shapes (a key the file does not
    hold, such as block 0's unused value mix, keeps the template's tensor)."""
    back = {}
    for name, keys, how in tensor_plan(infer_config(template)):
        t = tensors[name]
        if how == "stack":
            back |= {k: t[j] for j, k in enumerate(keys)}
        else:
            back[keys[0]] = t.T if how == "T" else t.permute(0, 2, 1) if how == "perm" else t
    return {k: back[k].reshape(ref.shape) if k in back else ref for k, ref in template.items()}


def _storage_type(name: str, t: torch.Tensor, gguf_type: str, gguf):
    """Matrices in the asked type (q8_0 where rows split into its 32-value blocks, else f16);
    vectors, norms, the stacked mixes and the small low-rank matrices (the decay's above all is
    sensitive) stay f32, as llama.cpp's own converter and quantizer keep them."""
    Q = gguf.GGMLQuantizationType
    if gguf_type == "f32" or t.dim() != 2 or re.search(r"time_mix_([wavg][12]|decay_w[12]|first)\.", name):
        return Q.F32
    if gguf_type == "q8_0":
        return Q.Q8_0 if t.shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[gguf_type]


def _world_vocab(tokenizer: WorldTokenizer, vocab_size: int, gguf):
    """(tokenizer model, pre-tokenizer, tokens, token types, merges, end-of-turn id) for the GGUF."""
    vocab = parse_world_vocab(Path(tokenizer.vocab_file).read_text(encoding="utf-8"), str(tokenizer.vocab_file))
    T = gguf.TokenType
    tokens, types = [b"<s>"], [T.CONTROL]  # id 0: end of text, not in the file
    for i in range(1, vocab_size):
        if i in vocab:
            # llama.cpp's rwkv tokenizer un-escapes each token from its bytes-literal text
            tokens.append(repr(vocab[i])[2:-1].encode("utf-8"))
            types.append(T.NORMAL)
        else:
            tokens.append(f"[PAD{i}]".encode())
            types.append(T.UNUSED)
    double_newline = next((i for i, t in vocab.items() if t == b"\n\n"), None)
    return "rwkv", None, tokens, types, [], double_newline


def _bpe_vocab(tokenizer: HFTokenizer, vocab_size: int, gguf):
    spec = json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise RWKVPeftError(f"--format gguf: {tokenizer.path} is not a byte-level BPE tokenizer, which is the only "
                            "Hugging Face kind this export writes; use --format hf")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    by_id |= {a["id"]: a["content"] for a in spec.get("added_tokens", [])}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(T.CONTROL if i in special else T.NORMAL if i in by_id else T.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _PRE.get(_split_rule(spec.get("pre_tokenizer") or {}), "")
    if not pre:
        raise RWKVPeftError(f"--format gguf: llama.cpp has no pre-tokenizer known to split text as {tokenizer.path} "
                            "does; use --format hf")
    return "gpt2", pre, tokens, types, merges, None


def _split_rule(pre: dict) -> str | None:
    """The regex of a ByteLevel tokenizer's pre-tokenizer: None for ByteLevel's own (GPT-2's),
    "" when it is anything else."""
    if pre.get("type") == "ByteLevel":
        return None if pre.get("use_regex", True) else ""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return steps[0].get("pattern", {}).get("Regex", "")
    return ""


def write_gguf(sd: dict[str, torch.Tensor], tokenizer, path: str | os.PathLike, gguf_type: str = "f32") -> None:
    """Write the model sd (official RWKV-7 keys) as a GGUF file at path."""
    gguf = _gguf()
    config = infer_config(sd)
    writer = gguf.GGUFWriter(str(path), f"rwkv{config.version}")
    writer.add_context_length(1048576)  # a recurrent model: no context limit
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_layer_norm_eps(NORM_EPS)
    writer.add_wkv_head_size(config.head_size)
    if config.version == 7:
        writer.add_decay_lora_rank(config.d_decay)
        writer.add_iclr_lora_rank(config.d_aaa)
        writer.add_value_residual_mix_lora_rank(config.d_mv)
        writer.add_gate_lora_rank(config.d_gate)
    else:
        writer.add_time_mix_extra_dim(config.d_mix)
        writer.add_time_decay_extra_dim(config.d_decay)
        writer.add_rescale_every_n_layers(0)  # official weights are stored unscaled
    writer.add_feed_forward_length(config.dim_ffn)
    writer.add_head_count(0)  # llama.cpp requires the key; RWKV has no attention heads
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    if isinstance(tokenizer, WorldTokenizer):
        model, pre, tokens, types, merges, eot = _world_vocab(tokenizer, config.vocab_size, gguf)
    elif isinstance(tokenizer, HFTokenizer):
        model, pre, tokens, types, merges, eot = _bpe_vocab(tokenizer, config.vocab_size, gguf)
    else:
        raise RWKVPeftError(f"--format gguf: cannot embed tokenizer {tokenizer!r}")
    writer.add_tokenizer_model(model)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(False)
    if eot is not None:  # a chat turn ends at "\n\n"
        writer.add_eot_token_id(eot)
        writer.add_chat_template("rwkv-world")  # llama.cpp's built-in template of this name
    for name, t in gguf_tensors(sd).items():
        qtype = _storage_type(name, t, gguf_type, gguf)
        data = t.numpy()
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: str | os.PathLike, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GGUF file written by write_gguf, read with gguf's reader and dequantized, in template's keys."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]  # the reader lists ggml's ne, innermost first
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
    return official_from_gguf(tensors, template)

