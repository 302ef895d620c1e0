"""Folding an adapter into a plain official checkpoint, and checking the result.

Each layer's delta comes from the same method object that trained it (`method.delta`),
computed in fp32 and cast to the base dtype once.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from tqdm import tqdm

from ..cli import command
from ..errors import RWKVPeftError
from .load import load_model
from ..model.time_state import is_state_key, state_parts
from .adapt import quantize_linears
from .adapter_file import Adapter
from .methods import make_method

# relative tolerance (max |logit diff| / max |logit|) of verify, by the dtype the merge is stored in
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@torch.no_grad()
def merge_adapter(base_sd: Mapping[str, torch.Tensor], adapter: Adapter, *, progress: bool = False) -> dict:
    """base + every layer's delta (and the trained whole tensors), in the base's dtypes and keys."""
    merged = dict(base_sd)
    layers = tqdm(adapter.layers.items(), desc="merging", unit="layer", disable=not progress)
    for module, (name, hparams) in layers:
        key = f"{module}.weight"
        W = base_sd[key]
        method = make_method(name, W.shape[1], W.shape[0], **hparams)
        method.load_tensors(adapter.tensors.get(module, {}), f"{adapter.source} at {module}")
        merged[key] = (W.float() + method.delta(W.float())).to(W.dtype)
    for key, t in adapter.parts.items():  # a learned state stays fp32, as state-tuned files keep it
        merged[key] = t.float() if is_state_key(key) else t.to(base_sd[key].dtype)
    return merged


def probe_tokens(vocab_size: int, length: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def verify_merge(base_sd, adapter: Adapter, merged_sd, tokens: torch.Tensor) -> tuple[float, float, float | None]:
    """Run base+adapter (unmerged) and the merged checkpoint in fp32 on tokens.

    Returns (max |logit difference|, max |logit|, and for an adapter trained over a quantized
    base the max |logit difference| of that training-time model, else None).
    """
    adapted = load_model(base_sd, adapter=adapter, dtype=torch.float32)
    expected = adapted(tokens)
    quantized_diff = None
    if adapter.quant:  # the same model with its frozen weights quantized as in training
        quantize_linears(adapted, adapter.quant["format"], adapter.quant.get("targets", "adapted"))
        quantized_diff = (adapted(tokens) - expected).abs().max().item()
    del adapted
    merged = load_model(merged_sd, dtype=torch.float32)
    got = merged(tokens)
    return (got - expected).abs().max().item(), expected.abs().max().item(), quantized_diff


def check_merge(base_sd, adapter: Adapter, merged_sd, dtype: torch.dtype) -> str:
    """verify_merge against the dtype's tolerance: a report line, or RWKVPeftError beyond it."""
    tokens = probe_tokens(base_sd["emb.weight"].shape[0])
    diff, scale, quantized_diff = verify_merge(base_sd, adapter, merged_sd, tokens)
    rel, tol = diff / max(scale, 1e-12), TOLERANCE.get(dtype, 5e-2)
    figures = (f"logits differ by {rel:.2g} of their scale, tolerance {tol:g} for "
               f"{str(dtype).removeprefix('torch.')} (max |difference| {diff:.3g}, max |logit| {scale:.3g})")
    if not rel <= tol:
        raise RWKVPeftError(f"verify FAILED: the merged model does not match base+adapter: {figures}; "
                            "refusing to write the merged file")
    report = f"verify: OK, the merged model matches base+adapter: {figures}"
    if quantized_diff is not None:
        report += (f"\nquantization: the training-time model (its base stored {adapter.quant['format']}) differs from "
                   f"full-precision base+adapter by {quantized_diff / max(scale, 1e-12):.2g} of the logit scale (max "
                   f"|difference| {quantized_diff:.3g}); the merged file holds the full-precision base + adapter")
    return report


def newest_adapter(root: str = "out") -> str:
    """The most recently written adapter file under root (what a bare `merge.py` merges);
    checkpoints saved as .safetensors (model.safetensors, merged.safetensors) are not adapters."""
    from pathlib import Path

    found = [p for p in Path(root).rglob("*.safetensors")
             if p.name.startswith("adapter") or p.parent.name == "adapters"]
    found.sort(key=lambda p: p.stat().st_mtime)
    if not found:
        raise RWKVPeftError(f"no adapter (*.safetensors) found under {root}/; train one first, "
                            "or pass --adapter FILE")
    return str(found[-1])


