"""Held-out loss and a task score for a base model and its fine-tuned versions, as one table.

    python -m rwkv_peft.eval --adapter out/run-A/adapter.safetensors            # base vs base+adapter
    python -m rwkv_peft.eval --adapter out/bone/adapter.safetensors out/lora/adapter.safetensors
    python -m rwkv_peft.eval --model out/run-A/merged.pth --base demo/base.pth
    python -m rwkv_peft.eval --model demo/base.pth --data my_heldout.jsonl

Rows: --base (if given), then --model (default: the base the first adapter was trained on),
then --model + each --adapter, run unmerged. The data file defaults to the demo's held-out set.

- loss: mean cross entropy per trained token, over the assistant replies only (the chat
  records rendered and masked exactly as for training; one record per sample, mode "pad").
- task: each assistant turn is answered greedily (temperature 0, stop at "\\n\\n") from
  the conversation before it. A record's "answer" field, if present, must appear in the
  reply of its last assistant turn (case-insensitive); other turns must equal their
  message exactly (after stripping). `exact` counts replies equal to the message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from .assets import DEMO_HELDOUT
from .cli import (HelpFormatter, add_foreign_adapter_flags, add_op_flag, checked, non_negative, parse_checked,
                  positive, prog, run_command, usable_device)
from .errors import RWKVPeftError
from .io import atomic_write, check_not_inputs, check_output_file
from .model import wkv_dispatch
from .scoring import heldout_loss, read_records, task_items, task_score



def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=prog("eval"), description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="checkpoint to evaluate; with --adapter, the base the adapters run on "
                                   "(default: the base recorded in the first adapter)")
    p.add_argument("--adapter", nargs="+", default=[], help="adapter file(s), each evaluated on --model")
    add_foreign_adapter_flags(p)
    p.add_argument("--base", help="another checkpoint to evaluate first, as the baseline (e.g. the base of a "
                                  "merged --model)")
    p.add_argument("--data", default=str(DEMO_HELDOUT), help="chat .jsonl ({\"messages\": [...]}, optional "
                                                             "\"answer\")")
    p.add_argument("--tokenizer", default="auto", help="'world', a tokenizer.json, or auto (as demo/chat.py)")
    p.add_argument("--ctx_len", type=checked(int, positive), default=512,
                   help="tokens per record for the loss (longer: cut)")
    p.add_argument("--max_tokens", type=checked(int, positive), default=64,
                   help="longest greedy reply for the task score")
    p.add_argument("--show", type=checked(int, non_negative), default=0, help="print this many replies per model")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--device", type=checked(str, usable_device),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    add_op_flag(p)
    p.add_argument("--threads", type=checked(int, positive),
                   help="CPU threads (default: 1 for models under 20M parameters)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parse_checked(p, argv)


def adapter_info(model, adapter) -> tuple[str, int]:
    """(a short label such as 'bone:64', trainable parameter count) of the adapter (a read
    `Adapter`) that model carries: the methods' parameters (not their buffers, such as
    PiSSA's starting point) and the trained parts the adapter holds."""
    from .peft.methods import PeftMethod

    methods = [m for m in model.modules() if isinstance(m, PeftMethod)]
    labels = sorted({f"{m.name}:{m.r}" for m in methods})
    if any(k.endswith(".att.time_state") for k in adapter.parts):
        labels.append("state")
    n = sum(p.numel() for m in methods for p in m.parameters())
    n += sum(t.numel() for t in adapter.parts.values())
    return "+".join(labels) or "parts", n


