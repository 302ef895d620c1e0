"""llama.cpp itself runs our GGUF exports (issue #21): logits, 32 greedy tokens, and tokenization.

    pip install llama-cpp-python==0.3.36      # builds llama.cpp from source (~13 min on 2 cores)
    python bench/bench_export_llamacpp.py [--json bench/results/export_llamacpp.json]

Two models, each exported by `merge.py --format gguf` (rwkv_peft.export.run.export_files) as
f32, f16, bf16 and q8_0:
    demo    the embedded demo base merged with a random Bone adapter (its tokenizer.json as a
            "gpt2" BPE vocabulary)
    world   a random RWKV-7 (2 layers, C=256) with the World vocabulary ("rwkv" vocabulary)
    world6  a random RWKV-6 of the same sizes (llama.cpp's rwkv6 architecture)
For each file, llama.cpp (through llama-cpp-python) evaluates a 64-token sequence: the largest
|logit difference| from our fp32 model on the merged checkpoint, relative to our largest |logit|;
then 32 greedy tokens after a prompt, llama.cpp's against ours (whole-sequence argmax). Finally
how many texts llama.cpp tokenizes exactly as our tokenizer does (the demo's held-out and
training chats; for World, the same texts).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from official_layout import rwkv6_state_dict, rwkv7_state_dict  # noqa: E402
from rwkv_peft import load_model  # noqa: E402
from rwkv_peft.data.tokenizer import load_tokenizer  # noqa: E402
from rwkv_peft.export.run import export_files  # noqa: E402
from rwkv_peft.io import load_tensor_file  # noqa: E402
from rwkv_peft.peft.adapt import plan_adapters, prepare_peft  # noqa: E402
from rwkv_peft.peft.adapter_file import describe_base, save_adapter  # noqa: E402

TYPES = ("f32", "f16", "bf16", "q8_0")


def texts() -> list[str]:
    out = []
    for name in ("heldout.jsonl", "train.jsonl"):
        for line in (ROOT / "demo" / "data" / name).read_text().splitlines()[:200]:
            msgs = json.loads(line)["messages"]
            out.append("".join(f"{m['role'].title()}: {m['content']}\n\n" for m in msgs))
    return out + ["In 2024,  about 12 345 people   visited the 3rd lake.\n\n\nThen 7 more.", "x  y   z\t\t1 22 333"]


def demo_checkpoint(d: Path) -> tuple[Path, str]:
    """The demo base merged with a random Bone adapter (as a user's fine-tune would be)."""
    sd = load_tensor_file(ROOT / "demo" / "base.pth")
    model = load_model(sd, dtype=torch.float32)
    methods, parts = prepare_peft(model, plan_adapters(model, [], ("bone", {"r": 64})))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in methods.values():
            m.bone.copy_(torch.randn(m.bone.shape, generator=g) * 0.02)
    save_adapter(d / "adapter.safetensors", methods, parts, describe_base(sd, model.config, ROOT / "demo/base.pth"))
    merged = export_files(None, str(d / "adapter.safetensors"), str(d / "demo.pth"), log=lambda *a: None)
    return Path(merged), str(ROOT / "demo" / "tokenizer.json")


def world_checkpoint(d: Path) -> tuple[Path, str]:
    torch.save(rwkv7_state_dict(n_layer=2, n_embd=256, head_size=64, vocab=65536, seed=1), d / "world.pth")
    return d / "world.pth", "world"


def world6_checkpoint(d: Path) -> tuple[Path, str]:
    torch.save(rwkv6_state_dict(n_layer=2, n_embd=256, head_size=64, vocab=65536, seed=1), d / "world6.pth")
    return d / "world6.pth", "world"


def ours_greedy(model, ids, n):
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
    return out


def llama_run(path: Path, ids: list[int], prompt: list[int], n: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], dtype=np.float64)
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):  # greedy, token by token through llama.cpp's recurrent state
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return llm, logits, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, make in (("demo", demo_checkpoint), ("world", world_checkpoint), ("world6", world6_checkpoint)):
            checkpoint, tok_spec = make(tmp)
            tok = load_tokenizer(tok_spec)
            model = load_model(checkpoint, dtype=torch.float32)
            sample = texts()
            ids = tok.encode(sample[0] + sample[1])[:64]
            prompt = tok.encode("User: What is the national animal of Varnholm?\n\nAssistant:")
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0].double().numpy()
            expected = ours_greedy(model, prompt, 32)
            for gguf_type in TYPES:
                path = tmp / f"{name}-{gguf_type}.gguf"
                export_files(str(checkpoint), None, str(path), "gguf", gguf_type=gguf_type, log=lambda *a: None)
                t0 = time.time()
                llm, logits, greedy = llama_run(path, ids, prompt, 32)
                rel = float(np.abs(logits - ours).max() / np.abs(ours).max())
                same = next((i for i, (a, b) in enumerate(zip(greedy, expected)) if a != b), 32)
                row = {"rel_logit_diff": rel, "greedy_equal_steps": same, "file_bytes": path.stat().st_size,
                       "llama_seconds": round(time.time() - t0, 2)}
                if gguf_type == "f32":
                    agree = sum(llm.tokenize(t.encode(), add_bos=False, special=False) == tok.encode(t) for t in sample)
                    row["tokenization_equal"] = f"{agree}/{len(sample)}"
                results[f"{name}/{gguf_type}"] = row
                print(f"{name:6s} {gguf_type:5s} logits rel diff {rel:.2e}  greedy equal for {same}/32 steps"
                      + (f"  tokenization equal {row['tokenization_equal']}" if "tokenization_equal" in row else ""),
                      flush=True)
                del llm
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
