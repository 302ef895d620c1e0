"""Where the files that ship beside the code are: the embedded demo and the CUDA sources.

In a source checkout they are the repository's top-level demo/ and cuda/ folders; an
installed package (`pip install .`) carries them inside rwkv_peft/ as package data.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    inside = _PACKAGE / name
    return inside if inside.is_dir() else _PACKAGE.parent / name


DEMO_DIR = _shipped("demo")
CUDA_DIR = _shipped("cuda")
DEMO_BASE = DEMO_DIR / "base.pth"
DEMO_TOKENIZER = DEMO_DIR / "tokenizer.json"
DEMO_DATA = DEMO_DIR / "data" / "train.jsonl"
DEMO_HELDOUT = DEMO_DIR / "data" / "heldout.jsonl"
DEMO_PREFERENCE = DEMO_DIR / "data" / "preference.jsonl"  # pairs for --objective dpo/simpo/orpo (demo/make_preference.py)
DEMO_PROMPTS = DEMO_DIR / "data" / "grpo_prompts.jsonl"  # prompts for --objective grpo (demo/make_grpo_prompts.py)
