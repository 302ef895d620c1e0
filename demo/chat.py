"""Chat with an RWKV model: `python demo/chat.py --help` (the code is rwkv_peft/chat.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from rwkv_peft.chat import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="demo/chat.py"))
