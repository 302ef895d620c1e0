"""Which quantization library holds the frozen base (issue 13): torchao, bitsandbytes, optimum-quanto.

For each library and each 4-bit / 8-bit format it offers, on one [2048, 2048] weight shaped
like a 1.5B model's att.key (normal, std 0.02):
  - relative error of the dequantized weight, ||deq(Q(W)) - W|| / ||W||
  - whether a matmul through the quantized weight gives the input a gradient, and that gradient's
    distance from g @ deq(Q(W)) (what an adapter below it needs)
  - stored bytes per bf16 byte
  - CPU time of forward + backward of x [512, 2048] through it, as a ratio to a plain fp32 F.linear
    measured in the same run

    python bench/bench_quant_libs.py                       # libraries installed in this Python
    python bench/bench_quant_libs.py --path /tmp/qlibs     # or: each in /tmp/qlibs/<pip name> (pip --target)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def torchao_formats():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

    def nf4(W):
        q = to_nf4(W.bfloat16())
        parts = (q.quantized_data, q.quantized_scalers, q.quantization_factor, q.scaler_mean, q.nf4)
        return q.get_original_weight().float(), lambda x: linear_nf4(x, q), sum(t.nbytes for t in parts)

    def int8(W):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data = W.bfloat16()
        quantize_(lin, Int8WeightOnlyConfig())
        q = lin.weight
        return q.dequantize().float(), lambda x: lin(x.bfloat16()).float(), q.qdata.nbytes + q.scale.nbytes

    return {"nf4": nf4, "int8": int8}


def bitsandbytes_formats():
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    def nf4(W):
        q, state = BF.quantize_4bit(W.bfloat16(), quant_type="nf4", blocksize=64)
        deq = BF.dequantize_4bit(q, state).float()
        return deq, lambda x: bnb.matmul_4bit(x.bfloat16(), q.t(), quant_state=state).float(), \
            q.nbytes + state.absmax.nbytes

    def int8(W):
        lin = bnb.nn.Linear8bitLt(W.shape[1], W.shape[0], bias=False, has_fp16_weights=False)
        lin.weight = bnb.nn.Int8Params(W.half(), requires_grad=False, has_fp16_weights=False)
        lin = lin.to("cpu")  # quantizes
        deq = (lin.weight.data.float() * lin.weight.SCB[:, None].float() / 127)
        return deq, lambda x: lin(x.half()).float(), lin.weight.data.nbytes + lin.weight.SCB.nbytes

    return {"nf4": nf4, "int8": int8}


def quanto_formats():
    from optimum.quanto import freeze, qint4, qint8, quantize

    def make(qtype):
        def fmt(W):
            model = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0], bias=False))
            model[0].weight.data = W.clone()
            quantize(model, weights=qtype)
            freeze(model)
            q = model[0].weight
            names, _ = q.__tensor_flatten__()
            nbytes = sum(getattr(q, n).nbytes for n in names)
            return q.dequantize().float(), lambda x: model(x), nbytes
        return fmt

    return {"int4 (not nf4)": make(qint4), "int8": make(qint8)}


LIBRARIES = {"torchao": torchao_formats, "bitsandbytes": bitsandbytes_formats, "optimum-quanto": quanto_formats}


def seconds(fn, repeat=5):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(fmt, W, x, g):
    deq, linear, nbytes = fmt(W)
    xr = x.clone().requires_grad_(True)
    y = linear(xr)
    y.backward(g)
    grad_ok = xr.grad is not None
    grad_err = ((xr.grad - g @ deq).norm() / (g @ deq).norm()).item() if grad_ok else None

    def step():
        xi = x.clone().requires_grad_(True)
        linear(xi).backward(g)

    def plain():
        xi = x.clone().requires_grad_(True)
        F.linear(xi, W).backward(g)

    return {"rel_error": round(((deq - W).norm() / W.norm()).item(), 4),
            "input_grad": grad_ok, "grad_rel_error": grad_err and round(grad_err, 4),
            "bytes_per_bf16_byte": round(nbytes / (W.numel() * 2), 3),
            "fwd_bwd_vs_fp32_linear": round(seconds(step) / seconds(plain), 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", help="a folder with one pip --target install per library, named as on PyPI")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)  # torchao and bitsandbytes log missing optional CUDA/kernel libraries
    torch.manual_seed(0)
    W = torch.randn(2048, 2048) * 0.02
    x, g = torch.randn(512, 2048), torch.randn(512, 2048)
    rows = []
    for name, formats in LIBRARIES.items():
        if args.path:
            sys.path.insert(0, str(Path(args.path) / name))
        t = time.perf_counter()
        try:
            fmts = formats()
        except ImportError as e:
            rows.append({"library": name, "error": f"not importable: {e}"})
            continue
        import_s = round(time.perf_counter() - t, 2)
        for kind, fmt in fmts.items():
            try:
                row = {"library": name, "format": kind, "import_s": import_s, **measure(fmt, W, x, g)}
            except Exception as e:  # a library that cannot do this on this machine: recorded, not fatal
                row = {"library": name, "format": kind, "error": f"{type(e).__name__}: {str(e)[:120]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
