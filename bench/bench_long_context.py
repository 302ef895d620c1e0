"""Memory and speed of long-context training (--chunk_ctx) against whole-sequence training.

    python bench/bench_long_context.py [--ctx 512 1024 ... 16384] [--chunk 256] [--vocab 4096] [--reps 3] [--json FILE]

A small random RWKV-7 (4 layers, n_embd 256, head size 64, --vocab), Bone r=64 on the
default layers, fp32, batch 1, one torch thread.

Memory: each (ctx, mode) runs in its own process: a warm-up step of two pieces, then one
training step (forward + backward) of ctx tokens.

Per run:
* saved MB: the most bytes of tensors that autograd held for backward at any moment of the
  step, counted by torch.autograd.graph.saved_tensors_hooks (deterministic). With chunking
  this is the last piece, which runs unrecomputed; every other piece is recomputed in
  backward and holds the same amount then, plus the states at the piece boundaries, which
  the pieces keep for their backward.
* state MB: those boundary states alone (deterministic).
* RSS MB: the process's peak resident memory during the step, above its peak before it.
  --fixed_mmap runs the children with MALLOC_MMAP_THRESHOLD_=131072, so that glibc returns
  every large freed tensor to the system; with its default (a threshold that rises after
  frees), the many equal-sized piece tensors fragment the heap and RSS overstates live memory.
* tokens/s: speed runs in one process per ctx, chunked and unchunked training steps
  interleaved (--reps of each after one warm-up of each), ctx / the median step time; the
  ratio is taken within that process, so load that comes and goes hits both modes alike.
* ceiling: the best ratio any exact scheme with one piece of activation memory can reach,
  measured in the same interleaved rounds: unchunked step time / (time of training the
  pieces with the state carried and every piece's graph kept, no recompute + time of the
  no-grad forward of every piece but the last, loss included). The second term is the
  work exactness adds: each piece but the last must run forward once to hand its state on
  and give the loss, and again in backward to give its gradients. "of ceiling" is ratio /
  ceiling: how much of that the implementation reaches.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class SavedBytes:
    """Live bytes of the tensors autograd saves for backward, and their peak."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        return _Held(self, tensor)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, counter, tensor):
        self.counter, self.tensor = counter, tensor
        self.nbytes = tensor.numel() * tensor.element_size()
        counter.live += self.nbytes
        counter.peak = max(counter.peak, counter.live)

    def __del__(self):
        self.counter.live -= self.nbytes


def bench_model(vocab: int):
    import torch

    from rwkv_peft.model import RWKVConfig, create_model
    from rwkv_peft.peft.adapt import plan_adapters, prepare_peft

    torch.set_num_threads(1)
    cfg = RWKVConfig(version=7, n_layer=4, n_embd=256, head_size=64, vocab_size=vocab, dim_ffn=1024,
                     d_decay=64, d_aaa=64, d_mv=32, d_gate=128)
    model = create_model(cfg, seed=0).train()
    prepare_peft(model, plan_adapters(model, [], ("bone", {"r": 64})))
    return model


def train_step(model, tokens, chunk: int, counter=None):
    """One forward + backward of tokens [1, T], in pieces of chunk tokens (0: whole)."""
    import torch

    from rwkv_peft.train.long_context import chunked_loss
    from rwkv_peft.loss import masked_loss

    mask = torch.ones(tokens.shape)
    hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack) if counter else None
    with hooks or torch.enable_grad():
        if chunk:
            loss = chunked_loss(model, tokens, tokens.roll(-1, 1), mask, chunk)
        else:
            loss = masked_loss(model(tokens), tokens.roll(-1, 1), mask)
    loss.backward()
    model.zero_grad(set_to_none=True)


def piece_ce_sums(model, tokens, chunk: int, end: int):
    """The masked cross-entropy sum of each piece of chunk tokens that starts before `end`, with
    the state carried from piece to piece (autograd as the caller has it)."""
    import torch

    from rwkv_peft.loss import masked_ce_sum_of_piece

    targets, mask, state = tokens.roll(-1, 1), torch.ones(tokens.shape), model.zero_state(1)
    for start in range(0, end, chunk):
        piece = slice(start, start + chunk)
        logits, state = model(tokens[:, piece], state)
        yield masked_ce_sum_of_piece(logits, targets[:, piece], mask[:, piece], tokens.numel())[0]


def pieces_step(model, tokens, chunk: int):
    """Forward + backward in pieces of chunk tokens with the state carried and every piece's
    graph kept (no recompute; memory grows with ctx): chunked_loss's work minus its first pass."""
    (sum(piece_ce_sums(model, tokens, chunk, tokens.shape[1])) / tokens.numel()).backward()
    model.zero_grad(set_to_none=True)


def first_pass(model, tokens, chunk: int):
    """The no-grad forward of every piece but the last, loss included: the work exactness adds."""
    import torch

    with torch.no_grad():
        for _ in piece_ce_sums(model, tokens, chunk, tokens.shape[1] - chunk):
            pass


