"""GPU benchmark: PEFT training on RWKV-7 model shapes, and the WKV-7 kernel.

    python bench/bench_gpu.py --quick               # a few minutes: 0.1B, ctx 512, micro batch 1
    python bench/bench_gpu.py                       # the whole grid (long; run it in pieces:)
    python bench/bench_gpu.py --models 1.5B --ctx 1024 --methods lora,bone --skip-kernel
    python bench/bench_gpu.py --skip-train          # only the WKV kernels

1. Training: RWKV-7 of the 0.1B / 0.4B / 1.5B shapes (L12 C768, L24 C1024, L24 C2048; low-rank
   widths 64/64/32/128, 64/64/32/128, 96/96/64/256; head size 64; vocab 65536) with random
   weights in the official layout, bf16, one real DeepSpeed ZeRO stage-1 engine built the way
   the trainer builds it (rwkv_peft/train: deepspeed_config, the trainer's parameter groups,
   fused AdamW, masked_loss), for ctx 512 and 1024, micro batch 1 and 4, gradient
   checkpointing off and on. Methods at equal trainable parameters on the default targets
   (att.receptance/key/value/output, ffn.key/value): Bone r=64 and Bat r=64 have 9*r*C per
   block, LoRA and PiSSA r=32 have 18*r*C, so all four train 576*C per block; plus full
   fine-tuning (all parameters) where it fits in memory. Per row: tokens/s over the timed
   steps (after warm-up steps) and the peak of torch.cuda.max_memory_allocated from engine
   creation on (weights, optimizer state, activations); "OOM" where it does not fit.
   The WKV op of the model is --op (default cuda: the kernels of cuda/).

   --rows MODEL:METHOD:GRAD_CP,... runs chosen rows in a chosen order instead of the grid.

2. Kernels: WKV-7 (and WKV-6) forward and forward+backward time and peak memory at B=8,
   T=4096, H=16, N=64 (bf16 inputs, fp32 w, an fp32 state in and out) for the CUDA kernels,
   the PyTorch chunked forms of rwkv_peft/model/wkv.py and, as the independent peer,
   flash-linear-attention's chunk_rwkv7 / chunk_rwkv6 (when installed), all on the same
   inputs; every op's output, final state and input gradients are compared with the
   PyTorch op's. Median over repeats after warm-up, CUDA events.

Every measured row is merged into the JSON file (--json) at once, keyed by its settings,
so a grid can be run in pieces (each command within a time limit: --time-budget stops
starting new rows after that many seconds). A markdown table of this run's rows is printed
at the end.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_peft.model import RWKV, RWKVConfig  # noqa: E402
from rwkv_peft.model import wkv as wkv_torch  # noqa: E402
from rwkv_peft.model import wkv_dispatch  # noqa: E402
from rwkv_peft.model import wkv_cuda  # noqa: E402

MODELS = {  # name: (n_layer, n_embd, (d_decay, d_aaa, d_mv, d_gate))
    "0.1B": (12, 768, (64, 64, 32, 128)),
    "0.4B": (24, 1024, (64, 64, 32, 128)),
    "1.5B": (24, 2048, (96, 96, 64, 256)),
}
VOCAB, HEAD = 65536, 64
METHODS = {  # equal trainable parameters on the default targets: 576 * C per block
    "lora": ("lora", {"r": 32, "alpha": 32}),
    "pissa": ("pissa", {"r": 32, "svd_niter": 4}),
    "bone": ("bone", {"r": 64}),
    "bat": ("bat", {"r": 64}),
    "full": None,
}
PUBLISHED = ("published WKV-7 figures (H100, B=8, T=4096, N=64, fwd+bwd; SPEC section 5): chunked bf16 CUDA "
             "~8 ms, official fp32-state backstepping kernel ~17 ms, flash-linear-attention Triton chunk ~64 ms")


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="0.1B, ctx 512, micro batch 1, no grad checkpointing, the four PEFT methods and full; "
                        "4 timed steps; kernels with 5 repeats")
    p.add_argument("--models", type=csv(str), default=list(MODELS), help="comma list of " + ",".join(MODELS))
    p.add_argument("--ctx", type=csv(int), default=[512, 1024], help="context lengths (comma list)")
    p.add_argument("--micro-bsz", type=csv(int), default=[1, 4], help="micro batch sizes (comma list)")
    p.add_argument("--grad-cp", type=csv(int), default=[0, 1], help="gradient checkpointing off/on (comma list of 0,1)")
    p.add_argument("--methods", type=csv(str), default=list(METHODS), help="comma list of " + ",".join(METHODS))
    p.add_argument("--op", choices=("cuda", "torch"), default="cuda", help="WKV op inside the model")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per training row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--kernel-shape", type=csv(int), default=[8, 4096, 16], help="B,T,H of the kernel benchmark")
    p.add_argument("--kernel-versions", type=csv(int), default=[7, 6], help="WKV versions to time (comma list)")
    p.add_argument("--kernel-ops", type=csv(str), default=list(KERNEL_OPS),
                   help="WKV implementations to time, same inputs, outputs compared with torch's (comma list of "
                        "cuda: our kernels, torch: our PyTorch chunked forms, fla: flash-linear-attention's "
                        "chunk_rwkv7 / chunk_rwkv6, skipped when not installed)")
    p.add_argument("--rows", type=csv(str), default=None,
                   help="training rows MODEL:METHOD:GRAD_CP to run in this order, at each --ctx and --micro-bsz, "
                        "instead of the --models x --grad-cp x --methods grid (e.g. 0.1B:lora:0,1.5B:bone:1)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per kernel measurement")
    p.add_argument("--skip-train", action="store_true", help="only the kernel benchmark")
    p.add_argument("--skip-kernel", action="store_true", help="only the training rows")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds after which no new row is started (0: no limit)")
    p.add_argument("--json", type=Path, default=REPO / "out" / "bench_gpu.json",
                   help="results file; rows are merged in by their settings (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.ctx, args.micro_bsz, args.grad_cp = ["0.1B"], [512], [1], [0]
        args.steps, args.warmup, args.repeats = 4, 2, 5
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m}; choose from {', '.join(MODELS)}")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m}; choose from {', '.join(METHODS)}")
    if len(args.kernel_shape) != 3:
        p.error("--kernel-shape is B,T,H")
    for op in args.kernel_ops:
        if op not in KERNEL_OPS:
            p.error(f"unknown kernel op {op}; choose from {', '.join(KERNEL_OPS)}")
    if args.rows is not None:
        args.rows = [parse_row(p, text) for text in args.rows]
    return args


def parse_row(p, text: str) -> tuple[str, str, int]:
    """'1.5B:bone:1' -> ('1.5B', 'bone', 1), or an argparse error naming what is wrong."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in MODELS or parts[1] not in METHODS or parts[2] not in ("0", "1"):
        p.error(f"--rows entry {text!r} is not MODEL:METHOD:GRAD_CP with MODEL in {', '.join(MODELS)}, "
                f"METHOD in {', '.join(METHODS)}, GRAD_CP 0 or 1")
    return parts[0], parts[1], int(parts[2])


