"""RNN-mode decoding, one token at a time: the per-token maths of docs/formats.md section 2 done directly.

    decoder = model.decoder()                       # once per inference session (see the memory note)
    state = model.zero_state(1)                     # or the state a prefill returned
    logits, state = decoder.step(token_id, state)   # logits [V]; the same state, updated in place

Same logits as model(tokens, state) fed one token at a time, without its sequence machinery:
every product is a matrix-vector product, the WKV state is updated in place, and nothing is
chunked or padded.

Where a step's time goes (bench/README.md): decoding a token reads every weight once (541 MB
for the RWKV-7 0.1B shape), so the matrix-vector products are bound by memory bandwidth and
take most of the step; the rest is some 40 small ops per layer on vectors of C numbers,
whose cost is the call, not the arithmetic. So the step is written in as few torch calls as
the maths allows: the token-shift mixes are one lerp, the additive terms of the low-rank
mixes and the ChannelMix residual ride on their products (addmv), and constants derived from
the weights are computed once here. Each such rearrangement says what it computes where it
is done.

Weight layout. A matrix-vector product on this CPU reads a weight stored [in, out] (x @ W)
faster than the same weight stored [out, in] when out >= in (the head: 8.9 ms against
15.4 ms; the square attention weights about 20%); for wide weights (ffn.value) the stored
layout is as fast or faster (bench/README.md). Every product is written torch.mv(M, x) with
M [out, in]: for a tall or square weight, M is the transposed view of an [in, out] copy.

Memory: the copies are built here, when an inference session starts, never in training.
For the RWKV-7 0.1B shape (V = 65536, C = 768, 12 layers) they are the head (201 MB), 12
ffn.key weights (113 MB) and 48 square attention weights (113 MB): 427 MB next to 765 MB of
fp32 weights. A layer with an unmerged adapter (LoRA, PiSSA, Bone, Bat) or a quantized
weight gets one copy of its effective weight, found by running the layer (in eval mode) on
the identity matrix. `is_current()` tells whether the copies still match the live weights
(a training step changes them in place); generate() rebuilds a decoder that is not.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from .common import RWKVState

# -softplus(-z) - 0.5 is RWKV-7's log(-log(decay)); its exp is e^-0.5 sigmoid(z)
_DECAY_SCALE = -math.exp(-0.5)


def _matrix(layer: nn.Module) -> torch.Tensor:
    """A linear layer's effective weight as an [out, in] matrix M for torch.mv(M, x), read in
    its faster layout: for out >= in, the transposed view of a contiguous [in, out] copy."""
    copy = layer.out_features >= layer.in_features
    if type(layer) is nn.Linear:
        weight = layer.weight.detach()
        return weight.t().contiguous().t() if copy else weight
    # an adapted or quantized layer: its effective map, through its own forward (eval mode,
    # so that a LoRA dropout does not fall on the identity's rows)
    eye = torch.eye(layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
    training = layer.training
    layer.eval()
    try:
        effective_t = layer(eye).detach()  # [in, out]
    finally:
        layer.train(training)
    return effective_t.t() if copy else effective_t.t().contiguous()


def _vector(p: torch.Tensor) -> torch.Tensor:
    """A [1, 1, C] parameter as a [C] vector (a view of the live parameter)."""
    return p.detach().view(-1)


def _norm(module: nn.Module) -> tuple:
    """A LayerNorm's or GroupNorm's (weight, bias, eps), views of the live parameters."""
    return module.weight.detach(), module.bias.detach(), module.eps


def _layer_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    weight, bias, eps = norm
    return torch.layer_norm(x, weight.shape, weight, bias, eps)


class Decoder:
    """One-token RNN steps of an RWKV model (batch 1); see the module docstring."""

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        self.version, self.n_head, self.head_size = cfg.version, cfg.n_head, cfg.head_size
        self.emb = model.emb.weight.detach()
        self.ln0 = _norm(model.blocks[0].ln0)
        self.ln_out = _norm(model.ln_out)
        self.head = _matrix(model.head)
        self.layers = [self._layer7(b) if self.version == 7 else self._layer6(b) for b in model.blocks]
        self._versions = self._weight_versions()

    def _weight_versions(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self.model.parameters()]

    def is_current(self) -> bool:
        """False once any model weight has been replaced or changed in place since the build."""
        return self._weight_versions() == self._versions

    def matrices(self) -> list[torch.Tensor]:
        """Every weight matrix the step reads by a matrix-vector product, head included (the
        benchmark's floor: bench/bench_cpu_inference.py)."""
        names = ("receptance", "key", "value", "output", "ffn_key", "ffn_value", "gate", "ffn_receptance")
        return [getattr(lay, n) for lay in self.layers for n in names if hasattr(lay, n)] + [self.head]

    @staticmethod
    def _common(block) -> dict:
        att, ffn = block.att, block.ffn
        return dict(ln1=_norm(block.ln1), ln2=_norm(block.ln2), ln_x=_norm(att.ln_x),
                    receptance=_matrix(att.receptance), key=_matrix(att.key), value=_matrix(att.value),
                    output=_matrix(att.output), ffn_key=_matrix(ffn.key), ffn_value=_matrix(ffn.value))

    def _layer7(self, block) -> SimpleNamespace:
        att, ffn = block.att, block.ffn
        lay = SimpleNamespace(**self._common(block))
        # the six token-shift mixes as one [6, C] tensor, in the order the step unpacks them
        lay.mix = torch.stack([_vector(getattr(att, n)) for n in ("x_r", "x_k", "x_v", "x_w", "x_a", "x_g")])
        lay.w0, lay.a0, lay.k_k, lay.k_a = (_vector(getattr(att, n)) for n in ("w0", "a0", "k_k", "k_a"))
        lay.one_minus_k_a = 1 - lay.k_a  # k (1 + (a - 1) k_a) = k ((1 - k_a) + a k_a): one addcmul
        lay.r_k = att.r_k.detach()
        # The low-rank mixes x @ W1 @ W2 as torch.mv(M1, x) then torch.mv(M2, h): M1 = W1^T as a
        # contiguous [D, C] copy (a row-major matrix-vector product is twice as fast on it as
        # x @ W1; 0.9 MB per layer at the 0.1B shape), M2 = W2^T a view.
        lowrank = ("w", "a", "g") + (("v",) if hasattr(att, "v0") and att.layer_id > 0 else ())
        for n in lowrank:
            setattr(lay, f"{n}1", getattr(att, f"{n}1").detach().t().contiguous())
            setattr(lay, f"{n}2", getattr(att, f"{n}2").detach().t())
        lay.v0 = _vector(att.v0) if "v" in lowrank else None
        lay.ffn_x_k = _vector(ffn.x_k)
        return lay

    def _layer6(self, block) -> SimpleNamespace:
        att, ffn = block.att, block.ffn
        lay = SimpleNamespace(**self._common(block))
        lay.maa_x = _vector(att.time_maa_x)
        lay.maa_wkvrg = torch.stack([_vector(getattr(att, f"time_maa_{n}")) for n in "wkvrg"])
        lay.maa_w1, lay.maa_w2 = att.time_maa_w1.detach().t().contiguous(), att.time_maa_w2.detach()
        lay.decay = _vector(att.time_decay)
        lay.decay_w1, lay.decay_w2 = att.time_decay_w1.detach().t().contiguous(), att.time_decay_w2.detach().t()
        lay.u = att.time_faaaa.detach().float()
        lay.gate, lay.ffn_receptance = _matrix(att.gate), _matrix(ffn.receptance)
        lay.ffn_mix = torch.stack([_vector(ffn.time_maa_k), _vector(ffn.time_maa_r)])
        return lay

    @torch.inference_mode()
    def step(self, token: int, state: RWKVState) -> tuple[torch.Tensor, RWKVState]:
        """Feed one token; returns (its logits [V], state), state (batch 1) updated in place."""
        if state.wkv.shape[1] != 1:
            raise ValueError(f"Decoder.step runs one sequence; the state has batch size {state.wkv.shape[1]}")
        # every layer's state as views, three unbinds instead of three selects per layer
        att_shift, wkv, ffn_shift = (s[:, 0].unbind(0) for s in (state.att_shift, state.wkv, state.ffn_shift))
        x = _layer_norm(self.emb[int(token)], self.ln0)
        v_first = None
        for lay, shift, S, ffn_shift_i in zip(self.layers, att_shift, wkv, ffn_shift):
            if self.version == 7:
                x, v_first = self._time_mix7(lay, x, v_first, shift, S)
                x = self._channel_mix7(lay, x, ffn_shift_i)
            else:
                x = self._time_mix6(lay, x, shift, S)
                x = self._channel_mix6(lay, x, ffn_shift_i)
        return torch.mv(self.head, _layer_norm(x, self.ln_out)), state

    def _time_mix7(self, lay, x, v_first, shift, S):
        """x + RWKV-7 TimeMix of one token (x: the block's input); S [H, N value, N key] (fp32)
        is updated in place."""
        H, N = self.n_head, self.head_size
        xn = _layer_norm(x, lay.ln1)
        # the six token-shift mixes x + (shift - x) * x_* as one lerp
        xr, xk, xv, xw, xa, xg = torch.lerp(xn, shift, lay.mix).unbind(0)
        shift.copy_(xn)

        r, k, v = torch.mv(lay.receptance, xr), torch.mv(lay.key, xk), torch.mv(lay.value, xv)
        # decay exp(-exp(w)) with w = -softplus(-z) - 0.5 (rwkv7.py) is exp(-e^-0.5 sigmoid(z))
        z = torch.addmv(lay.w0, lay.w2, torch.tanh(torch.mv(lay.w1, xw)))
        decay = torch.exp(torch.sigmoid(z.float()) * _DECAY_SCALE)
        a = torch.sigmoid(torch.addmv(lay.a0, lay.a2, torch.mv(lay.a1, xa)))
        g = torch.mv(lay.g2, torch.sigmoid(torch.mv(lay.g1, xg)))
        if v_first is None:
            v_first = v
        else:  # v + (v_first - v) * sigmoid(...) as one lerp
            v = torch.lerp(v, v_first, torch.sigmoid(torch.addmv(lay.v0, lay.v2, torch.mv(lay.v1, xv))))
        kk = (k * lay.k_k).view(H, N)
        kk = kk / torch.linalg.vector_norm(kk, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize, 2 ops fewer
        k = k * torch.addcmul(lay.one_minus_k_a, a, lay.k_a)

        # S = S diag(decay) - (S kk)(kk a)^T + v k^T;  y = S r.
        # S x is taken as the row product x^T S^T: torch's batched kernel is 6x faster on a
        # [1, N] row than on an [N, 1] column.
        # The rank-1 terms are outer products by broadcasting (addcmul_): one pass over S each,
        # faster than a batched product with an inner size of 1.
        kk_row = kk.float().view(H, 1, N)
        s_kk = torch.bmm(kk_row, S.mT).mT  # [H, N, 1], from the old state, before the in-place update
        S.mul_(decay.view(H, 1, N))
        S.addcmul_(s_kk, kk_row * a.float().view(H, 1, N), value=-1)
        S.addcmul_(v.float().view(H, N, 1), k.float().view(H, 1, N))
        y = torch.bmm(r.float().view(H, 1, N), S.mT).view(1, H * N).to(x.dtype)

        y = torch.group_norm(y, H, *lay.ln_x).view(H, N)
        # the bonus (r . k . r_k) v of each head, added to y in one addcmul
        y = torch.addcmul(y, ((r * k).view(H, N) * lay.r_k).sum(-1, keepdim=True), v.view(H, N))
        # (not addmv(x, ...): this product sums into its output row by row, and starting from
        # x, the large residual, loses the low bits of each term)
        return x + torch.mv(lay.output, y.view(-1) * g), v_first

    def _channel_mix7(self, lay, x, shift):
        """x + RWKV-7 ChannelMix of one token (x: the block's input after TimeMix)."""
        xn = _layer_norm(x, lay.ln2)
        xk = torch.lerp(xn, shift, lay.ffn_x_k)  # x + (shift - x) * x_k
        shift.copy_(xn)
        k = torch.relu_(torch.mv(lay.ffn_key, xk)).square_()
        return torch.addmv(x, lay.ffn_value, k)

    def _time_mix6(self, lay, x, shift, S):
        """x + RWKV-6 TimeMix of one token; S [H, N key, N value] (fp32) is updated in place."""
        H, N = self.n_head, self.head_size
        xn = _layer_norm(x, lay.ln1)
        xx = shift - xn
        shift.copy_(xn)
        # data-dependent mixes for w, k, v, r, g: one [5, Dm] x [5, Dm, C] batched product
        m = torch.tanh(torch.mv(lay.maa_w1, torch.addcmul(xn, xx, lay.maa_x))).view(5, 1, -1)
        m = torch.bmm(m, lay.maa_w2).view(5, -1)
        xw, xk, xv, xr, xg = torch.addcmul(xn, xx, lay.maa_wkvrg + m).unbind(0)

        r, k, v = torch.mv(lay.receptance, xr), torch.mv(lay.key, xk), torch.mv(lay.value, xv)
        g = torch.nn.functional.silu(torch.mv(lay.gate, xg))
        w = torch.addmv(lay.decay, lay.decay_w2, torch.tanh(torch.mv(lay.decay_w1, xw))).float()

        # y_j = sum_i r_i (u_i k_i v_j + S_ij);  S = diag(d) S + k v^T
        rf, kf, vf = r.float().view(H, N), k.float().view(H, N), v.float().view(H, N)
        bonus = (rf * lay.u * kf).sum(-1, keepdim=True)
        y = torch.addcmul(torch.bmm(rf.view(H, 1, N), S).view(H, N), bonus, vf)
        S.mul_(torch.exp(-torch.exp(w)).view(H, N, 1)).addcmul_(kf.view(H, N, 1), vf.view(H, 1, N))

        y = torch.group_norm(y.view(1, -1).to(x.dtype), H, *lay.ln_x).view(-1)
        return torch.addmv(x, lay.output, y * g)

    def _channel_mix6(self, lay, x, shift):
        xn = _layer_norm(x, lay.ln2)
        xk, xr = torch.lerp(xn, shift, lay.ffn_mix).unbind(0)  # x + (shift - x) * time_maa_k, _r
        shift.copy_(xn)
        k = torch.relu_(torch.mv(lay.ffn_key, xk)).square_()
        r = torch.sigmoid(torch.mv(lay.ffn_receptance, xr))
        return torch.addcmul(x, r, torch.mv(lay.ffn_value, k))
