"""Random checkpoints in the official RWKV-6 / RWKV-7 layout, written from SPEC section 1.

Independent of the package under test: every key and shape is spelled out here, so the
parity tests compare our model with the official runtime on files neither side made.
Values are random but in realistic ranges (non-trivial norms, mixed decays).
"""

from __future__ import annotations

import torch


def _rand(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g) * scale + shift


def _unif(g, *shape, lo=0.0, hi=1.0):
    return torch.rand(*shape, generator=g) * (hi - lo) + lo


def _norm(sd, g, key, C):
    sd[f"{key}.weight"] = _rand(g, C, scale=0.2, shift=1.0)
    sd[f"{key}.bias"] = _rand(g, C, scale=0.1)


def rwkv7_state_dict(n_layer=3, n_embd=64, head_size=16, vocab=97, dims=(16, 12, 8, 20),
                     block0_v=True, time_state=False, seed=0, dtype=torch.float32):
    """dims = (D_decay, D_aaa, D_mv, D_gate); time_state: add a random att.time_state [H, N, N]."""
    g = torch.Generator().manual_seed(seed)
    C, N, V = n_embd, head_size, vocab
    H, F = C // N, 4 * C
    dw, da, dv, dg = dims
    sd = {"emb.weight": _rand(g, V, C)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            _norm(sd, g, p + "ln0", C)
        _norm(sd, g, p + "ln1", C)
        _norm(sd, g, p + "ln2", C)
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = _unif(g, 1, 1, C)
        sd[a + "w0"] = _unif(g, 1, 1, C, lo=-4.0, hi=1.0)
        sd[a + "w1"] = _rand(g, C, dw, scale=0.2)
        sd[a + "w2"] = _rand(g, dw, C, scale=0.2)
        sd[a + "a0"] = _rand(g, 1, 1, C, scale=0.5)
        sd[a + "a1"] = _rand(g, C, da, scale=0.2)
        sd[a + "a2"] = _rand(g, da, C, scale=0.2)
        if i > 0 or block0_v:
            sd[a + "v0"] = _rand(g, 1, 1, C, scale=0.5)
            sd[a + "v1"] = _rand(g, C, dv, scale=0.2)
            sd[a + "v2"] = _rand(g, dv, C, scale=0.2)
        sd[a + "g1"] = _rand(g, C, dg, scale=0.2)
        sd[a + "g2"] = _rand(g, dg, C, scale=0.2)
        sd[a + "k_k"] = _unif(g, 1, 1, C, lo=0.5, hi=1.0)
        sd[a + "k_a"] = _unif(g, 1, 1, C, lo=0.5, hi=1.5)
        sd[a + "r_k"] = _rand(g, H, N, scale=0.3)
        if time_state:
            sd[a + "time_state"] = _rand(g, H, N, N, scale=0.3)
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = _rand(g, C, C, scale=C ** -0.5)
        _norm(sd, g, a + "ln_x", C)
        f = p + "ffn."
        sd[f + "x_k"] = _unif(g, 1, 1, C)
        sd[f + "key.weight"] = _rand(g, F, C, scale=C ** -0.5)
        sd[f + "value.weight"] = _rand(g, C, F, scale=F ** -0.5)
    _norm(sd, g, "ln_out", C)
    sd["head.weight"] = _rand(g, V, C, scale=C ** -0.5)
    return {k: v.to(dtype) for k, v in sd.items()}


def rwkv6_state_dict(n_layer=3, n_embd=64, head_size=16, vocab=97, dims=(8, 16), time_state=False,
                     seed=0, dtype=torch.float32):
    """dims = (D_mix, D_decay)."""
    g = torch.Generator().manual_seed(seed)
    C, N, V = n_embd, head_size, vocab
    H = C // N
    F = int(3.5 * C) // 32 * 32
    dm, dd = dims
    sd = {"emb.weight": _rand(g, V, C)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            _norm(sd, g, p + "ln0", C)
        _norm(sd, g, p + "ln1", C)
        _norm(sd, g, p + "ln2", C)
        a = p + "att."
        for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
            sd[a + name] = _unif(g, 1, 1, C)
        sd[a + "time_maa_w1"] = _rand(g, C, 5 * dm, scale=0.2)
        sd[a + "time_maa_w2"] = _rand(g, 5, dm, C, scale=0.2)
        sd[a + "time_decay"] = _unif(g, 1, 1, C, lo=-6.0, hi=1.0)
        sd[a + "time_decay_w1"] = _rand(g, C, dd, scale=0.2)
        sd[a + "time_decay_w2"] = _rand(g, dd, C, scale=0.2)
        sd[a + "time_faaaa"] = _rand(g, H, N, scale=0.5)
        if time_state:
            sd[a + "time_state"] = _rand(g, H, N, N, scale=0.3)
        for name in ("receptance", "key", "value", "output", "gate"):
            sd[a + name + ".weight"] = _rand(g, C, C, scale=C ** -0.5)
        _norm(sd, g, a + "ln_x", C)
        f = p + "ffn."
        sd[f + "time_maa_k"] = _unif(g, 1, 1, C)
        sd[f + "time_maa_r"] = _unif(g, 1, 1, C)
        sd[f + "key.weight"] = _rand(g, F, C, scale=C ** -0.5)
        sd[f + "receptance.weight"] = _rand(g, C, C, scale=C ** -0.5)
        sd[f + "value.weight"] = _rand(g, C, F, scale=F ** -0.5)
    _norm(sd, g, "ln_out", C)
    sd["head.weight"] = _rand(g, V, C, scale=C ** -0.5)
    return {k: v.to(dtype) for k, v in sd.items()}