def _protected_inputs(adapter: Adapter, adapter_path: str, base: str | None, pissa_init: str | None = None) -> dict:
    """What an output must not be: the command's inputs, and the base the adapter records."""
    return {"--adapter": adapter_path, "--base": base, "--pissa_init": pissa_init,
            "the base the adapter was trained on": (adapter.base or {}).get("path")}


def merge_files(base: str | None, adapter_path: str, output: str | None, *, verify: bool = True,
                lora_alpha: float | None = None, pissa_init: str | None = None, log=print) -> str:
    """Merge adapter_path into base and write output atomically; returns the output path.

    base None: the base recorded in the adapter. output None: merged.pth beside the adapter.
    Everything that can be checked is checked before the merge starts: the output is none of the
    inputs, its directory is writable and has room for it. The merged weights are checked to be
    finite before they are written, with or without verify.
    """
    from pathlib import Path

    from ..io import (check_checkpoint_suffix, check_finite, check_not_inputs, check_output_file, load_tensor_file,
                      save_checkpoint_file, tensor_bytes)
    from .adapter_file import check_base, read_adapter, recorded_base

    output = output or str(Path(adapter_path).with_name("merged.pth"))
    check_checkpoint_suffix(output, "--output")
    adapter = read_adapter(adapter_path, lora_alpha=lora_alpha, pissa_init=pissa_init)
    if base is None:
        base = recorded_base(adapter, adapter_path, "pass --base FILE")
    check_not_inputs({"--output": output}, _protected_inputs(adapter, adapter_path, base, pissa_init))
    # the merged file takes about what the base file does (plus a learned state it may lack)
    size = os.path.getsize(base) + tensor_bytes(adapter.parts) if os.path.isfile(base) else None
    check_output_file(output, f"--output {output}", size=size)
    log(f"base:    {base}\nadapter: {adapter_path} ({len(adapter.layers)} adapted layers, "
        f"{len(adapter.parts)} whole tensors)")
    base_sd = load_tensor_file(base)  # refuses NaN and Inf, naming the tensor
    check_base(adapter, base_sd, base)
    merged = merge_adapter(base_sd, adapter, progress=True)
    changed = {f"{module}.weight" for module in adapter.layers} | set(adapter.parts)
    check_finite({k: merged[k] for k in sorted(changed)}, f"the merge of {adapter_path} into {base}",
                 f"the adapted weights do not fit the base's number format; nothing was written to {output}")
    if verify:
        log(check_merge(base_sd, adapter, merged, base_sd["emb.weight"].dtype))
    save_checkpoint_file(merged, output, "--output")
    log(f"wrote {output}")
    return output


def write_state_only(adapter_path: str, output: str | None, base: str | None = None, log=print) -> str:
    """Write just the adapter's learned initial state (blocks.<i>.att.time_state) as a state file:
    what desktop runtimes load beside an unchanged base. base, if given, is checked to fit."""
    from pathlib import Path

    from ..io import check_checkpoint_suffix, check_not_inputs, check_output_file, load_tensor_file
    from ..model.config import infer_config
    from ..model.time_state import check_states, save_state_file
    from .adapter_file import read_adapter

    output = output or str(Path(adapter_path).with_name("state.pth"))
    check_checkpoint_suffix(output, "--output")
    adapter = read_adapter(adapter_path)
    states = state_parts(adapter.parts)
    if not states:
        raise RWKVPeftError(f"--state_only: {adapter_path} holds no learned state (blocks.<i>.att.time_state); "
                            "train one with --train_parts state")
    check_not_inputs({"--output": output}, _protected_inputs(adapter, adapter_path, base))
    check_output_file(output, f"--output {output}")
    version = (adapter.base or {}).get("version")
    if base is not None:
        base_sd = load_tensor_file(base)
        try:
            config = infer_config(base_sd)
        except RWKVPeftError as e:
            raise RWKVPeftError(f"--base {base}: {e}") from None
        check_states(states, config, adapter_path, adapter.base)
        version = config.version
    others = len(adapter.layers) + len(adapter.parts) - len(states)
    if others:
        log(f"note: the adapter's {others} other trained layers or tensors are not part of a state file; "
            "merge without --state_only to keep them")
    save_state_file(output, states, version)
    log(f"wrote {output}: the initial state of {len(states)} layers")
    log(f"next: {command('chat')} --model {base or (adapter.base or {}).get('path') or 'BASE.pth'} --state {output}")
    return output
