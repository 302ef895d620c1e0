"""How much of a long-context first pass the output head and the loss take, per model shape.

    python bench/bench_head_share.py [--reps 3]

--chunk_ctx runs every piece but the last forward without autograd before the backward, to
hand its state on and to give the loss (bench/README.md, "Long-context training"). The
state needs only the blocks; the head and the cross entropy are there for the loss. This
times one no-grad piece of 256 tokens whole (blocks, head, masked cross entropy) and
blocks only, on random RWKV-7 models of the official shapes, fp32, one thread, medians.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"bench (4 x 256, V 4096)": (256, 4, 4096), "0.1B (12 x 768)": (768, 12, 65536),
          "0.4B (24 x 1024)": (1024, 24, 65536)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--piece", type=int, default=256)
    args = p.parse_args()

    import torch

    from rwkv_peft.model import RWKVConfig, create_model
    from rwkv_peft.loss import masked_ce_sum_of_piece

    torch.set_num_threads(1)
    print("| shape | piece, whole ms | blocks only ms | head + loss share |\n|---|---:|---:|---:|")
    for name, (C, L, V) in SHAPES.items():
        cfg = RWKVConfig(version=7, n_layer=L, n_embd=C, head_size=64, vocab_size=V, dim_ffn=4 * C,
                         d_decay=64, d_aaa=64, d_mv=32, d_gate=128)
        model = create_model(cfg, seed=0).eval()
        tokens = torch.randint(0, V, (1, args.piece), generator=torch.Generator().manual_seed(0))
        mask, state = torch.ones(tokens.shape), model.zero_state(1)

        def whole():
            logits, _ = model(tokens, state)
            masked_ce_sum_of_piece(logits, tokens, mask, tokens.numel())

        def blocks_only():  # the head on the last position only: what the state needs
            model(tokens, state, last_only=True)

        seconds = {whole: [], blocks_only: []}
        with torch.no_grad():
            for rep in range(args.reps + 1):
                for run, times in seconds.items():
                    start = time.perf_counter()
                    run()
                    if rep:  # the first round is the warm-up
                        times.append(time.perf_counter() - start)
        full, trunk = (statistics.median(seconds[run]) for run in (whole, blocks_only))
        print(f"| {name} | {full * 1000:.0f} | {trunk * 1000:.0f} | {1 - trunk / full:.2f} |", flush=True)


if __name__ == "__main__":
    main()
