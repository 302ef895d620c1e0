"""A Hugging Face RWKV-7 model directory, in the layout of the published RWKV-7 HF checkpoints
(model_type "rwkv7"): config.json, generation_config.json, model.safetensors (sharded above
SHARD_BYTES, with model.safetensors.index.json) and the tokenizer. No modeling code is shipped:
the directory is loaded by a package that implements the `rwkv7` type (rwkv7-hf, or
flash-linear-attention), and llama.cpp's convert_hf_to_gguf.py reads it as well.

Tokenizer: for the World vocabulary, its rwkv_vocab_v20230424.txt (from the installed `rwkv`
package) with a tokenizer_config.json naming RWKV7Tokenizer; for a Hugging Face tokenizer.json
(the demo), that file with a tokenizer_config.json for PreTrainedTokenizerFast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..data.tokenizer import HFTokenizer, WorldTokenizer
from ..errors import RWKVPeftError
from ..model.config import RWKVConfig, infer_config
from ..model.hf_names import from_hf, to_hf

SHARD_BYTES = 5 * 2**30  # transformers' default shard size
INDEX = "model.safetensors.index.json"
NORM_EPS = 1e-5  # the LayerNorms' eps; GroupNorm ln_x uses head_dim * NORM_EPS = 64e-5 as officially


def hf_config(config: RWKVConfig, dtype: torch.dtype, eos_id: int) -> dict:
    C, L = config.n_embd, config.n_layer
    return {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": C,
        "attention_hidden_size": C,
        "num_hidden_layers": L,
        "num_heads": config.n_head,
        "head_dim": config.head_size,
        "intermediate_size": config.dim_ffn,
        "hidden_ratio": config.dim_ffn / C,
        "decay_low_rank_dim": config.d_decay,
        "a_low_rank_dim": config.d_aaa,
        "v_low_rank_dim": config.d_mv,
        "gate_low_rank_dim": config.d_gate,
        "value_dim": [C] * L,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": NORM_EPS,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": eos_id,  # RWKV models start from the state, not from a BOS token
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def check_exportable(config: RWKVConfig, fmt: str) -> None:
    """What the HF and GGUF layouts cannot hold, refused before anything is written."""
    if config.version != 7 and fmt == "hf":
        raise RWKVPeftError(f"--format hf: this version exports RWKV-7 only (the model is RWKV-{config.version}); "
                            "use --format gguf or pth")
    if config.time_state:
        raise RWKVPeftError(f"--format {fmt}: the model holds a learned initial state (state tuning), which the "
                            f"{fmt} runtimes do not load; write it with --state_only and use it beside the base "
                            "(chat.py --state FILE), or merge to --format pth")
    if fmt == "hf" and config.head_size * NORM_EPS != 64e-5:
        raise RWKVPeftError(f"--format hf: head size {config.head_size} would change ln_x's eps (64e-5 "
                            "officially) in the rwkv7 layout; only head size 64 exports exactly")


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_hf(sd: dict[str, torch.Tensor], tokenizer, directory: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write the model sd (official keys) as an HF directory into directory (which exists)."""
    from safetensors.torch import save_file

    config = infer_config(sd)
    dtype = sd["emb.weight"].dtype
    hf = to_hf(sd)
    shards = _shards(hf, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, name)
        total = sum(t.numel() * t.element_size() for t in hf.values())
        _write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    eos = tokenizer.eos_id
    _write_json(directory / "config.json", hf_config(config, dtype, eos))
    _write_json(directory / "generation_config.json",
                {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos})
    write_tokenizer(tokenizer, directory)


def write_tokenizer(tokenizer, directory: Path) -> None:
    if isinstance(tokenizer, WorldTokenizer):
        shutil.copyfile(tokenizer.vocab_file, directory / "rwkv_vocab_v20230424.txt")
        _write_json(directory / "tokenizer_config.json", {"tokenizer_class": "RWKV7Tokenizer"})
    elif isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, directory / "tokenizer.json")
        eos = tokenizer.decode([tokenizer.eos_id])  # its text, e.g. <|endoftext|>
        _write_json(directory / "tokenizer_config.json",
                    {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos})
    else:
        raise RWKVPeftError(f"--tokenizer: cannot export tokenizer {tokenizer!r}; pass 'world' or a tokenizer.json")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_hf(directory: Path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of an HF directory written by write_hf, back in the official keys of template."""
    from safetensors.torch import load_file

    index = directory / INDEX
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    hf = {}
    for name in files:
        hf |= load_file(directory / name)
    return from_hf(hf, template)


def check_hf_dir(directory: Path, sd: dict[str, torch.Tensor]) -> None:
    """The sizes in config.json are the model's (the weights are checked by running them)."""
    config, written = infer_config(sd), json.loads((directory / "config.json").read_text())
    expected = hf_config(config, sd["emb.weight"].dtype, written.get("eos_token_id", 0))
    wrong = [k for k, v in expected.items() if written.get(k) != v]
    if wrong:
        raise RWKVPeftError(f"verify FAILED: {directory}/config.json has wrong {wrong[0]}; refusing to write it")
