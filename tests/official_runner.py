"""Run the official `rwkv` package (the parity reference) on a checkpoint, in its own process.

    python official_runner.py VERSION TOKENS_JSON CHECKPOINT.pth OUT.pt [CHECKPOINT.pth OUT.pt ...]

A checkpoint with att.time_state keys (a state-tuned file): the RWKV-6 class reads them
itself; the RWKV-7 class reads none, so they are taken out of the file it loads and set as
its initial WKV state, as given ([head, value, key], the package's own layout).
For each checkpoint writes {"full": [T, V] logits of the whole sequence at once, "steps": [T, V] logits fed
token by token with the carried state}. The package reads RWKV_V7_ON at import, so
RWKV-6 and RWKV-7 must run in separate processes; the caller sets the environment.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def main():
    version, tokens_json, *pairs = sys.argv[1:]
    tokens = json.loads(tokens_json)
    for ckpt, out in zip(pairs[::2], pairs[1::2]):
        run(version, ckpt, tokens, out)


def run(version, ckpt, tokens, out):
    from rwkv.model import RWKV

    initial = None
    if version == "7":
        assert ckpt.endswith(".pth")
        sd = torch.load(ckpt, weights_only=True)
        states = {k: sd.pop(k) for k in list(sd) if k.endswith(".att.time_state")}
        if states:
            ckpt = ckpt[: -len(".pth")] + ".without_state.pth"
            torch.save(sd, ckpt)
        model = RWKV(model=ckpt[: -len(".pth")], strategy="cpu fp32")  # x070 appends .pth
        if states:
            initial = model.generate_zero_state()
            for i in range(model.n_layer):
                initial[i * 3 + 1] = states[f"blocks.{i}.att.time_state"].float().clone()
    else:
        model = RWKV(model=ckpt, strategy="cpu fp32", verbose=False)

    def start():
        return None if initial is None else [s.clone() for s in initial]

    full, _ = model.forward(tokens, start(), full_output=True)
    state, steps = start(), []
    for t in tokens:
        logits, state = model.forward([t], state)
        steps.append(logits.float().clone())
    torch.save({"full": full.float().reshape(len(tokens), -1), "steps": torch.stack(steps)}, out)


def run_official(version: int, checkpoints: list[Path], tokens: list[int], outs: list[Path]) -> list[dict]:
    """From a test: run this script on each checkpoint in one fresh process; load the results."""
    pairs = [str(x) for pair in zip(checkpoints, outs) for x in pair]
    env = dict(os.environ, RWKV_V7_ON="1" if version == 7 else "0", RWKV_CUDA_ON="0", RWKV_JIT_ON="1")
    proc = subprocess.run([sys.executable, __file__, str(version), json.dumps(tokens), *pairs],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"official rwkv runner failed:\n{proc.stdout}\n{proc.stderr}")
    return [torch.load(o, weights_only=True) for o in outs]


if __name__ == "__main__":
    main()
