"""RNN-mode decoding, one token at a time: the per-token maths of docs/formats.md section 2 done directly.

    decoder = model.decoder()                       # once per inference session (see the memory note)
    state = model.zero_state(1)                     # or the state a prefill returned
    logits, state = decoder.step(token_id, state)   # logits [V]; the same state, updated in place

Same logits as model(tokens, state) fed one token at a time, without its sequence machinery:
every product is a matrix-vector product, the WKV state is updated in place, the six (RWKV-7)
or five (RWKV-6) token-shift mixes are one op each, and nothing is chunked or padded.

Weight layout. A matrix-vector product is bound by reading the weight once. On the 2-core
CPU, torch reads a tall [out, in] weight (out > in: the head, ffn.key) at about 60% of the
speed of the same weight stored [in, out] (x @ W); for square and wide weights the stored
layout is as fast or faster (bench/README.md). So the decoder keeps a transposed
[in, out] copy of each tall linear weight and uses the live weight for the others.

Memory: the copies are built here, when an inference session starts, never in training.
For the RWKV-7 0.1B shape (V = 65536, C = 768, 12 layers) they are the head (201 MB) and
12 ffn.key weights (113 MB): 314 MB next to 765 MB of fp32 weights. A layer with an
unmerged adapter (LoRA, PiSSA, Bone, Bat) gets one copy of its effective weight, found
by running the layer on the identity matrix. `is_current()` tells whether the copies
still match the live weights (a training step changes them in place).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import RWKVState


class MatVec:
    """y = W x for one linear layer, with W read in its faster layout (see the module docstring)."""

    def __init__(self, layer: nn.Module):
        out_features, in_features = layer.weight.shape
        tall = out_features > in_features
        if type(layer) is nn.Linear:
            self.weight = layer.weight.detach().t().contiguous() if tall else layer.weight.detach()
        else:  # an adapted layer: its effective map, through its own forward
            eye = torch.eye(in_features, dtype=layer.weight.dtype, device=layer.weight.device)
            effective_t = layer(eye).detach()  # [in, out]
            self.weight = effective_t if tall else effective_t.t().contiguous()
        self.transposed = tall

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight if self.transposed else torch.mv(self.weight, x)


def _flat(p: torch.Tensor) -> torch.Tensor:
    """A [1, 1, C] parameter as a [C] vector (a view of the live parameter)."""
    return p.detach().view(-1)


def _layer_norm(x, ln: nn.Module):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class Decoder:
    """One-token RNN steps of an RWKV model (batch 1); see the module docstring."""

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        self.version, self.n_head, self.head_size = cfg.version, cfg.n_head, cfg.head_size
        self.emb = model.emb.weight.detach()
        self.head = MatVec(model.head)
        self.layers = [self._layer(block) for block in model.blocks]
        self._versions = self._weight_versions()

    def _weight_versions(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self.model.parameters()]

    def is_current(self) -> bool:
        """False once any model weight has been replaced or changed in place since the build."""
        return self._weight_versions() == self._versions

    def _layer(self, block) -> dict:
        att, ffn = block.att, block.ffn
        lay = {"ln0": getattr(block, "ln0", None), "ln1": block.ln1, "ln2": block.ln2, "ln_x": att.ln_x,
               "receptance": MatVec(att.receptance), "key": MatVec(att.key), "value": MatVec(att.value),
               "output": MatVec(att.output), "ffn_key": MatVec(ffn.key), "ffn_value": MatVec(ffn.value)}
        if self.version == 7:
            # the six token-shift mixes as one [6, C] tensor: xr, xw, xk, xv, xa, xg in one op
            lay["mix"] = torch.stack([_flat(getattr(att, n)) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")])
            for name in ("w0", "a0", "k_k", "k_a"):
                lay[name] = _flat(getattr(att, name))
            # the low-rank mixes' first factors [C, D] as [D, C] copies: a row-major matrix-vector
            # product is twice as fast on them as x @ W (0.1B shape; the copies add 0.6 MB per layer)
            for name in ("w1", "a1", "g1"):
                lay[name] = getattr(att, name).detach().t().contiguous()
            for name in ("w2", "a2", "g2"):
                lay[name] = getattr(att, name).detach()
            if hasattr(att, "v0") and att.layer_id > 0:
                lay["v0"], lay["v1"], lay["v2"] = _flat(att.v0), att.v1.detach().t().contiguous(), att.v2.detach()
            lay["r_k"] = att.r_k.detach()
            lay["ffn_x_k"] = _flat(ffn.x_k)
        else:
            lay["maa_x"] = _flat(att.time_maa_x)
            lay["maa_wkvrg"] = torch.stack([_flat(getattr(att, f"time_maa_{n}")) for n in "wkvrg"])
            lay["maa_w1"], lay["maa_w2"] = att.time_maa_w1.detach(), att.time_maa_w2.detach()
            lay["decay"] = _flat(att.time_decay)
            lay["decay_w1"], lay["decay_w2"] = att.time_decay_w1.detach(), att.time_decay_w2.detach()
            lay["u"] = att.time_faaaa.detach().float()
            lay["gate"] = MatVec(att.gate)
            lay["ffn_receptance"] = MatVec(ffn.receptance)
            lay["ffn_maa_k"], lay["ffn_maa_r"] = _flat(ffn.time_maa_k), _flat(ffn.time_maa_r)
        return lay

    @torch.inference_mode()
    def step(self, token: int, state: RWKVState) -> tuple[torch.Tensor, RWKVState]:
        """Feed one token; returns (its logits [V], state), state (batch 1) updated in place."""
        if state.wkv.shape[1] != 1:
            raise ValueError(f"Decoder.step runs one sequence; the state has batch size {state.wkv.shape[1]}")
        x = self.emb[int(token)]
        v_first = None
        for i, lay in enumerate(self.layers):
            if lay["ln0"] is not None:
                x = _layer_norm(x, lay["ln0"])
            xa = _layer_norm(x, lay["ln1"])
            if self.version == 7:
                dx, v_first = self._time_mix7(lay, xa, v_first, state.att_shift[i, 0], state.wkv[i, 0])
            else:
                dx = self._time_mix6(lay, xa, state.att_shift[i, 0], state.wkv[i, 0])
            x = x + dx
            xf = _layer_norm(x, lay["ln2"])
            x = x + self._channel_mix(lay, xf, state.ffn_shift[i, 0])
        return self.head(_layer_norm(x, self.model.ln_out)), state

    def _time_mix7(self, lay, x, v_first, shift, S):
        """RWKV-7 TimeMix of one token; S [H, N value, N key] (fp32) is updated in place."""
        H, N = self.n_head, self.head_size
        xx = shift - x
        shift.copy_(x)
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, lay["mix"]).unbind(0)

        r, k, v = lay["receptance"](xr), lay["key"](xk), lay["value"](xv)
        w = -F.softplus(-(lay["w0"] + torch.tanh(torch.mv(lay["w1"], xw)) @ lay["w2"]).float()) - 0.5
        a = torch.sigmoid(lay["a0"] + torch.mv(lay["a1"], xa) @ lay["a2"])
        g = torch.sigmoid(torch.mv(lay["g1"], xg)) @ lay["g2"]
        if v_first is None:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(lay["v0"] + torch.mv(lay["v1"], xv) @ lay["v2"])
        kk = F.normalize((k * lay["k_k"]).view(H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * lay["k_a"])

        # S = S diag(d) + (S alpha) beta^T + v k^T with alpha = -kk, beta = kk a; y = S r.
        # S x is taken as the row product x^T S^T: torch's batched kernel is 6x faster on a
        # [1, N] row than on an [N, 1] column.
        rf, kf, vf = r.float().view(H, 1, N), k.float().view(H, 1, N), v.float().view(H, N, 1)
        kk, a = kk.float().view(H, 1, N), a.float().view(H, 1, N)
        decay = torch.exp(-torch.exp(w)).view(H, 1, N)
        s_alpha = torch.bmm(-kk, S.mT).mT  # [H, N, 1], from the old state, before the in-place update
        S.mul_(decay).baddbmm_(s_alpha, kk * a).baddbmm_(vf, kf)
        y = torch.bmm(rf, S.mT).view(-1).to(x.dtype)

        y = F.group_norm(y.view(1, -1), H, lay["ln_x"].weight, lay["ln_x"].bias, lay["ln_x"].eps).view(-1)
        bonus = (r * k * lay["r_k"].view(-1)).view(H, N).sum(-1, keepdim=True) * v.view(H, N)
        return lay["output"]((y + bonus.view(-1)) * g), v_first

    def _time_mix6(self, lay, x, shift, S):
        """RWKV-6 TimeMix of one token; S [H, N key, N value] (fp32) is updated in place."""
        H, N = self.n_head, self.head_size
        xx = shift - x
        shift.copy_(x)
        # data-dependent mixes for w, k, v, r, g: one [5, Dm] x [5, Dm, C] batched product
        m = torch.tanh(torch.addcmul(x, xx, lay["maa_x"]) @ lay["maa_w1"]).view(5, 1, -1)
        m = torch.bmm(m, lay["maa_w2"]).view(5, -1)
        xw, xk, xv, xr, xg = torch.addcmul(x, xx, lay["maa_wkvrg"] + m).unbind(0)

        r, k, v = lay["receptance"](xr), lay["key"](xk), lay["value"](xv)
        g = F.silu(lay["gate"](xg))
        w = (lay["decay"] + torch.tanh(xw @ lay["decay_w1"]) @ lay["decay_w2"]).float()

        # y_j = sum_i r_i (u_i k_i v_j + S_ij);  S = diag(d) S + k v^T
        rf, kf, vf = r.float().view(H, N), k.float().view(H, N), v.float().view(H, N)
        bonus = (rf * lay["u"] * kf).sum(-1, keepdim=True) * vf
        y = (rf.view(H, 1, N) @ S).view(H, N) + bonus
        S.mul_(torch.exp(-torch.exp(w)).view(H, N, 1)).baddbmm_(kf.view(H, N, 1), vf.view(H, 1, N))

        y = F.group_norm(y.view(1, -1).to(x.dtype), H, lay["ln_x"].weight, lay["ln_x"].bias,
                         lay["ln_x"].eps).view(-1)
        return lay["output"](y * g)

    def _channel_mix(self, lay, x, shift):
        xx = shift - x
        shift.copy_(x)
        if self.version == 7:
            k = torch.relu(lay["ffn_key"](torch.addcmul(x, xx, lay["ffn_x_k"]))) ** 2
            return lay["ffn_value"](k)
        k = torch.relu(lay["ffn_key"](torch.addcmul(x, xx, lay["ffn_maa_k"]))) ** 2
        r = torch.sigmoid(lay["ffn_receptance"](torch.addcmul(x, xx, lay["ffn_maa_r"])))
        return r * lay["ffn_value"](k)
