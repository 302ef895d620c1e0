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
from .errors import RWKVPeftError
from .model import wkv_dispatch
from .train.loss import masked_ce_sum



def parse_args(argv=None):
    from .peft.adapter_file import add_foreign_adapter_flags
    from .train.args import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m rwkv_peft.eval", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="checkpoint to evaluate; with --adapter, the base the adapters run on "
                                   "(default: the base recorded in the first adapter)")
    p.add_argument("--adapter", nargs="+", default=[], help="adapter file(s), each evaluated on --model")
    add_foreign_adapter_flags(p)
    p.add_argument("--base", help="another checkpoint to evaluate first, as the baseline (e.g. the base of a "
                                  "merged --model)")
    p.add_argument("--data", default=str(DEMO_HELDOUT), help="chat .jsonl ({\"messages\": [...]}, optional "
                                                             "\"answer\")")
    p.add_argument("--tokenizer", default="auto", help="'world', a tokenizer.json, or auto (as demo/chat.py)")
    p.add_argument("--ctx_len", type=int, default=512, help="tokens per record for the loss (longer: cut)")
    p.add_argument("--max_tokens", type=int, default=64, help="longest greedy reply for the task score")
    p.add_argument("--show", type=int, default=0, help="print this many replies per model")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--op", choices=("auto", "cuda", "torch"), default="auto",
                   help="WKV on a GPU: auto (the CUDA kernel when it builds and passes its self-test, else PyTorch "
                        "with one warning line), cuda (the kernel or an error), torch (default: auto)")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 for models under 20M parameters)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def read_records(path: str) -> list[dict]:
    from .data.datasets import iter_jsonl

    p = Path(path)
    if not p.is_file():
        raise RWKVPeftError(f"--data {path} not found; pass a chat .jsonl file")
    records = []
    for n, rec, _ in iter_jsonl(p):
        if rec is None:
            continue
        if not isinstance(rec.get("messages"), list):
            raise RWKVPeftError(f"{path} line {n}: expected a chat record {{\"messages\": [...]}}")
        records.append(rec)
    if not records:
        raise RWKVPeftError(f"{path} holds no records")
    return records


@torch.inference_mode()
def heldout_sums(model, data, indices, batch_size: int = 8) -> tuple[float, int]:
    """(sum of CE over the trained tokens, number of trained tokens) of data's samples at indices.
    Sums rather than a mean, so that shards evaluated apart (one per process) add up exactly."""
    device = model.emb.weight.device
    indices = list(indices)
    total, count = 0.0, 0
    for start in range(0, len(indices), batch_size):
        batch = data.batch(indices[start:start + batch_size])
        logits = model(batch["input_ids"].to(device))
        ce_sum, n_trained = masked_ce_sum(logits, batch["targets"].to(device), batch["loss_mask"].to(device))
        total += float(ce_sum)
        count += int(n_trained)
    return total, count


def heldout_loss(model, data, batch_size: int = 8) -> tuple[float, int]:
    """(mean CE per trained token, number of trained tokens) over every sample of data."""
    total, count = heldout_sums(model, data, range(len(data)), batch_size)
    return total / max(count, 1), count


def task_items(records: list[dict], tokenizer) -> list[dict]:
    """One item per assistant turn: prompt ids, the expected reply, how it is matched."""
    from .data.datasets import CHAT_ASSISTANT, chat_segments, encode_segments

    items = []
    for r, rec in enumerate(records):
        msgs = rec["messages"]
        turns = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"]
        for i in turns:
            segments = chat_segments(msgs[:i], f"record {r + 1}") if i else []
            if segments and not segments[-1][1]:
                segments[-1] = (segments[-1][0] + CHAT_ASSISTANT, False)
            else:
                segments.append((CHAT_ASSISTANT, False))
            ids, _ = encode_segments(segments, tokenizer)
            expected = str(msgs[i]["content"]).strip()
            answer = rec.get("answer") if i == turns[-1] else None
            items.append({"prompt_ids": ids, "question": str(msgs[i - 1]["content"]) if i else "",
                          "expected": expected, "answer": None if answer is None else str(answer)})
    return items


def task_score(model, tokenizer, items: list[dict], max_tokens: int) -> dict:
    from .generate import Sampling, generate_text

    greedy = Sampling(temperature=0.0)
    decoder = model.decoder()  # its weight copies, built once for every item
    hits = exact = 0
    replies = []
    for item in items:
        reply = generate_text(model, tokenizer, item["prompt_ids"], None, max_tokens=max_tokens,
                              stop=("\n\n",), sampling=greedy, decoder=decoder).text.strip()
        is_exact = reply == item["expected"]
        hit = item["answer"].lower() in reply.lower() if item["answer"] is not None else is_exact
        hits += hit
        exact += is_exact
        replies.append((item, reply, hit))
    n = max(len(items), 1)
    return {"task": hits / n, "exact": exact / n, "items": len(items), "replies": replies}


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
    from .model import load_model
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


def print_table(results: list[dict], show: int, out=sys.stdout) -> None:
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
    args = parse_args(argv)
    wkv_dispatch.set_op(args.op)
    try:
        results = evaluate(args)
    except RWKVPeftError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(results, args.show)
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "replies"} | {
            "replies": [{"question": i["question"], "expected": i["answer"] or i["expected"], "reply": rep,
                         "hit": hit} for i, rep, hit in r["replies"]]} for r in results]
        Path(args.json).write_text(json.dumps(slim, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
