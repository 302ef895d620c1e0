"""Run an RWKV checkpoint: print what was inferred from it, then continue a prompt greedily.

    python -m rwkv_peft.run --model path/to/RWKV-x070-World-0.1B.pth --prompt "The Eiffel tower is in"

With no --model it runs the embedded demo base. The tokenizer is chosen as chat and eval
choose it: the demo's for a model of its vocabulary size, the World tokenizer for 65536.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .assets import DEMO_BASE
from .cli import add_op_flag, checked, command, parse_checked, positive, prog, run_command, usable_device
from .data.tokenizer import tokenizer_for
from .errors import RWKVPeftError
from .generate import Sampling, generate_text
from .model import load_model
from .model import wkv_dispatch


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=prog("run"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_BASE), help="RWKV-6/7 checkpoint, .pth or .safetensors "
                                                           "(default: the embedded demo base)")
    p.add_argument("--prompt", default="The Eiffel tower is in the city of", help="text to continue")
    p.add_argument("--tokens", type=checked(int, positive), default=24,
                   help="number of tokens to generate (default 24)")
    p.add_argument("--tokenizer", default="auto", help="'world', a Hugging Face tokenizer.json, or auto (default: "
                                                       "as demo/chat.py chooses)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--device", type=checked(str, usable_device),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    add_op_flag(p)
    return parse_checked(p, argv)


def main(argv=None) -> int:
    return run_command(_command, argv)


def _command(argv) -> None:
    args = parse_args(argv)
    wkv_dispatch.set_op(args.op)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load_model(args.model, dtype=dtype, device=args.device)
    tokenizer = tokenizer_for(model.config.vocab_size, args.tokenizer)

    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"RWKV-{cfg.version}: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads of {cfg.head_size}, "
          f"ffn {cfg.dim_ffn}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters")

    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise RWKVPeftError("--prompt encodes to no tokens; give some text")
    result = generate_text(model, tokenizer, prompt, None, max_tokens=args.tokens, stop=(),
                           sampling=Sampling(temperature=0.0))
    print(args.prompt + result.text)
    print(f"\n[{len(prompt)} prompt + {len(result.tokens)} generated tokens in "
          f"{result.prefill_s + result.decode_s:.2f} s]")
    print(f"next: fine-tune it with `{command('train')} --load_model FILE --data_file DATA`, or chat with "
          f"`{command('chat')} --model FILE`")


if __name__ == "__main__":
    sys.exit(main())
