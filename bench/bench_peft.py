"""CPU benchmark of the PEFT methods (rwkv_peft/peft/methods.py).

    python bench/bench_peft.py            # full grid
    python bench/bench_peft.py --quick    # smaller grid
    python bench/bench_peft.py --json out.json --threads 1

1. One adapted linear, in = out = C = 2048, T = 512, B in {1, 2, 4}, fp32: forward + backward
   (gradients to the adapter parameters and to x, as inside a deep model; W frozen) time and
   memory, for LoRA r=32/64, PiSSA r=64, Bone r=64, Bat r=64, and a Bat that materializes the
   full (out, in) delta every step the way the published implementations do (W + delta,
   then F.linear). A plain frozen linear is the baseline.

   Memory (CPU has no allocator statistics): a deterministic count of the bytes a layer adds
   to what training keeps alive between its forward and its backward, taken with
   `torch.autograd.graph.saved_tensors_hooks`:
     saved  = unique storages of the tensors autograd saves for backward, created in this
              forward (storages that existed before it -- W, x, the adapter parameters -- are
              excluded: a deep model holds them anyway);
     kept   = unique storages of (saved tensors + the layer output), created in this forward:
              everything new in forward that is still alive when forward returns.
   Temporaries freed inside forward are not counted (this is not a peak).

2. PiSSA initialisation for a whole model's worth of layers (RWKV-7 0.4B shapes, C=1024:
   four [1024, 1024] attention layers, ffn.key [4096, 1024], ffn.value [1024, 4096] per block),
   r = 64: randomized SVD (`svd_lowrank`, niter=4, the default) against full SVD, through
   `PiSSA.reset_parameters`.

Times are medians over repeats taken after warm-up; within a repeat the variants run round-robin
so that load drifting on a shared machine hits all of them alike, and every ratio is taken within
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rwkv_peft.peft.methods import Bat, make_method  # noqa: E402

MiB = 1 << 20


# ----------------------------------------------------------------------------------------
# Variants of one adapted linear
# ----------------------------------------------------------------------------------------

class MaterializedBat(Bat):
    """Bat as the published implementations run it: build the whole (out, in) delta every
    step, add it to W, then one F.linear."""

    def forward(self, x, weight):
        return F.linear(x, weight + self.delta(weight).to(weight.dtype))


def new_storage_bytes(run, existing) -> tuple[int, int]:
    """(saved, kept) bytes that run() creates: the unique new storages autograd saves for
    backward, and the same plus run()'s output (see the module docstring). `existing`:
    tensors alive before, whose storages are not counted."""
    before = {t.untyped_storage().data_ptr() for t in existing}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()

    def new_bytes(tensors):
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(n for ptr, n in seen.items() if ptr not in before and n > 0)

    return new_bytes(saved), new_bytes(saved + [out])


class Variant:
    def __init__(self, label, method, r, W, materialize=False, **hp):
        self.label, self.method, self.r = label, method, r
        self.materialize = materialize
        if method is None:                     # plain frozen linear
            self.module, self.Wf = None, W
            self.params = []
            return
        g = torch.Generator().manual_seed(1)
        m = (MaterializedBat(W.shape[1], W.shape[0], r) if materialize else
             make_method(method, W.shape[1], W.shape[0], r=r, **hp))
        m.reset_parameters(W)
        with torch.no_grad():                  # nonzero adapter, as after some training
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        self.module = m
        self.Wf = m.frozen_weight(W).detach()  # held frozen by the layer: computed once
        self.params = list(m.parameters())

    @property
    def trainable(self):
        return sum(p.numel() for p in self.params)

    def forward(self, x):
        if self.module is None:
            return F.linear(x, self.Wf)
        return self.module(x, self.Wf)

    def step(self, x, gy):
        x.grad = None
        for p in self.params:
            p.grad = None
        y = self.forward(x)
        y.backward(gy)

    def memory(self, x):
        """(saved, kept) bytes created by one forward; see the module docstring."""
        existing = [x, self.Wf, *self.params, *(self.module.buffers() if self.module is not None else [])]
        return new_storage_bytes(lambda: self.forward(x), existing)


def bench_linear(args, log):
    C, T = 2048, args.T
    g = torch.Generator().manual_seed(0)
    W = torch.randn(C, C, generator=g) / C ** 0.5
    variants = [
        Variant("frozen linear (baseline)", None, 0, W),
        Variant("LoRA r=32", "lora", 32, W, alpha=32),
        Variant("LoRA r=64", "lora", 64, W, alpha=64),
        Variant("PiSSA r=64", "pissa", 64, W),
        Variant("Bone r=64", "bone", 64, W),
        Variant("Bat r=64", "bat", 64, W),
        Variant("Bat r=64, materialized delta", "bat", 64, W, materialize=True),
    ]
    # the materialized form must compute the same function as the module
    with torch.no_grad():
        xc = torch.randn(3, C, generator=g)
        bat = variants[-2]
        err = (bat.forward(xc) - variants[-1].forward(xc)).abs().max().item()
        assert err < 1e-3, err

    results = []
    for B in args.batches:
        x = torch.randn(B, T, C, generator=g).requires_grad_(True)
        gy = torch.randn(B, T, C, generator=g)
        mem = {v.label: v.memory(x) for v in variants}
        for _ in range(args.warmup):
            for v in variants:
                v.step(x, gy)
        times = {v.label: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                t0 = time.perf_counter()
                v.step(x, gy)
                times[v.label].append(time.perf_counter() - t0)
        for v in variants:
            saved, kept = mem[v.label]
            results.append(dict(B=B, T=T, C=C, variant=v.label, method=v.method, r=v.r,
                                materialized=v.materialize, trainable=v.trainable,
                                time_ms=1e3 * statistics.median(times[v.label]),
                                time_ms_all=[1e3 * t for t in times[v.label]],
                                saved_bytes=saved, kept_bytes=kept))
        log(f"  B={B} done")
    return results


def table_linear(results):
    lines = []
    for B in sorted({r["B"] for r in results}):
        rows = [r for r in results if r["B"] == B]
        base = next(r for r in rows if r["method"] is None)
        bone = next(r for r in rows if r["method"] == "bone")
        T, C = rows[0]["T"], rows[0]["C"]
        lines.append(f"\n**B={B}, T={T}, C=in=out={C}, fp32, forward+backward (grads to adapter and x)**\n")
        lines.append("| variant | trainable params | fwd+bwd ms (median) | vs frozen linear | "
                     "saved for bwd (MiB) | kept after fwd incl. output (MiB) | kept vs Bone | saved vs Bone |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            sv = f"{r['saved_bytes'] / bone['saved_bytes']:.2f}x" if bone["saved_bytes"] else "-"
            lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['time_ms']:.1f} | "
                         f"{r['time_ms'] / base['time_ms']:.2f}x | {r['saved_bytes'] / MiB:.2f} | "
                         f"{r['kept_bytes'] / MiB:.2f} | {r['kept_bytes'] / bone['kept_bytes']:.2f}x | {sv} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# PiSSA initialisation
# ----------------------------------------------------------------------------------------

RWKV7_04B_BLOCK = [  # (name, out, in) of the adapted linears of one RWKV-7 0.4B block (C=1024)
    ("att.receptance", 1024, 1024), ("att.key", 1024, 1024), ("att.value", 1024, 1024),
    ("att.output", 1024, 1024), ("ffn.key", 4096, 1024), ("ffn.value", 1024, 4096),
]


def bench_pissa_init(args, log):
    r = 64
    g = torch.Generator().manual_seed(2)
    totals = {"svd_lowrank niter=4": 0.0, "full SVD": 0.0}
    per_shape = {}
    # warm-up (first LAPACK / QR / thread-pool use), not timed
    for shape in ((256, 256), (512, 128), (128, 512)):
        Wu = torch.randn(*shape, generator=g)
        for niter in (4, None):
            make_method("pissa", shape[1], shape[0], r=r, svd_niter=niter).reset_parameters(Wu)
    for layer in range(args.layers):
        for name, out_f, in_f in RWKV7_04B_BLOCK:
            # a weight with a decaying spectrum, like trained weights (generation not timed)
            W = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
            W = W + (torch.randn(out_f, 8, generator=g) @ torch.randn(8, in_f, generator=g)) / in_f ** 0.5
            for label, niter in (("svd_lowrank niter=4", 4), ("full SVD", None)):
                m = make_method("pissa", in_f, out_f, r=r, svd_niter=niter)
                t0 = time.perf_counter()
                m.reset_parameters(W)
                dt = time.perf_counter() - t0
                totals[label] += dt
                per_shape.setdefault((label, f"[{out_f}, {in_f}]"), []).append(dt)
        log(f"  PiSSA layer {layer + 1}/{args.layers}: lowrank {totals['svd_lowrank niter=4']:.1f}s, "
            f"full {totals['full SVD']:.1f}s so far")
    return dict(layers=args.layers, r=r, totals_s=totals,
                per_shape_median_s={f"{k[0]} {k[1]}": statistics.median(v) for k, v in per_shape.items()},
                ratio=totals["full SVD"] / totals["svd_lowrank niter=4"])


def table_pissa(res):
    n = res["layers"]
    lines = [f"\n**PiSSA init, r={res['r']}, {n} RWKV-7 0.4B block(s) x 6 linears "
             f"({6 * n} SVDs per variant), fp32**\n",
             "| SVD | total s | per block s | per-layer median s: [1024,1024] / [4096,1024] / [1024,4096] |",
             "|---|---:|---:|---|"]
    for label, tot in res["totals_s"].items():
        ps = [res["per_shape_median_s"][f"{label} {s}"] for s in ("[1024, 1024]", "[4096, 1024]", "[1024, 4096]")]
        lines.append(f"| {label} | {tot:.2f} | {tot / n:.3f} | " + " / ".join(f"{p:.3f}" for p in ps) + " |")
    lines.append(f"\nfull SVD / svd_lowrank: **{res['ratio']:.1f}x** (goal >= 10x)")
    if n < 24:
        lines.append(f"(measured on {n} of the 24 blocks of a 0.4B model to keep the run short; every block "
                     f"has the same shapes, so a 24-block total is about {24 / n:.0f}x these totals and the "
                     "ratio is unchanged)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------

def bench_block(args, log):
    """One whole RWKV-7 block at C=2048: every default target adapted, forward + backward."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from official_layout import rwkv7_state_dict

    from rwkv_peft import load_model
    from rwkv_peft.peft.adapt import plan_adapters, prepare_peft

    C, T = 2048, args.T
    sd = rwkv7_state_dict(n_layer=1, n_embd=C, head_size=64, vocab=16, dims=(96, 96, 64, 256), seed=0)
    setups = [("frozen block", None), ("LoRA r=32", ("lora", {"r": 32, "alpha": 32})),
              ("PiSSA r=32", ("pissa", {"r": 32})), ("Bone r=64", ("bone", {"r": 64})),
              ("Bat r=64", ("bat", {"r": 64})), ("Bat r=64, materialized delta", ("bat-mat", {"r": 64}))]
    g = torch.Generator().manual_seed(0)
    results = []
    for label, choice in setups:
        model = load_model(sd, dtype=torch.float32).train()
        if choice is None:
            for p in model.parameters():
                p.requires_grad_(False)
        else:
            name, hp = choice
            methods, _ = prepare_peft(model, plan_adapters(model, [], (name.removesuffix("-mat"), hp)))
            if name == "bat-mat":  # the same parameters, run by the materializing forward
                for m in methods.values():
                    m.__class__ = MaterializedBat
            with torch.no_grad():  # nonzero adapters, as after some training
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.01 * torch.randn(p.shape, generator=g))
        block = model.blocks[0]
        params = [p for p in block.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        for B in args.batches:
            x = torch.randn(B, T, C, generator=g).requires_grad_(True)
            saved_bytes, _ = new_storage_bytes(lambda: block(x, None)[0],
                                               [x, *block.parameters(), *block.buffers()])
            gy = torch.randn(B, T, C, generator=g)
            times = []
            for i in range(args.warmup + args.block_repeats):
                x.grad = None
                for p in params:
                    p.grad = None
                t0 = time.perf_counter()
                out, _, _ = block(x, None)
                out.backward(gy)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            results.append(dict(B=B, T=T, C=C, variant=label, trainable=trainable,
                                time_ms=1e3 * statistics.median(times), saved_bytes=saved_bytes))
        log(f"  {label} done")
    return results


def table_block(results):
    lines = ["| whole block (C=2048, T=512) | trainable | " + " | ".join(
        f"B={B} fwd+bwd ms (vs frozen) | B={B} saved MiB (vs Bone)" for B in sorted({r['B'] for r in results})) + " |"]
    batches = sorted({r["B"] for r in results})
    lines.append("|---|---:|" + "---:|---:|" * len(batches))
    by = {(r["variant"], r["B"]): r for r in results}
    for variant in dict.fromkeys(r["variant"] for r in results):
        cells = []
        for B in batches:
            r, frozen, bone = by[(variant, B)], by[("frozen block", B)], by[("Bone r=64", B)]
            cells.append(f"{r['time_ms']:.0f} ({r['time_ms'] / frozen['time_ms']:.2f}x)")
            cells.append(f"{r['saved_bytes'] / 2**20:.0f} ({r['saved_bytes'] / bone['saved_bytes']:.2f}x)")
        lines.append(f"| {variant} | {by[(variant, batches[0])]['trainable']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller grid: B=1,2, fewer repeats, 4 PiSSA blocks")
    ap.add_argument("--json", type=Path, help="also write all numbers to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="RWKV-7 0.4B blocks for the PiSSA init (24 = whole model)")
    ap.add_argument("--skip-pissa-init", action="store_true")
    ap.add_argument("--block", action="store_true", help="only the whole-block benchmark (C=2048)")
    ap.add_argument("--block-repeats", type=int, default=3, help="timed repeats per block variant")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.T = 512
    args.batches = [1, 2] if args.quick else [1, 2, 4]
    args.warmup = 1 if args.quick else 2
    args.repeats = args.repeats or (5 if args.quick else 7)
    args.layers = args.layers or (4 if args.quick else 24)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    env = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
               cpus=os.cpu_count(), machine=platform.machine(),
               loadavg_start=os.getloadavg() if hasattr(os, "getloadavg") else None)
    log(f"benchmarking ({command}) ...")
    if args.block:
        block = bench_block(args, log)
        print(f"# Whole RWKV-7 block (CPU)\n\ncommand: `{command}`\n")
        print("Adapters on every default target (att.receptance/key/value/output, ffn.key/value); time is the "
              f"median of {args.block_repeats} forward + backward passes after {args.warmup} warm-up; memory is "
              "what autograd saves for backward that the forward created (weights excluded).\n")
        print(table_block(block))
        if args.json:
            args.json.write_text(json.dumps(dict(command=command, block=block), indent=1))
        return
    t0 = time.perf_counter()
    linear = bench_linear(args, log)
    pissa = None if args.skip_pissa_init else bench_pissa_init(args, log)
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["wall_s"] = time.perf_counter() - t0

    print(f"# PEFT methods benchmark (CPU)\n\ncommand: `{command}`\n")
    print(f"torch {env['torch']}, python {env['python']}, {env['threads']} torch thread(s), "
          f"{env['cpus']} CPUs, load average at start/end {env['loadavg_start']} / {env['loadavg_end']}; "
          f"median of {args.repeats} repeats after {args.warmup} warm-up step(s); wall {env['wall_s']:.0f}s")
    print("\n## 1. One adapted linear: forward + backward\n")
    print("Memory is a deterministic proxy from `torch.autograd.graph.saved_tensors_hooks`: *saved* = bytes of "
          "the unique storages autograd saves for backward that this forward created (W, x and the adapter "
          "parameters excluded: they exist anyway); *kept* = the same over saved tensors plus the layer output, "
          "i.e. what this forward leaves alive until backward. Trainable params: LoRA r gives 2*2048*r, Bone r "
          "gives r*2048, Bat r gives (2048/r)*r*r = 2048*r; LoRA r=32 matches Bone/Bat r=64.")
    print(table_linear(linear))
    if pissa:
        print("\n## 2. PiSSA initialisation (`PiSSA.reset_parameters`)")
        print(table_pissa(pissa))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(command=command, env=env, linear=linear, pissa_init=pissa), indent=1))
        print(f"\n(numbers written to {args.json})")


if __name__ == "__main__":
    main()
