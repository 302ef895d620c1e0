"""Fold a trained adapter into a plain RWKV checkpoint that any RWKV runtime loads.

    python merge.py                                   # newest adapter under out/, its recorded base
    python merge.py --base base.pth --adapter out/adapter.safetensors --output merged.pth
"""

import sys

from rwkv_peft.commands import merge as main

if __name__ == "__main__":
    sys.exit(main())
