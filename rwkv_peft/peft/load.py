"""`rwkv_peft.load_model`: a checkpoint with an adapter attached unmerged.

It sits above the model layer (which knows nothing of adapters) and is what chat, eval and a
merge's verification load through.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from ..model.load import load_model as load_base
from ..model.rwkv import RWKV
from ..model.time_state import load_state_file
from .adapter_file import Adapter, apply_adapter, check_base, read_adapter


def load_model(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], *, adapter=None,
               state: str | os.PathLike | None = None, **kw) -> RWKV:
    """`rwkv_peft.model.load_model` (same keywords), plus adapter: an adapter file path or a read
    `Adapter`, attached unmerged; it must have been trained on this checkpoint. A state file is
    applied after the adapter, so it wins over a state the adapter carries."""
    if adapter is None:
        return load_base(checkpoint, state=state, **kw)
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    model = load_base(checkpoint, check=lambda sd, source: check_base(adapter, sd, source), **kw)
    apply_adapter(model, adapter)
    if state is not None:
        load_state_file(model, state)
    return model.eval()