def training_plan(args) -> list[tuple[str, int, int, int, str]]:
    """(model, ctx, micro batch, grad cp, method) for every training row, in run order."""
    if args.rows is not None:
        return [(m, ctx, mb, cp, meth) for m, meth, cp in args.rows for ctx in args.ctx for mb in args.micro_bsz]
    return [(m, ctx, mb, cp, meth) for m in args.models for ctx in args.ctx for mb in args.micro_bsz
            for cp in args.grad_cp for meth in args.methods]


# ----------------------------------------------------------------------------------------
# Results file
# ----------------------------------------------------------------------------------------


class Results:
    """The JSON file: {"env": ..., "train": [rows], "kernel": [rows]}, rows keyed by settings."""

    TRAIN_KEY = ("model", "ctx", "micro_bsz", "grad_cp", "method", "op", "gpu")
    KERNEL_KEY = ("version", "op", "B", "T", "H", "N", "gpu")

    def __init__(self, path: Path, env: dict):
        self.path, self.env = path, env
        self.data = {"env": env, "train": [], "kernel": []}
        if path.exists():
            try:
                old = json.loads(path.read_text())
                self.data["train"], self.data["kernel"] = old.get("train", []), old.get("kernel", [])
            except (json.JSONDecodeError, OSError) as e:
                print(f"note: {path} is unreadable ({e}); starting a new file")
        self.new = {"train": [], "kernel": []}

    def add(self, kind: str, row: dict) -> None:
        keys = self.TRAIN_KEY if kind == "train" else self.KERNEL_KEY
        key = tuple(row.get(k) for k in keys)
        self.data[kind] = [r for r in self.data[kind] if tuple(r.get(k) for k in keys) != key] + [row]
        self.new[kind] = [r for r in self.new[kind] if tuple(r.get(k) for k in keys) != key] + [row]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return env


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def random_model(name: str, device, seed: int) -> RWKV:
    """An RWKV-7 of the named shape with random weights in realistic ranges, built on the GPU
    (official layout: the module names and shapes are the checkpoint's keys)."""
    L, C, (dw, da, dv, dg) = MODELS[name]
    cfg = RWKVConfig(version=7, n_layer=L, n_embd=C, vocab_size=VOCAB, dim_ffn=4 * C, head_size=HEAD,
                     d_decay=dw, d_aaa=da, d_mv=dv, d_gate=dg)
    with torch.device(device):
        model = RWKV(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for pname, p in model.named_parameters():
        leaf = pname.rsplit(".", 1)[-1]
        if pname.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
            p.fill_(1.0)
        elif pname.endswith(".bias"):
            p.zero_()
        elif leaf == "w0":
            p.uniform_(-6.0, 0.0, generator=g)
        elif leaf in ("a0", "v0"):
            p.normal_(0.0, 0.5, generator=g)
        elif leaf == "k_k":
            p.uniform_(0.5, 1.0, generator=g)
        elif leaf == "k_a":
            p.uniform_(0.8, 1.2, generator=g)
        elif leaf == "r_k":
            p.normal_(0.0, 0.1, generator=g)
        elif p.dim() == 3 or leaf.startswith("x_"):  # token-shift mixes [1, 1, C]
            p.uniform_(0.0, 1.0, generator=g)
        elif pname == "emb.weight":
            p.uniform_(-1e-2, 1e-2, generator=g)
        elif p.dim() == 2:
            # nn.Linear weights are (out, in); the low-rank mixers (w1, a2, ...) are used as x @ W
            fan_in = p.shape[0] if leaf in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2") else p.shape[1]
            p.normal_(0.0, fan_in ** -0.5, generator=g)
    return model.to(torch.bfloat16)


def _free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def train_row(deepspeed, args, model_name, ctx, mb, grad_cp, method, device) -> dict:
    from rwkv_peft.peft.adapt import plan_adapters, prepare_peft
    from rwkv_peft.train.args import TrainArgs
    from rwkv_peft.train.engine import deepspeed_config, make_optimizer, param_groups
    from rwkv_peft.loss import masked_loss

    row = {"model": model_name, "ctx": ctx, "micro_bsz": mb, "grad_cp": grad_cp, "method": method, "op": args.op,
           "gpu": torch.cuda.get_device_name(device)}
    engine = optimizer = model = None
    try:
        model = random_model(model_name, device, args.seed)
        if METHODS[method] is None:
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            torch.manual_seed(args.seed)
            prepare_peft(model, plan_adapters(model, [], METHODS[method]))
        row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row["params"] = sum(p.numel() for p in model.parameters())
        model.grad_checkpointing = bool(grad_cp)
        targs = TrainArgs(micro_bsz=mb, ctx_len=ctx, precision="bf16", grad_cp=grad_cp, lr_init=1e-5, state_lr=1.0,
                          strategy="deepspeed_stage_1", peft="none" if method == "full" else method)
        optimizer = make_optimizer(param_groups(model, targs), targs, device, offloaded=False)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                       config=deepspeed_config(targs, 1))
        engine.train()
        g = torch.Generator(device=device).manual_seed(args.seed)

        def step():
            tokens = torch.randint(0, VOCAB, (mb, ctx + 1), generator=g, device=device)
            logits = engine(tokens[:, :-1])
            loss = masked_loss(logits, tokens[:, 1:], torch.ones_like(tokens[:, 1:]))
            engine.backward(loss)
            engine.step()
            return loss

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        row.update(status="ok", tokens_per_s=round(args.steps * mb * ctx / elapsed, 1),
                   step_ms=round(1000 * elapsed / args.steps, 2),
                   peak_mb=round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                   peak_reserved_mb=round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
                   last_loss=round(loss.item(), 4))
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM", peak_mb=round(torch.cuda.max_memory_allocated(device) / 2**20, 1))
    except Exception as e:  # record and go on with the other rows
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        row.update(status=f"error: {type(e).__name__}: {first[:200]}")
    finally:
        if engine is not None:
            engine.destroy()
        del engine, optimizer, model
        _free_memory()
    return row


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


