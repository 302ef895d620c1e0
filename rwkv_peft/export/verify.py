"""The checks every export runs on what it wrote, before it reports success."""

from __future__ import annotations


import torch

from ..errors import RWKVPeftError
from ..peft.load import load_model
from ..peft.merge import probe_tokens

ADAPTER_TOLERANCE = 1e-4  # fp32 on both sides: only the order of operations differs


def _compare(expected: torch.Tensor, got: torch.Tensor, tol: float, what: str) -> str:
    diff, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    rel = diff / max(scale, 1e-12)
    figures = f"{rel:.2g} of their scale, tolerance {tol:g} (max |difference| {diff:.3g}, max |logit| {scale:.3g})"
    if not rel <= tol:
        raise RWKVPeftError(f"verify FAILED: {what} read back does not give the model's logits: {figures}; "
                            "refusing to write it")
    return f"verify: OK, {what} read back gives the model's logits to {figures}"


@torch.no_grad()
def check_logits(expected_sd, got_sd, tol: float, what: str) -> str:
    """Run both state dicts in fp32 on the probe sequence: a report line, or RWKVPeftError beyond tol."""
    tokens = probe_tokens(expected_sd["emb.weight"].shape[0])
    expected = load_model(expected_sd, dtype=torch.float32)(tokens)
    return _compare(expected, load_model(got_sd, dtype=torch.float32)(tokens), tol, what)


@torch.no_grad()
def check_adapted_logits(base_sd, adapter, got_adapter, what: str) -> str:
    """base + adapter against base + got_adapter (both unmerged, fp32) on the probe sequence."""
    tokens = probe_tokens(base_sd["emb.weight"].shape[0])
    expected = load_model(base_sd, adapter=adapter, dtype=torch.float32)(tokens)
    got = load_model(base_sd, adapter=got_adapter, dtype=torch.float32)(tokens)
    return _compare(expected, got, ADAPTER_TOLERANCE, what)
