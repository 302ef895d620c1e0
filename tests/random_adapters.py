"""A model with adapters whose trainable tensors are random and nonzero, for tests that need an
adapter that changes the model (fresh adapters are the identity)."""

import torch

from rwkv_peft import load_model
from rwkv_peft.peft.adapt import parse_rules, plan_adapters, prepare_peft


def random_adapters(sd, default, rules="", parts=(), seed=1, noise=0.05):
    """(fp32 model, its methods, its trained parts) with every trainable tensor moved by noise."""
    model = load_model(sd, dtype=torch.float32)
    methods, part_params = prepare_peft(model, plan_adapters(model, parse_rules(rules), default), parts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return model, methods, part_params
