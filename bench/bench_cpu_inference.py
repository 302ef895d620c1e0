"""CPU prefill and decode speed of rwkv_peft against the official `rwkv` package, in one run.

    python bench/bench_cpu_inference.py [--version 7] [--reps 5] [--prompt 512] [--decode 32] [--profile]
                                        [--baseline GIT_REV]

A random checkpoint in the official layout (default: the RWKV-7 0.1B shape, 12 layers,
C = 768, V = 65536) is loaded by both runtimes, fp32. Each repetition times, in turn:
  prefill: logits after a --prompt token prompt (ours: generate.prefill; official:
           model.forward(ids, None));
  decode:  --decode tokens fed one at a time with the carried state (ours: the one-token
           Decoder that generation uses, and the sequence forward model(tok, state) it
           replaced; official: model.forward([tok], state)).
--baseline REV adds the Decoder of that git revision (rwkv_peft/model/decode.py as it was
there) as one more decode case. Implementations are interleaved inside every repetition and
each figure is the median over repetitions, so ratios come from the same stretch of machine
load. --profile adds a torch.profiler table (self CPU time) of our decode steps and of our
prefill.

Before timing, every decoded token's logits are checked against a float64 recomputation
(our sequence forward on the model loaded in float64): the Decoder's logits must be as close
to it as the official package's are, within a factor of 3 (relative RMS over all tokens and
logits). A fixed tolerance does not fit here: with these random weights, fp32 rounding alone
moves the official package's logits by up to 1e-3 of their largest value on some tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
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


# the Decoder's low-rank mix factors (RWKV-7, RWKV-6), for the second decode floor
LOW_RANK = ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2", "maa_w1", "decay_w1", "decay_w2")


def baseline_decoder(rev: str, tmp: str):
    """The Decoder class of rwkv_peft/model/decode.py at git revision rev."""
    source = subprocess.run(["git", "show", f"{rev}:rwkv_peft/model/decode.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tmp) / "decode_baseline.py"
    path.write_text(source)
    # imported inside the package, so that its relative imports (.common) resolve
    spec = importlib.util.spec_from_file_location("rwkv_peft.model._decode_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Decoder


def rel_rms(a, ref) -> float:
    return float(((a.double() - ref).pow(2).mean() / ref.pow(2).mean()).sqrt())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", type=int, choices=(6, 7), default=7)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt", type=int, default=512, help="prefill length in tokens (default 512; 0: decode only)")
    p.add_argument("--decode", type=int, default=32, help="decode steps per repetition (default 32)")
    p.add_argument("--threads", type=int, help="torch threads for both runtimes (default: torch's)")
    p.add_argument("--profile", action="store_true", help="also print where our decode and prefill spend time")
    p.add_argument("--baseline", metavar="REV", help="also time the Decoder of this git revision")
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

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 65536, (args.prompt,), generator=g).tolist()
    steps = torch.randint(0, 65536, (args.decode,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.pth"
        torch.save(shapes(args.version), path)
        ours = load_model(path, dtype=torch.float32)
        # (the package appends .pth; with RWKV_V7_ON its RWKV class takes no verbose=)
        official = OfficialRWKV(model=str(path)[:-4], strategy="cpu fp32")
        Baseline = baseline_decoder(args.baseline, tmp) if args.baseline else None
    t0 = time.perf_counter()
    decoder = ours.decoder()
    build_s = time.perf_counter() - t0

    def ours_prefill():
        return prefill(ours, prompt)

    def official_prefill():
        return official.forward(prompt, None)

    def decode_with(dec, every=False):
        def run():
            state, out = ours.zero_state(1), []
            for tok in steps:
                logits, state = dec.step(tok, state)
                out.append(logits)
            return torch.stack(out) if every else logits
        return run

    ours_decode = decode_with(decoder)

    @torch.inference_mode()
    def ours_sequence_decode():
        state = ours.zero_state(1)
        for tok in steps:
            logits, state = ours(torch.tensor([[tok]]), state)
        return logits

    def official_decode(every=False):
        state, out = None, []
        for tok in steps:
            logits, state = official.forward([tok], state)
            out.append(logits)
        return torch.stack(out) if every else logits

    # The implementations agree before they are timed: every decoded token against a float64
    # recomputation (see the docstring), and the last token and the prefill against the official.
    with torch.inference_mode():
        exact_model = load_model(shapes(args.version), dtype=torch.float64)
        state, exact = exact_model.zero_state(1), []
        for tok in steps:
            logits, state = exact_model(torch.tensor([[tok]]), state)
            exact.append(logits[0, -1])
        exact = torch.stack(exact)
        del exact_model, state
    to_exact = {"official": rel_rms(official_decode(every=True), exact),
                "decoder": rel_rms(decode_with(decoder, every=True)(), exact)}
    if Baseline:
        to_exact["baseline decoder"] = rel_rms(decode_with(Baseline(ours), every=True)(), exact)
    if to_exact["decoder"] > 3 * to_exact["official"]:
        sys.exit(f"the Decoder's logits are further from the float64 ones ({to_exact['decoder']:.1e}) than 3x the "
                 f"official package's ({to_exact['official']:.1e})")
    ref = official_decode()
    rel = lambda a: float((a.reshape(-1) - ref.reshape(-1)).abs().max() / ref.abs().max())  # noqa: E731
    agree = {"decoder": rel(ours_decode()), "sequence forward": rel(ours_sequence_decode()[0, -1])}
    if args.prompt:
        pref = official_prefill()[0]
        agree["prefill"] = float((ours_prefill()[0] - pref).abs().max() / pref.abs().max())

    # Floors: the weight products alone. Prefill: every linear layer on a [prompt, C] input
    # (the head on one row, as last_only does); decode: every linear weight and the head read
    # once by a matrix-vector product in the Decoder's layouts, then the same with the
    # low-rank mixes' factors too (0.1B shape: 541 MB, then 562 MB per token).
    linears = [m for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and name != "head"]
    inputs = {m.in_features: torch.randn(args.prompt, m.in_features) for m in linears}

    @torch.inference_mode()
    def prefill_matmuls():
        for m in linears:
            inputs[m.in_features] @ m.weight.t()
        ours.head(inputs[ours.config.n_embd][-1:])

    matrices = decoder.matrices()
    low_rank = [getattr(lay, n) for lay in decoder.layers for n in LOW_RANK if getattr(lay, n, None) is not None]
    vectors = {m.shape[1]: torch.randn(m.shape[1]) for m in matrices + low_rank}

    def matvecs(ms):
        @torch.inference_mode()
        def run():
            for _ in steps:
                for m in ms:
                    torch.mv(m, vectors[m.shape[1]])
        return run
    decode_matvecs = matvecs(matrices)

    cases = {"prefill ours": ours_prefill, "prefill official": official_prefill, "decode ours": ours_decode,
             "decode ours (sequence forward)": ours_sequence_decode, "decode official": official_decode,
             "prefill floor: weight products only": prefill_matmuls,
             "decode floor: weight products only": decode_matvecs,
             "decode floor, low-rank mixes too": matvecs(matrices + low_rank)}
    if Baseline:
        cases[f"decode ours at {args.baseline}"] = decode_with(Baseline(ours))
    if not args.prompt:
        cases = {name: fn for name, fn in cases.items() if not name.startswith("prefill")}
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
    print(f"decoder build (layout copies): {build_s * 1e3:.0f} ms; max rel diff from official (last token): "
          + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
    print(f"relative RMS from float64 logits over {args.decode} decoded tokens: "
          + ", ".join(f"{k} {v:.1e}" for k, v in to_exact.items()) + "\n")
    print("| case | tokens/s | vs official |")
    print("|---|---:|---:|")
    for name in cases:
        kind = name.split()[0]
        print(f"| {name} | {rate[name]:.1f} | {rate[name] / rate[f'{kind} official']:.2f}x |")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (("decode (Decoder.step)", ours_decode), ("prefill", ours_prefill))[:1 + bool(args.prompt)]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\nour {label}: ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