def evaluate(args) -> list[dict]:
    from .data.datasets import load_training_data
    from .data.tokenizer import tokenizer_for
    from .generate import set_threads
    from .peft.load import load_model
    from .peft.adapter_file import read_adapter, recorded_base

    # each file read once, for every use below
    adapters = {a: read_adapter(a, lora_alpha=args.lora_alpha, pissa_init=args.pissa_init) for a in args.adapter}
    model_path = args.model
    if model_path is None:
        if not args.adapter:
            raise RWKVPeftError("give --model FILE, or --adapter FILE (its recorded base is then the model)")
        model_path = recorded_base(adapters[args.adapter[0]], args.adapter[0], "pass --model BASE.pth",
                                   what="base")
    rows = ([("base", args.base, None)] if args.base else []) + [("model", model_path, None)]
    rows += [("adapter", model_path, a) for a in args.adapter]
    if args.json:  # checked now, not after the whole evaluation
        check_not_inputs({"--json": args.json}, {
            "--model": model_path, "--base": args.base, "--adapter": args.adapter, "--data": args.data,
            "--tokenizer": args.tokenizer if Path(args.tokenizer).is_file() else None, "--pissa_init": args.pissa_init})
        check_output_file(args.json, f"--json {args.json}")

    records = read_records(args.data)
    tokenizer = None
    results = []
    with tempfile.TemporaryDirectory(prefix="rwkv_peft_eval_") as cache:
        data = items = None
        for kind, path, adapter in rows:
            start = time.perf_counter()
            model = load_model(path, adapter=adapters[adapter] if adapter else None, dtype=torch.float32,
                               device=args.device).eval()
            set_threads(model, args.threads)
            if tokenizer is None:
                tokenizer = tokenizer_for(model.emb.weight.shape[0], args.tokenizer)
                data = load_training_data(args.data, tokenizer, args.ctx_len, mode="pad", cache_dir=cache,
                                          progress=False)
                items = task_items(records, tokenizer)
            loss, n_tokens = heldout_loss(model, data)
            score = task_score(model, tokenizer, items, args.max_tokens)
            label, trainable = adapter_info(model, adapters[adapter]) if adapter else (Path(path).name, 0)
            name = adapter or str(path)  # as given: two adapters of one method stay apart
            results.append({"model": name, "method": label if adapter else kind, "trainable": trainable,
                            "loss": loss, "ppl": math.exp(min(loss, 50.0)), "loss_tokens": n_tokens,
                            "task": score["task"], "exact": score["exact"], "items": score["items"],
                            "seconds": time.perf_counter() - start, "replies": score["replies"]})
            del model
    return results


def print_table(results: list[dict], show: int, out=None) -> None:
    out = out or sys.stdout  # looked up now: a caller may have redirected it
    header = f"{'model':<44} {'method':<10} {'trainable':>10} {'loss':>7} {'ppl':>8} {'task':>13} {'exact':>6}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in results:
        hits = round(r["task"] * r["items"])
        model = r["model"] if len(r["model"]) <= 44 else "..." + r["model"][-41:]
        trainable = f"{r['trainable']:,}" if r["trainable"] else "-"
        print(f"{model:<44} {r['method']:<10} {trainable:>10} {r['loss']:>7.3f} {r['ppl']:>8.2f} "
              f"{hits:>3}/{r['items']:<3} {100 * r['task']:>4.0f}% {100 * r['exact']:>5.0f}%", file=out)
    if results:
        print(f"(loss over {results[0]['loss_tokens']} reply tokens; task over {results[0]['items']} "
              "greedy replies)", file=out)
    for r in results:
        for item, reply, hit in r["replies"][:show]:
            print(f"\n[{r['model']}] {'OK ' if hit else 'MISS'} Q: {item['question']}\n"
                  f"      expected: {item['answer'] or item['expected']}\n      reply:    {reply}", file=out)


def main(argv=None) -> int:
    return run_command(_command, argv)


def _command(argv) -> None:
    args = parse_args(argv)
    wkv_dispatch.set_op(args.op)
    results = evaluate(args)
    print_table(results, args.show)
    if args.json:
        slim = [{k: _finite_or_none(v) for k, v in r.items() if k != "replies"} | {
            "replies": [{"question": i["question"], "expected": i["answer"] or i["expected"], "reply": rep,
                         "hit": hit} for i, rep, hit in r["replies"]]} for r in results]
        # strict JSON: a non-finite loss is null (json.dumps would write NaN, which JSON readers refuse)
        data = json.dumps(slim, indent=1, allow_nan=False).encode()
        atomic_write(args.json, lambda f: f.write(data), f"--json {args.json}")
    bad = [r for r in results if not math.isfinite(r["loss"])]
    if bad:
        raise RWKVPeftError(
            f"the held-out loss of {bad[0]['model']} is {bad[0]['loss']}: its outputs on {args.data} are not finite "
            "although its weights are (loading refuses NaN and Inf), so its numbers overflow; the other figures "
            "of the table stand, that row's loss and perplexity do not")


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


if __name__ == "__main__":
    sys.exit(main())