def one_run(ctx: int, chunk: int, vocab: int) -> dict:
    import torch

    model = bench_model(vocab)
    g = torch.Generator().manual_seed(0)
    train_step(model, torch.randint(0, vocab, (1, 2 * (chunk or 256)), generator=g), chunk)  # both paths
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = torch.randint(0, vocab, (1, ctx), generator=g)
    counter = SavedBytes()
    train_step(model, tokens, chunk, counter)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    state = model.zero_state(1)
    state_bytes = sum(t.numel() * t.element_size() for t in (state.att_shift, state.wkv, state.ffn_shift))
    boundaries = (ctx - 1) // chunk if chunk else 0
    return {"ctx": ctx, "chunk_ctx": chunk, "saved_mb": round(counter.peak / 2**20, 2),
            "state_mb": round(boundaries * state_bytes / 2**20, 2), "rss_mb": round(rss, 1)}


def speed_run(ctx: int, chunk: int, vocab: int, reps: int) -> dict:
    """Median tokens/s of chunked and whole training steps, and the ceiling of their ratio
    (module docstring), all interleaved in this process."""
    import torch

    model = bench_model(vocab)
    tokens = torch.randint(0, vocab, (1, ctx), generator=torch.Generator().manual_seed(0))
    runs = {"chunked": lambda: train_step(model, tokens, chunk), "whole": lambda: train_step(model, tokens, 0),
            "pieces": lambda: pieces_step(model, tokens, chunk), "first_pass": lambda: first_pass(model, tokens, chunk)}
    seconds = {mode: [] for mode in runs}
    for rep in range(reps + 1):
        for mode, run in runs.items():
            start = time.perf_counter()
            run()
            if rep:  # the first round is the warm-up
                seconds[mode].append(time.perf_counter() - start)
    t = {mode: statistics.median(s) for mode, s in seconds.items()}
    ratio, ceiling = t["whole"] / t["chunked"], t["whole"] / (t["pieces"] + t["first_pass"])
    return {"ctx": ctx, "chunked_tokens_per_s": round(ctx / t["chunked"], 1), "whole_tokens_per_s": round(ctx / t["whole"], 1),
            "ratio": round(ratio, 3), "ceiling": round(ceiling, 3), "of_ceiling": round(ratio / ceiling, 3),
            "seconds": {mode: round(v, 4) for mode, v in t.items()}, "load_average": round(os.getloadavg()[0], 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max_whole", type=int, default=16384, help="largest ctx to run without chunking")
    p.add_argument("--fixed_mmap", action="store_true", help="glibc: allocate tensors over 128 KiB with mmap")
    p.add_argument("--reps", type=int, default=3, help="timed steps of each mode per ctx (after one warm-up)")
    p.add_argument("--only", choices=("memory", "speed"), help="run one of the two tables")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", type=int, nargs=2, metavar=("CTX", "CHUNK"), help=argparse.SUPPRESS)
    p.add_argument("--speed", type=int, metavar="CTX", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.vocab)))
        return
    if args.speed:
        print(json.dumps(speed_run(args.speed, args.chunk, args.vocab, args.reps)))
        return

    def child(*flags):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if args.fixed_mmap else None
        out = subprocess.run([sys.executable, __file__, *map(str, flags), "--vocab", str(args.vocab),
                              "--chunk", str(args.chunk), "--reps", str(args.reps)], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{flags} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

    memory, speed = [], []
    if args.only != "speed":
        print("| ctx | chunk_ctx | saved MB | state MB | peak RSS MB |\n|---:|---:|---:|---:|---:|")
        for ctx in args.ctx:
            for chunk in (args.chunk, 0):
                if (chunk == 0 and ctx > args.max_whole) or not (r := child("--one", ctx, chunk)):
                    continue
                memory.append(r)
                print(f"| {ctx} | {chunk or 'off'} | {r['saved_mb']} | {r['state_mb']} | {r['rss_mb']} |", flush=True)
    if args.only != "memory":
        print("\n| ctx | chunked tok/s | unchunked tok/s | ratio | ceiling | of ceiling | load average |\n"
              "|---:|---:|---:|---:|---:|---:|---:|")
        for ctx in args.ctx:
            if ctx > args.max_whole or not (r := child("--speed", ctx)):
                continue
            speed.append(r)
            print(f"| {ctx} | {r['chunked_tokens_per_s']} | {r['whole_tokens_per_s']} | {r['ratio']:.2f} | "
                  f"{r['ceiling']:.2f} | {r['of_ceiling']:.2f} | {r['load_average']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"vocab": args.vocab, "chunk": args.chunk, "fixed_mmap": args.fixed_mmap,
                                               "reps": args.reps, "memory": memory, "speed": speed}, indent=1))


if __name__ == "__main__":
    main()
