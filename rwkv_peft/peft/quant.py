"""A frozen linear weight stored quantized (a QLoRA-style base), through torchao.

    nf4   QLoRA's 4-bit NormalFloat: blocks of 64 values share one absmax scaler, and the
          scalers are themselves quantized to int8 in groups (about 0.26 bytes per bf16 byte)
    int8  symmetric per-row int8, one fp32 scale per output row (about 0.5 bytes per bf16 byte)

`QuantizedWeight` holds one weight [out, in]; `weight.linear(x)` is x W^T with W dequantized
in the forward pass and dequantized again in the backward pass. Autograd would otherwise keep
the dequantized [out, in] temporary alive from forward to backward: a full-precision copy of
every layer, which is what quantizing set out to avoid. Nothing here trains: gradients flow to
the input x only (for the adapters and layers below).

bench/README.md says why torchao (and not bitsandbytes or optimum-quanto).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RWKVPeftError

QUANT_FORMATS = ("nf4", "int8")
QUANT_TARGETS = ("adapted", "all")  # --quant_targets: the adapted layers, or every frozen linear
NF4_BLOCK = 64            # values per absmax scaler (QLoRA's choice)
NF4_SCALER_GROUP = 256    # scalers per int8 group of the double quantization (QLoRA's choice)


def import_torchao(fmt: str):
    """torchao, or one error line saying how to get it. Its import logs missing optional CUDA
    extensions on CPU-only machines; those say nothing to act on, so they are silenced."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError as e:
        raise RWKVPeftError(f"--quant {fmt} needs the torchao package, which is not importable here ({e}); "
                            "install it with: pip install torchao (it is in requirements.txt)") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return to_nf4, Int8Tensor, PerRow


def quantize(weight: torch.Tensor, fmt: str, name: str = "weight") -> torch.Tensor:
    """torchao's quantized tensor of a 2-D weight, quantized from fp32 (one layer's temporary)."""
    if fmt not in QUANT_FORMATS:
        raise RWKVPeftError(f"--quant: unknown format '{fmt}'; choose one of {', '.join(QUANT_FORMATS)}")
    to_nf4, Int8Tensor, PerRow = import_torchao(fmt)
    W = weight.detach().float().contiguous()
    if fmt == "int8":
        return Int8Tensor.from_hp(W, PerRow())
    if W.numel() % NF4_BLOCK:
        raise RWKVPeftError(f"--quant nf4: {name} {list(W.shape)} has {W.numel()} values, not a multiple of "
                            f"{NF4_BLOCK}; use --quant int8 for it")
    # the scaler groups must tile the scalers exactly: the largest group up to QLoRA's 256 that does
    group = math.gcd(NF4_SCALER_GROUP, W.numel() // NF4_BLOCK)
    return to_nf4(W, NF4_BLOCK, group)


def dequantize(q: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """The library's own dequantization of q (an NF4Tensor or an Int8Tensor), in dtype."""
    return q.get_original_weight().to(dtype) if fmt == "nf4" else q.dequantize(dtype)


def inner_tensors(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a quantized tensor is made of (what it costs in memory)."""
    names, _ = q.__tensor_flatten__()
    return {n: getattr(q, n) for n in names if isinstance(getattr(q, n), torch.Tensor)}


class _DequantizingLinear(torch.autograd.Function):
    """y = x W^T, W dequantized in forward and again in backward; only the quantized W is kept."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight):
        ctx.weight = weight  # a reference to the frozen quantized tensors: nothing new is stored
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.weight.dequantize(grad_y.dtype), None


class QuantizedWeight(nn.Module):
    """A frozen weight [out, in], stored quantized (nf4 or int8).

    The quantized tensor is a non-persistent buffer: it moves with the model between devices,
    stays out of state dicts and DeepSpeed checkpoints (it is rebuilt from the base on load),
    and is never a parameter, so ZeRO neither partitions nor casts it.
    """

    def __init__(self, weight: torch.Tensor, fmt: str, dtype: torch.dtype | None = None, name: str = "weight"):
        super().__init__()
        self.format = fmt
        self.shape = tuple(weight.shape)
        self.dtype = dtype or weight.dtype  # what dequantize() gives by default: the model's working dtype
        self.register_buffer("quantized", quantize(weight, fmt, name), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.quantized.device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in inner_tensors(self.quantized).values())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.quantized, self.format, dtype or self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizingLinear.apply(x, self)

    def _apply(self, fn, recurse=True):
        # Follow the model between devices, but never change dtype: model.float() or .half()
        # would otherwise dequantize the weight. fn's target device is read off a probe tensor.
        device = fn(torch.empty(0, device=self.device)).device
        if device != self.device:
            self.quantized = self.quantized.to(device)
        return self

    def extra_repr(self):
        return f"{self.format} {list(self.shape)}, {self.nbytes:,} bytes"


class QuantizedLinear(nn.Module):
    """A frozen linear layer without an adapter, its weight quantized (--quant_targets all)."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight

    def forward(self, x):
        return self.weight.linear(x)


def quant_summary(model: nn.Module) -> str:
    """One line: how many frozen weights are stored quantized, and their bytes against bf16."""
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    stored = sum(w.nbytes for w in weights)
    bf16 = sum(2 * w.shape[0] * w.shape[1] for w in weights)
    formats = ", ".join(sorted({w.format for w in weights}))
    return (f"frozen base: {len(weights)} linear weights stored {formats}, {stored / 2**20:,.1f} MiB "
            f"({stored / max(bf16, 1):.2f}x their {bf16 / 2**20:,.1f} MiB in bf16)")


def frozen_linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x W^T for a frozen weight: a plain tensor, or a QuantizedWeight."""
    return weight.linear(x) if isinstance(weight, QuantizedWeight) else F.linear(x, weight)
