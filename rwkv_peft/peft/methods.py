"""The PEFT methods: LoRA, PiSSA, Bone and Bat (docs/formats.md section 4).

Each method is one small module attached to one frozen linear layer W [out, in]. The same
object serves training, merging and tests, so the merge cannot drift from training:

    frozen_weight(W)  the weight the adapted layer holds frozen (PiSSA: the residual W - B0 A0)
    forward(x, Wf)    the adapted layer's output for input x [..., in], Wf = frozen_weight(W)
                      (a tensor, or a QuantizedWeight holding it quantized: peft/quant.py)
    base_forward(x, Wf)  the ORIGINAL base layer's output W x, from what the layer holds
                      (the reference model of preference tuning: adapt.adapters_disabled)
    delta(W)          fp32 [out, in] with  merged = W + delta(W),  W the original base weight
    tensors()         what an adapter file stores for this layer, by file name (lora_A, bone, ...)

Each method also declares its train.py flags (`flags`: name, keyword, default, help), from which
the argument parser and the trainer take them, so a new method is added here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cli import fraction, non_negative, positive
from ..errors import RWKVPeftError
from .quant import frozen_linear


@dataclass(frozen=True)
class Flag:
    """A train.py flag (--{flag}) that sets the keyword `keyword` of a method's constructor.
    check(value) says what is wrong with a value (e.g. "must be positive"), None if it is fine:
    train.py refuses a bad value before anything starts."""

    flag: str
    keyword: str
    default: Any
    help: str
    check: Callable[[Any], str | None] = non_negative


class PeftMethod(nn.Module):
    name: ClassVar[str]
    flags: ClassVar[tuple[Flag, ...]] = ()
    # frozen_weight(W) depends on tensors saved with the method (PiSSA's B0 A0): a resumed run rebuilds it
    frozen_weight_from_tensors: ClassVar[bool] = False

    @classmethod
    def options(cls, values) -> dict:
        """The constructor keywords as this method's flags set them (values: parsed train.py flags)."""
        return {f.keyword: getattr(values, f.flag) for f in cls.flags}

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r

    def hparams(self) -> dict:
        """JSON-serialisable hyperparameters; `METHODS[name](in, out, **hparams)` rebuilds it."""
        return {"r": self.r}

    def reset_parameters(self, weight: torch.Tensor) -> None:
        """Initialise for training on the original base weight."""
        raise NotImplementedError

    def frozen_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W x, the base layer without this adapter: the frozen weight is W itself unless a method
        changed it (PiSSA)."""
        return frozen_linear(x, weight)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters()) | dict(self.named_buffers())

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy an adapter file's tensors for this layer in, checking names and shapes."""
        own = self.tensors()
        for name, ref in own.items():
            if name not in tensors:
                raise RWKVPeftError(f"{source}: missing adapter tensor '{name}'")
            if tuple(tensors[name].shape) != tuple(ref.shape):
                raise RWKVPeftError(f"{source}: adapter tensor '{name}' has shape {list(tensors[name].shape)}, "
                                    f"expected {list(ref.shape)}")
        for name in tensors:
            if name not in own:
                raise RWKVPeftError(f"{source}: unexpected adapter tensor '{name}' for method {self.name}")
        with torch.no_grad():
            for name, ref in own.items():
                ref.copy_(tensors[name])