def kernel_inputs(version, B, T, H, N, device, seed):
    """Model-like inputs in the model's dtypes (bf16, w fp32; RWKV-6's u bf16) and an fp32 state."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(scale=1.0):
        return torch.randn(B, T, H, N, generator=g, device=device) * scale

    r, k, v = randn(0.5), randn(0.5), randn()
    state = torch.randn(B, H, N, N, generator=g, device=device) * 0.3
    if version == 7:
        w = -F.softplus(-(randn(2.0) - 1.0)) - 0.5
        kk = F.normalize(randn(), dim=-1)
        a, b = -kk, kk * torch.sigmoid(randn())
        low = [r, k, v, a, b]
        return [low[0].bfloat16(), w, *(x.bfloat16() for x in low[1:])], state
    w = torch.rand(B, T, H, N, generator=g, device=device) * 7 - 6
    u = torch.randn(H, N, generator=g, device=device) * 0.5
    return [r.bfloat16(), w, k.bfloat16(), v.bfloat16(), u.bfloat16()], state


# flash-linear-attention's RWKV-7 layer guarantees log-decays in [-exp(-0.5), 0), as our w <= -0.5
# does, and calls chunk_rwkv7 with these settings (its fastest path); we call it the same way.
FLA_RWKV7_SETTINGS = {"safe_gate": True, "lower_bound": -0.6065306597126334, "chunk_size": 64}


def fla_wkv7(r, w, k, v, a, b, state):
    """flash-linear-attention's chunk_rwkv7 on our inputs: it takes the log decay (ours is
    log d = -exp(w)), in the working dtype as its RWKV7 layer passes it, and a [key, value]
    state (ours is [value, key])."""
    from fla.ops.rwkv7 import chunk_rwkv7

    y, s = chunk_rwkv7(r, (-torch.exp(w)).to(r.dtype), k, v, a, b, scale=1.0,
                       initial_state=state.transpose(-1, -2).contiguous(), output_final_state=True,
                       **FLA_RWKV7_SETTINGS)
    return y, s.transpose(-1, -2)


def fla_wkv6(r, w, k, v, u, state):
    """flash-linear-attention's chunk_rwkv6 on our inputs: log decay -exp(w) in the working
    dtype (as its RWKV6 layer), no 1/sqrt(N) scale; its state is [key, value] like ours."""
    from fla.ops.rwkv6 import chunk_rwkv6

    return chunk_rwkv6(r, k, v, (-torch.exp(w)).to(r.dtype), u, scale=1.0, initial_state=state,
                       output_final_state=True)


KERNEL_OPS = {  # op: (RWKV-7 function, RWKV-6 function), each (inputs..., state) -> (y, final state)
    "cuda": (wkv_cuda.wkv7_cuda, wkv_cuda.wkv6_cuda),
    "torch": (wkv_torch.wkv7_chunked, wkv_torch.wkv6_chunked),
    "fla": (fla_wkv7, fla_wkv6),
}


def fla_missing() -> str | None:
    """Why flash-linear-attention cannot be timed here (None when it can)."""
    try:
        import fla.ops.rwkv6  # noqa: F401
        import fla.ops.rwkv7  # noqa: F401
    except Exception as e:  # not installed, or triton / transformers missing
        return f"flash-linear-attention not importable ({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})"
    return None


def time_cuda(fn, repeats, warmup=2) -> float:
    """Median milliseconds of fn() over repeats (CUDA events), after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(x, ref) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def kernel_rows(version, ops, args, device, record=lambda row: None) -> list[dict]:
    """Time each op on the same inputs (forward; forward+backward from random gradients on y
    and the final state), then compare every op's y, final state and input gradients with
    the PyTorch chunked op's (fp32 inside: the most accurate of the three). record(row) is
    called as soon as a row is timed, and again once it has its comparison, so that a run
    cut short (a slow Triton autotune, a time limit) keeps what it measured."""
    B, T, H = args.kernel_shape
    gpu = torch.cuda.get_device_name(device)
    inputs, state = kernel_inputs(version, B, T, H, HEAD, device, args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    gy = torch.randn(B, T, H, HEAD, generator=g, device=device).bfloat16()
    gs = torch.randn(B, H, HEAD, HEAD, generator=g, device=device)
    names = ("y", "state", *("d" + n for n in ("rwkvab" if version == 7 else "rwkvu")), "ds0")
    rows, outputs = [], {}
    for op in ops:
        row = {"version": version, "op": op, "B": B, "T": T, "H": H, "N": HEAD, "gpu": gpu}
        fn = KERNEL_OPS[op][0 if version == 7 else 1]
        missing = fla_missing() if op == "fla" else None
        if missing:
            rows.append({**row, "status": f"skipped: {missing}"})
            record(rows[-1])
            continue
        leaves = [x.clone().requires_grad_() for x in (*inputs, state)]

        def forward():
            with torch.no_grad():
                fn(*inputs, state)

        def forward_backward():
            for x in leaves:
                x.grad = None
            y, s = fn(*leaves)
            torch.autograd.backward([y, s], [gy.to(y.dtype), gs])

        try:
            t0 = time.perf_counter()
            forward()  # the first call builds (CUDA) or compiles and autotunes (Triton)
            forward_backward()
            torch.cuda.synchronize(device)
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            row["fwd_ms"] = round(time_cuda(forward, args.repeats), 3)
            _free_memory()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            row["fwd_bwd_ms"] = round(time_cuda(forward_backward, args.repeats), 3)
            row["fwd_bwd_peak_mb"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
            with torch.no_grad():
                y, s = fn(*leaves)
            outputs[op] = [y, s, *(x.grad for x in leaves)]
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            row["status"] = f"error: {type(e).__name__}: {first[:200]}"
        finally:
            del leaves
            _free_memory()
        rows.append(row)
        record(row)
    if "torch" in outputs:  # agreement with the PyTorch chunked op, same inputs
        for row in rows:
            if row["op"] != "torch" and row["op"] in outputs:
                errs = {n: relative_error(x, ref) for n, x, ref in zip(names, outputs[row["op"]], outputs["torch"])}
                worst = max(errs, key=lambda n: errs[n] if errs[n] == errs[n] else float("inf"))
                row["rel_err_vs_torch"] = {n: float(f"{e:.3g}") for n, e in errs.items()}
                row["worst_vs_torch"] = f"{worst} {errs[worst]:.1e}"
                record(row)
    del outputs
    _free_memory()
    return rows


# ----------------------------------------------------------------------------------------
# Tables and main
# ----------------------------------------------------------------------------------------


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for _, key in columns:
            v = r.get(key, "")
            cells.append(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else
                         f"{v:,.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TRAIN_COLUMNS = [("model", "model"), ("ctx", "ctx"), ("micro bsz", "micro_bsz"), ("grad cp", "grad_cp"),
                 ("method", "method"), ("trainable", "trainable"), ("tokens/s", "tokens_per_s"),
                 ("step ms", "step_ms"), ("peak MB", "peak_mb"), ("status", "status")]
KERNEL_COLUMNS = [("WKV", "version"), ("op", "op"), ("B", "B"), ("T", "T"), ("H", "H"), ("fwd ms", "fwd_ms"),
                  ("fwd+bwd ms", "fwd_bwd_ms"), ("fwd+bwd peak MB", "fwd_bwd_peak_mb"),
                  ("worst rel. diff vs torch", "worst_vs_torch"), ("status", "status")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    env = environment()
    results = Results(args.json, env)
    print(f"{env.get('gpu')}, torch {env['torch']} (CUDA {env['cuda']}), deepspeed {env.get('deepspeed', '-')}; "
          f"results -> {args.json}")
    t_start = time.perf_counter()

    def out_of_time() -> bool:
        return bool(args.time_budget) and time.perf_counter() - t_start > args.time_budget

    t0 = time.perf_counter()
    # builds the extension on first use, then self-tests each version's kernel
    reasons = {v: wkv_cuda.cuda_unavailable_reason(device, HEAD, v) for v in (7, 6)}
    for v, reason in reasons.items():
        print(f"CUDA WKV-{v} kernel: {'ready' if reason is None else 'UNAVAILABLE: ' + reason}")
    print(f"(build and self-tests: {time.perf_counter() - t0:.1f} s)")
    reason = reasons[7]
    if reason is not None and args.op == "cuda" and not args.skip_train:
        print("training rows need the CUDA op: fix the above or pass --op torch")
        return 1
    skipped = []

    if not args.skip_kernel:
        for version in args.kernel_versions:
            if out_of_time():
                skipped.append(f"kernels WKV-{version}")
                continue
            ops = [op for op in args.kernel_ops if not (op == "cuda" and reasons.get(version) is not None)]
            for row in kernel_rows(version, ops, args, device, record=functools.partial(results.add, "kernel")):
                print(f"  WKV-{version} {row['op']:5s}: fwd {row.get('fwd_ms', '-')} ms, fwd+bwd "
                      f"{row.get('fwd_bwd_ms', '-')} ms, peak {row.get('fwd_bwd_peak_mb', '-')} MB, first call "
                      f"{row.get('first_call_s', '-')} s, worst vs torch {row.get('worst_vs_torch', '-')} "
                      f"[{row['status']}]", flush=True)

    if not args.skip_train:
        from rwkv_peft.train.engine import import_deepspeed, init_process_group

        init_process_group()
        deepspeed = import_deepspeed()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        import torch.distributed as dist

        wkv_dispatch.set_op(args.op)
        print(f"WKV op in the model: {args.op}")
        try:
            for model_name, ctx, mb, grad_cp, method in training_plan(args):
                label = f"{model_name} ctx{ctx} mb{mb} cp{grad_cp} {method}"
                if out_of_time():
                    skipped.append(label)
                    continue
                t0 = time.perf_counter()
                row = train_row(deepspeed, args, model_name, ctx, mb, grad_cp, method, device)
                results.add("train", row)
                print(f"  {label}: {row.get('tokens_per_s', '-')} tok/s, peak {row.get('peak_mb', '-')} MB, "
                      f"trainable {row.get('trainable', 0):,} [{row['status']}] ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    if results.new["train"]:
        print("\n## Training (bf16, DeepSpeed ZeRO stage 1, one GPU)\n")
        print(markdown(results.new["train"], TRAIN_COLUMNS))
        counts = {r["trainable"] for r in results.new["train"] if r.get("method") not in ("full",) and "trainable" in r
                  and r["model"] == results.new["train"][0]["model"]}
        if len(counts) > 1:
            print(f"\nnote: PEFT trainable counts differ for {results.new['train'][0]['model']}: {sorted(counts)}")
    if results.new["kernel"]:
        print("\n## WKV kernels (bf16 inputs, fp32 w; forward and forward+backward)\n")
        print(markdown(results.new["kernel"], KERNEL_COLUMNS))
        print(f"\n{PUBLISHED}")
    if skipped:
        print(f"\n--time-budget reached; not run: {', '.join(skipped)}")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
