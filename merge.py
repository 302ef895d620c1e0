"""Fold a trained adapter into a plain RWKV checkpoint that any RWKV runtime loads.

    python merge.py                                   # newest adapter under out/, its recorded base
    python merge.py --base base.pth --adapter out/adapter.safetensors --output merged.pth
"""

import argparse
import sys

from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.peft.merge import merge_files, newest_adapter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the base .pth checkpoint (default: the one the adapter was trained on)")
    p.add_argument("--adapter", help="adapter file: ours (.safetensors) or RWKV-PEFT's (.pth) "
                                     "(default: the newest under out/)")
    p.add_argument("--output", help="merged checkpoint to write (default: merged.pth beside the adapter)")
    p.add_argument("--no_verify", action="store_true",
                   help="skip running base+adapter and merged on a probe sequence (needs two fp32 copies in RAM)")
    p.add_argument("--lora_alpha", type=float,
                   help="LoRA alpha of an RWKV-PEFT .pth adapter, which does not record it (default: alpha = r)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        adapter = args.adapter or newest_adapter("out")
        output = merge_files(args.base, adapter, args.output, verify=not args.no_verify, lora_alpha=args.lora_alpha)
    except RWKVPeftError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"next: python demo/chat.py --model {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
