"""Memory and speed of long-context training (--chunk_ctx) against whole-sequence training.

    python bench/bench_long_context.py [--ctx 512 1024 ... 16384] [--chunk 256] [--vocab 4096] [--json FILE]

A small random RWKV-7 (4 layers, n_embd 256, head size 64, --vocab), Bone r=64 on the
default layers, fp32, batch 1, one torch thread. Each (ctx, mode) runs in its own process:
a warm-up step of two pieces, then one timed training step (forward + backward) of ctx tokens.

Per run:
* saved MB: the most bytes of tensors that autograd held for backward at any moment of the
  step, counted by torch.autograd.graph.saved_tensors_hooks (deterministic). With chunking
  this is the last piece, which runs unrecomputed; every other piece is recomputed in
  backward and holds the same amount then. The boundary states are counted separately.
* state MB: the carried states kept at the piece boundaries (deterministic).
* RSS MB: the process's peak resident memory during the step, above its peak before it.
  --fixed_mmap runs the children with MALLOC_MMAP_THRESHOLD_=131072, so that glibc returns
  every large freed tensor to the system; with its default (a threshold that rises after
  frees), the many equal-sized piece tensors fragment the heap and RSS overstates live memory.
* tokens/s: ctx / the step's wall time.
"""

import argparse
import json
import os
import resource
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


def one_run(ctx: int, chunk: int, vocab: int) -> dict:
    import torch

    from rwkv_peft.model import RWKVConfig, create_model
    from rwkv_peft.peft.adapt import plan_adapters, prepare_peft
    from rwkv_peft.train.long_context import chunked_loss
    from rwkv_peft.train.loss import masked_loss

    torch.set_num_threads(1)
    cfg = RWKVConfig(version=7, n_layer=4, n_embd=256, head_size=64, vocab_size=vocab, dim_ffn=1024,
                     d_decay=64, d_aaa=64, d_mv=32, d_gate=128)
    model = create_model(cfg, seed=0).train()
    prepare_peft(model, plan_adapters(model, [], ("bone", {"r": 64})))

    def step(tokens, counter=None):
        mask = torch.ones(tokens.shape)
        hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack) if counter else None
        with hooks or torch.enable_grad():
            if chunk:
                loss = chunked_loss(model, tokens, tokens.roll(-1, 1), mask, chunk)
            else:
                loss = masked_loss(model(tokens), tokens.roll(-1, 1), mask)
        loss.backward()

    g = torch.Generator().manual_seed(0)
    step(torch.randint(0, vocab, (1, 2 * (chunk or 256)), generator=g))  # both paths of chunked_loss
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = torch.randint(0, vocab, (1, ctx), generator=g)
    counter = SavedBytes()
    start = time.perf_counter()
    step(tokens, counter)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    state = model.zero_state(1)
    state_bytes = sum(t.numel() * t.element_size() for t in (state.att_shift, state.wkv, state.ffn_shift))
    boundaries = (ctx - 1) // chunk if chunk else 0
    return {"ctx": ctx, "chunk_ctx": chunk, "saved_mb": round(counter.peak / 2**20, 2),
            "state_mb": round(boundaries * state_bytes / 2**20, 2), "rss_mb": round(rss, 1),
            "tokens_per_s": round(ctx / seconds, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max_whole", type=int, default=16384, help="largest ctx to run without chunking")
    p.add_argument("--fixed_mmap", action="store_true", help="glibc: allocate tensors over 128 KiB with mmap")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", type=int, nargs=2, metavar=("CTX", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.vocab)))
        return

    rows = []
    print("| ctx | chunk_ctx | saved MB | state MB | peak RSS MB | tokens/s |\n|---:|---:|---:|---:|---:|---:|")
    for ctx in args.ctx:
        for chunk in (args.chunk, 0):
            if chunk == 0 and ctx > args.max_whole:
                continue
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if args.fixed_mmap else None
            out = subprocess.run([sys.executable, __file__, "--one", str(ctx), str(chunk), "--vocab", str(args.vocab)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"ctx {ctx} chunk {chunk} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"| {ctx} | {chunk or 'off'} | {r['saved_mb']} | {r['state_mb']} | {r['rss_mb']} | "
                  f"{r['tokens_per_s']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"vocab": args.vocab, "chunk": args.chunk, "fixed_mmap": args.fixed_mmap,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
