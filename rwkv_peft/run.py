"""Run an RWKV checkpoint: print what was inferred from it, then continue a prompt greedily.

    python -m rwkv_peft.run --model path/to/RWKV-x070-World-0.1B.pth --prompt "The Eiffel tower is in"

With no --model it creates a fresh (untrained) tiny RWKV-7 with the official initialisation,
saves it under out/, and runs that: the text is random, but every step is real.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .errors import RWKVPeftError
from .io import save_tensor_file_atomic
from .model import RWKVConfig, create_model, load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m rwkv_peft.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="official RWKV-6/7 .pth checkpoint (default: create a fresh tiny RWKV-7)")
    p.add_argument("--prompt", default="The Eiffel tower is in the city of", help="text to continue")
    p.add_argument("--tokens", type=int, default=24, help="number of tokens to generate (default 24)")
    p.add_argument("--tokenizer", default="world", help="'world' or a Hugging Face tokenizer.json")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.tokens <= 0:
        p.error("--tokens must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from .data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        if args.model:
            model = load_model(args.model, dtype=dtype, device=args.device)
        else:
            config = RWKVConfig(version=7, n_layer=2, n_embd=128, head_size=64, vocab_size=tokenizer.vocab_size,
                                dim_ffn=512, d_decay=32, d_aaa=32, d_mv=16, d_gate=64)
            model = create_model(config, seed=0, dtype=dtype, device=args.device).eval()
            path = Path("out") / "fresh-rwkv7-tiny.pth"
            path.parent.mkdir(exist_ok=True)
            save_tensor_file_atomic(model.state_dict(), path)
            print(f"no --model given: created an untrained tiny RWKV-7 and saved it to {path}")
    except RWKVPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"RWKV-{cfg.version}: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads of {cfg.head_size}, "
          f"ffn {cfg.dim_ffn}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters")

    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        print("error: --prompt encodes to no tokens; give some text", file=sys.stderr)
        return 2
    from .generate import Sampling, generate_text

    result = generate_text(model, tokenizer, prompt, None, max_tokens=args.tokens, stop=(),
                           sampling=Sampling(temperature=0.0))
    print(args.prompt + result.text)
    print(f"\n[{len(prompt)} prompt + {len(result.tokens)} generated tokens in "
          f"{result.prefill_s + result.decode_s:.2f} s]")
    print("next: fine-tune it with `python train.py --load_model FILE --data_file DATA`, or chat with "
          "`python demo/chat.py --model FILE`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