class LoRA(PeftMethod):
    """y = W x + (alpha / r) B A x;  A [r, in] Kaiming-uniform, B [out, r] zeros."""

    name = "lora"
    flags = (Flag("lora_r", "r", 32, "LoRA rank", positive),
             Flag("lora_alpha", "alpha", 32.0, "LoRA alpha (scale = alpha / r)", positive),
             Flag("lora_dropout", "dropout", 0.0, "LoRA dropout", fraction))

    def __init__(self, in_features, out_features, r, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(in_features, out_features, r)
        if not 1 <= r <= min(in_features, out_features):
            raise RWKVPeftError(f"lora rank {r} does not fit a [{out_features}, {in_features}] layer "
                                f"(need 1 <= r <= {min(in_features, out_features)})")
        self.alpha = float(r if alpha is None else alpha)
        self.dropout = float(dropout)
        self.lora_A = nn.Parameter(torch.zeros(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def hparams(self):
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout}

    def reset_parameters(self, weight):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight
        nn.init.zeros_(self.lora_B)

    def forward(self, x, weight):
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return frozen_linear(x, weight) + self.scale * F.linear(F.linear(h, self.lora_A), self.lora_B)

    def delta(self, weight):
        return self.scale * (self.lora_B.float() @ self.lora_A.float())


class PiSSA(LoRA):
    """LoRA initialised from the top-r singular triplets of W: A = sqrt(S) V^T, B = U sqrt(S).

    The layer keeps W_res = W - B0 A0 frozen. B0, A0 (the initial factors) are saved with the
    adapter, so a merge needs only the base checkpoint and the adapter file:
    merged = W + B A - B0 A0, without re-running an SVD that need not be reproducible.
    """

    name = "pissa"
    flags = (Flag("pissa_r", "r", 32, "PiSSA rank", positive),
             Flag("svd_niter", "svd_niter", 4, "PiSSA randomized SVD iterations (0 = exact full SVD)",
                  non_negative),
             LoRA.flags[2])  # --lora_dropout
    frozen_weight_from_tensors = True

    def __init__(self, in_features, out_features, r, svd_niter: int | None = 4, dropout: float = 0.0):
        super().__init__(in_features, out_features, r, alpha=r, dropout=dropout)
        self.svd_niter = svd_niter or None  # 0 or None: the exact full SVD
        self.register_buffer("init_A", torch.zeros(r, in_features))
        self.register_buffer("init_B", torch.zeros(out_features, r))

    def hparams(self):
        return {"r": self.r, "svd_niter": self.svd_niter, "dropout": self.dropout}

    @torch.no_grad()
    def reset_parameters(self, weight):
        W = weight.float()
        if self.svd_niter is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, V = U[:, :self.r], S[:self.r], Vh[:self.r].T
        else:
            U, S, V = torch.svd_lowrank(W, q=self.r, niter=self.svd_niter)
        root = S.sqrt()
        self.lora_A.copy_(root[:, None] * V.T)
        self.lora_B.copy_(U * root[None, :])
        self.init_A.copy_(self.lora_A)
        self.init_B.copy_(self.lora_B)

    def frozen_weight(self, weight):
        return (weight.float() - self.init_B.float() @ self.init_A.float()).to(weight.dtype)

    def base_forward(self, x, weight):
        # W x = W_res x + B0 A0 x: equal to the base up to the rounding of W_res (held in the working dtype)
        return frozen_linear(x, weight) + F.linear(F.linear(x, self.init_A.to(x.dtype)), self.init_B.to(x.dtype))

    def delta(self, weight):
        return self.lora_B.float() @ self.lora_A.float() - self.init_B.float() @ self.init_A.float()


class Bone(PeftMethod):
    """One trainable D [r, out], zeros; D^T added to every r-column block of W.

    Forward without building the delta: y = W x + (sum of x's r-blocks) @ D, the input
    zero-padded to a multiple of r (a last partial block meets the first in % r rows of D).
    """

    name = "bone"
    flags = (Flag("bone_r", "r", 64, "Bone block size", positive),)

    def __init__(self, in_features, out_features, r):
        super().__init__(in_features, out_features, r)
        if not 1 <= r <= in_features:
            raise RWKVPeftError(f"bone rank {r} does not fit a layer with {in_features} inputs "
                                f"(need 1 <= r <= {in_features})")
        self.bone = nn.Parameter(torch.zeros(r, out_features))

    def reset_parameters(self, weight):
        nn.init.zeros_(self.bone)

    def block_sum(self, x):
        pad = -self.in_features % self.r
        if pad:
            x = F.pad(x, (0, pad))
        return x.unflatten(-1, (-1, self.r)).sum(dim=-2)

    def forward(self, x, weight):
        return frozen_linear(x, weight) + self.block_sum(x) @ self.bone

    def delta(self, weight):
        blocks = -(-self.in_features // self.r)
        return self.bone.float().T.repeat(1, blocks)[:, :self.in_features]


class Bat(PeftMethod):
    """D [in/r, r, r], zeros (RWKV-PEFT layout: D indexed by the input block b).

    Delta block (a, b) of W cut into r x r blocks W_ab: W_ab D_b + D_b. Efficient forward,
    with no (out, in) temporary: z_b = D_b x_b, y = W (x + z) + s tiled over the output
    blocks, s = sum_b z_b. (Delta applied to x: sum_b W_ab D_b x_b + sum_b D_b x_b.)
    """

    name = "bat"
    flags = (Flag("bat_r", "r", 64, "Bat block size (must divide every adapted layer's dimensions)", positive),)

    def __init__(self, in_features, out_features, r):
        super().__init__(in_features, out_features, r)
        if r < 1 or in_features % r or out_features % r:
            raise RWKVPeftError(f"bat rank {r} must divide both dimensions of a [{out_features}, {in_features}] "
                                "layer; pick a divisor of both")
        self.bat = nn.Parameter(torch.zeros(in_features // r, r, r))

    def reset_parameters(self, weight):
        nn.init.zeros_(self.bat)

    def forward(self, x, weight):
        xb = x.unflatten(-1, (-1, self.r))                       # [..., in/r, r]
        z = torch.einsum("...bi,bji->...bj", xb, self.bat)       # z_b = D_b x_b
        s = z.sum(dim=-2)                                        # [..., r]
        y = frozen_linear(x + z.flatten(-2), weight)
        return (y.unflatten(-1, (-1, self.r)) + s.unsqueeze(-2)).flatten(-2)

    def delta(self, weight):
        r, D = self.r, self.bat.float()
        Wb = weight.float().unflatten(0, (-1, r)).unflatten(-1, (-1, r))   # [out/r, r, in/r, r]: W_ab
        blocks = torch.einsum("aibk,bkj->aibj", Wb, D) + D.permute(1, 0, 2).unsqueeze(0)
        return blocks.flatten(-2).flatten(0, 1)


METHODS: dict[str, type[PeftMethod]] = {m.name: m for m in (LoRA, PiSSA, Bone, Bat)}


def method_flags() -> list[Flag]:
    """Every method's flags, each once (PiSSA shares --lora_dropout), in registry order."""
    return list({f.flag: f for m in METHODS.values() for f in m.flags}.values())


def make_method(name: str, in_features: int, out_features: int, **hparams) -> PeftMethod:
    if name not in METHODS:
        raise RWKVPeftError(f"unknown PEFT method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name](in_features, out_features, **hparams)
