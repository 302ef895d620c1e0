"""Fine-tune an RWKV-7 or RWKV-6 model with LoRA, PiSSA, Bone or Bat (or fully), on DeepSpeed.

    python train.py --peft bone --bone_r 64          # the embedded demo: tiny base, chat data
    python train.py --load_model RWKV-x070-World-1.5B.pth --data_file my.jsonl --peft lora --lora_r 32
    torchrun --nproc_per_node 4 train.py ...         # or: deepspeed train.py ...
"""

import sys

from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.train.args import parse_args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = parse_args(argv, description=__doc__)  # --help exits here, before the heavy imports
        from rwkv_peft.train.trainer import train

        train(args)
    except RWKVPeftError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
