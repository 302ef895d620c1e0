"""Fine-tune an RWKV-7 or RWKV-6 model with LoRA, PiSSA, Bone or Bat (or fully), on DeepSpeed.

    python train.py --peft bone --bone_r 64          # the embedded demo: tiny base, chat data
    python train.py --load_model RWKV-x070-World-1.5B.pth --data_file my.jsonl --peft lora --lora_r 32
    torchrun --nproc_per_node 4 train.py ...         # or: deepspeed train.py ...
"""

import sys

from rwkv_peft.commands import train as main

if __name__ == "__main__":
    sys.exit(main())
