"""CPU prefill and decode speed of rwkv_peft against the official `rwkv` package, in one run.

    python bench/bench_cpu_inference.py [--version 7] [--reps 5] [--prompt 512] [--decode 32] [--profile]

A random checkpoint in the official layout (default: the RWKV-7 0.1B shape, 12 layers,
C = 768, V = 65536) is loaded by both runtimes, fp32. Each repetition times, in turn:
  prefill: logits after a --prompt token prompt (ours: generate.prefill; official:
           model.forward(ids, None));
  decode:  --decode tokens fed one at a time with the carried state (ours: the one-token
           Decoder that generation uses, and the sequence forward model(tok, state) it
           replaced; official: model.forward([tok], state)).
Implementations are interleaved inside every repetition and each figure is the median
over repetitions, so ratios come from the same stretch of machine load. --profile adds a
torch.profiler table (self CPU time) of our decode steps and of our prefill.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def shapes(version: int) -> dict:
    from official_layout import rwkv6_state_dict, rwkv7_state_dict

    if version == 7:
        return rwkv7_state_dict(n_layer=12, n_embd=768, head_size=64, vocab=65536, dims=(64, 64, 32, 128), seed=0)
    return rwkv6_state_dict(n_layer=12, n_embd=768, head_size=64, vocab=65536, dims=(32, 64), seed=0)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", type=int, choices=(6, 7), default=7)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt", type=int, default=512, help="prefill length in tokens (default 512)")
    p.add_argument("--decode", type=int, default=32, help="decode steps per repetition (default 32)")
    p.add_argument("--threads", type=int, help="torch threads for both runtimes (default: torch's)")
    p.add_argument("--profile", action="store_true", help="also print where our decode and prefill spend time")
    args = p.parse_args()

    os.environ["RWKV_V7_ON"] = "1" if args.version == 7 else "0"  # read by `rwkv` at import
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    import torch
    from rwkv.model import RWKV as OfficialRWKV

    if args.threads:
        torch.set_num_threads(args.threads)

    from rwkv_peft import load_model
    from rwkv_peft.generate import prefill
    from rwkv_peft.model.decode import MatVec

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 65536, (args.prompt,), generator=g).tolist()
    steps = torch.randint(0, 65536, (args.decode,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.pth"
        torch.save(shapes(args.version), path)
        ours = load_model(path, dtype=torch.float32)
        # (the package appends .pth; with RWKV_V7_ON its RWKV class takes no verbose=)
        official = OfficialRWKV(model=str(path)[:-4], strategy="cpu fp32")
    t0 = time.perf_counter()
    decoder = ours.decoder()
    build_s = time.perf_counter() - t0

    def ours_prefill():
        return prefill(ours, prompt)

    def official_prefill():
        return official.forward(prompt, None)

    def ours_decode():
        state = ours.zero_state(1)
        for tok in steps:
            logits, state = decoder.step(tok, state)
        return logits

    @torch.inference_mode()
    def ours_sequence_decode():
        state = ours.zero_state(1)
        for tok in steps:
            logits, state = ours(torch.tensor([[tok]]), state)
        return logits

    def official_decode():
        state = None
        for tok in steps:
            logits, state = official.forward([tok], state)
        return logits

    # the implementations agree before they are timed
    ref = official_decode()
    rel = lambda a: float((a.reshape(-1) - ref.reshape(-1)).abs().max() / ref.abs().max())  # noqa: E731
    agree = {"decoder": rel(ours_decode()), "sequence forward": rel(ours_sequence_decode()[0, -1])}
    pref = official_prefill()[0]
    agree["prefill"] = float((ours_prefill()[0] - pref).abs().max() / pref.abs().max())

    # Floors: the weight products alone. Prefill: every linear layer on a [prompt, C] input
    # (the head on one row, as last_only does); decode: every weight read once by a
    # matrix-vector product in the Decoder's layouts.
    linears = [m for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and name != "head"]
    inputs = {m.in_features: torch.randn(args.prompt, m.in_features) for m in linears}

    @torch.inference_mode()
    def prefill_matmuls():
        for m in linears:
            inputs[m.in_features] @ m.weight.t()
        ours.head(inputs[ours.config.n_embd][-1:])

    @torch.inference_mode()
    def decode_matvecs():
        for _ in steps:
            for lay in decoder.layers:
                for mv in lay.values():
                    if isinstance(mv, MatVec):
                        mv(inputs[mv.weight.shape[1 - mv.transposed]][0])
            decoder.head(inputs[ours.config.n_embd][0])

    cases = {"prefill ours": ours_prefill, "prefill official": official_prefill, "decode ours": ours_decode,
             "decode ours (sequence forward)": ours_sequence_decode, "decode official": official_decode,
             "prefill floor: weight products only": prefill_matmuls,
             "decode floor: weight products only": decode_matvecs}
    times = {name: [] for name in cases}
    load_before = os.getloadavg()[0]
    for _ in range(args.reps):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    load_after = os.getloadavg()[0]
    med = {name: statistics.median(t) for name, t in times.items()}
    rate = {name: (args.prompt if name.startswith("prefill") else args.decode) / s for name, s in med.items()}

    print(f"RWKV-{args.version} L12 C768 V65536 fp32, {torch.get_num_threads()} threads, {args.reps} interleaved "
          f"repetitions (medians), load average {load_before:.1f} -> {load_after:.1f}")
    print(f"decoder build (layout copies): {build_s * 1e3:.0f} ms; max rel diff from official: "
          + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()) + "\n")
    print("| case | tokens/s | vs official |")
    print("|---|---:|---:|")
    for name in cases:
        kind = name.split()[0]
        print(f"| {name} | {rate[name]:.1f} | {rate[name] / rate[f'{kind} official']:.2f}x |")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (("decode (Decoder.step)", ours_decode), ("prefill", ours_prefill)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\nour {label}: ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
