"""The adapter unmerged, as a Hugging Face peft adapter directory for the model that --format hf
writes (module names of the Hugging Face RWKV-7 layout):

    LoRA    a LoraConfig adapter; per-layer ranks and alphas as rank_pattern / alpha_pattern
    PiSSA   the rank-2r LoRA of its delta on the original base: [B, -B0] [A; A0] = B A - B0 A0
            (how peft itself converts a PiSSA adapter for sharing)
    Bone    a MissConfig adapter (MiSS's default mode computes Bone exactly)
    Bat     refused: MiSS's bat mode indexes its blocks by output block, ours by input block

One peft config holds one method, so an adapter mixing methods, or training whole tensors or
a state, is refused with the line saying to merge instead.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from ..errors import RWKVPeftError
from ..io import check_not_inputs
from ..model.hf_names import linear_to_hf
from ..peft.hf_peft_dir import CONFIG, WEIGHTS
from .files import write_dir_atomic

_MERGE_INSTEAD = "merge it instead (--format hf or pth)"


def peft_method(adapter) -> str:
    """The one method of the adapter, as peft names it; RWKVPeftError when peft cannot hold it."""
    if adapter.parts:
        raise RWKVPeftError(f"--format peft: {adapter.source} also trains whole tensors or a state "
                            f"({sorted(adapter.parts)[0]}, ...), which a peft adapter cannot hold; {_MERGE_INSTEAD}")
    methods = {name for name, _ in adapter.layers.values()}
    if "bat" in methods:
        raise RWKVPeftError(f"--format peft: Bat has no exact peft form (MiSS's bat mode indexes its blocks by "
                            f"output block, rwkv-peft's by input block); {_MERGE_INSTEAD}")
    kinds = {"lora" if m in ("lora", "pissa") else m for m in methods}
    if len(kinds) != 1:
        raise RWKVPeftError(f"--format peft: the adapter mixes {', '.join(sorted(methods))}, and one peft adapter "
                            f"holds one method; {_MERGE_INSTEAD}")
    return "LORA" if kinds == {"lora"} else "MISS"


def _pattern(values: dict[str, float | int]) -> tuple[float | int, dict]:
    """The commonest value, and a pattern (exact module names) for the layers that differ."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(m): v for m, v in values.items() if v != common}


def peft_tensors(adapter) -> tuple[dict, dict]:
    """(adapter_config.json, adapter_model.safetensors tensors) for the adapter."""
    kind = peft_method(adapter)
    tensors, ranks, alphas = {}, {}, {}
    for module, (method, hparams) in adapter.layers.items():
        name, t = linear_to_hf(module), adapter.tensors[module]
        prefix = f"base_model.model.{name}"
        if method == "bone":
            tensors[f"{prefix}.miss_block"] = t["bone"].contiguous()
            ranks[name] = hparams["r"]
            continue
        A, B = t["lora_A"].float(), t["lora_B"].float()
        if method == "pissa":  # W + B A - B0 A0: a LoRA of rank 2r and scale 1 on the original W
            A, B = torch.cat([A, t["init_A"].float()]), torch.cat([B, -t["init_B"].float()], dim=1)
            ranks[name], alphas[name] = A.shape[0], float(A.shape[0])
        else:
            ranks[name], alphas[name] = hparams["r"], hparams["alpha"]
        tensors[f"{prefix}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
    r, rank_pattern = _pattern(ranks)
    config = {"peft_type": kind, "task_type": "CAUSAL_LM", "target_modules": sorted(ranks), "r": r,
              "inference_mode": True, "base_model_name_or_path": None, "bias": "none", "modules_to_save": None}
    if kind == "MISS":
        if rank_pattern:
            raise RWKVPeftError(f"--format peft: the Bone layers have different ranks ({sorted(set(ranks.values()))}), "
                                f"which MissConfig cannot express; {_MERGE_INSTEAD}")
        config |= {"init_weights": True, "miss_dropout": 0.0}
    else:
        alpha, alpha_pattern = _pattern(alphas)
        config |= {"lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                   "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                   "init_lora_weights": True}
    return config, tensors


def export_peft(base: str | None, adapter_path: str, output: str, *, verify: bool = True,
                lora_alpha: float | None = None, pissa_init: str | None = None, log=print) -> str:
    """Write the adapter as a peft directory; verified by reading it back (peft/hf_peft_dir.py) and
    running base + that adapter against base + the original."""
    from ..io import load_tensor_file
    from ..peft.adapter_file import check_base, read_adapter, recorded_base
    from .verify import check_adapted_logits

    adapter = read_adapter(adapter_path, lora_alpha=lora_alpha, pissa_init=pissa_init)
    config, tensors = peft_tensors(adapter)
    check_not_inputs({"--output": output}, {"--adapter": adapter_path, "--base": base, "--pissa_init": pissa_init})
    base_sd = None
    if verify:
        base = base or recorded_base(adapter, adapter_path, "pass --base FILE (to verify) or --no_verify")
        base_sd = load_tensor_file(base)
        check_base(adapter, base_sd, base)

    def fill(directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if verify:
            log(check_adapted_logits(base_sd, adapter, read_adapter(directory), "the peft adapter directory"))

    write_dir_atomic(output, fill)
    log(f"wrote {output}: a peft {config['peft_type']} adapter on {len(adapter.layers)} layers of the Hugging Face "
        "RWKV-7 layout (--format hf writes its base)")
    log(f"next: peft.PeftModel.from_pretrained(RWKV7ForCausalLM.from_pretrained(BASE_HF_DIR), '{output}')")
    return output
