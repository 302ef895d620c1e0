"""Chat with an RWKV-7/RWKV-6 model in the World chat format, streaming each reply.

    python demo/chat.py                                   # the newest out/**/merged.pth
    python demo/chat.py --model out/run-.../merged.pth    # a plain checkpoint
    python demo/chat.py --model demo/base.pth --adapter out/run-.../adapter.safetensors
    python demo/chat.py --model demo/base.pth --state out/run-.../state.pth   # a tuned initial state
    python demo/chat.py --prompt "What is the capital of Varnholm?" --temperature 0

In the chat: /reset starts the conversation again, /quit (or Ctrl-D) ends it, Ctrl-C stops
a reply. The conversation is carried in the model's recurrent state, turn by turn.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .assets import DEMO_BASE
from .cli import (add_foreign_adapter_flags, add_op_flag, checked, command, non_negative, parse_checked, positive,
                  prog, run_command, usable_device)
from .model import wkv_dispatch


def _probability(v) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def parse_args(argv=None, prog_name=None):
    p = argparse.ArgumentParser(prog=prog_name or prog("chat"), description=__doc__.replace("python demo/chat.py",
                                command("chat")), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="RWKV checkpoint, .pth or .safetensors (default: the newest merged checkpoint "
                                   "under out/, else the base an --adapter was trained on, else the demo base)")
    p.add_argument("--adapter", help="adapter file to run unmerged on top of --model")
    p.add_argument("--state", help="state file (blocks.<i>.att.time_state, from merge.py --state_only or "
                                   "RWKV-PEFT's state tuning) to start every conversation from, on --model")
    add_foreign_adapter_flags(p)
    p.add_argument("--tokenizer", default="auto",
                   help="'world', a tokenizer.json, or auto (default): demo/tokenizer.json when the model's "
                        "vocabulary has its size, the World tokenizer for 65536")
    p.add_argument("--system", help="a system message put before the conversation")
    p.add_argument("--prompt", action="append",
                   help="do not chat: print the reply to this message and exit (repeat it for several turns)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=checked(float, non_negative), default=0.5, help="0 = greedy (default 0.5)")
    g.add_argument("--top_p", type=checked(float, _probability), default=0.5,
                   help="nucleus size, applied before temperature (0 = greedy; default 0.5)")
    g.add_argument("--top_k", type=checked(int, non_negative), default=0,
                   help="keep only the k most likely tokens (0 = off)")
    g.add_argument("--presence_penalty", type=checked(float), default=0.3,
                   help="subtracted from the logit of every token already in the reply (default 0.3)")
    g.add_argument("--frequency_penalty", type=checked(float), default=0.3,
                   help="subtracted once more per earlier occurrence (default 0.3)")
    g.add_argument("--penalty_decay", type=checked(float, _probability), default=0.996,
                   help="occurrence counts decay by this per token")
    g.add_argument("--max_tokens", type=checked(int, positive), default=200,
                   help="longest reply in tokens (default 200)")
    g.add_argument("--seed", type=checked(int, non_negative),
                   help="random seed, for replies that repeat (default: random)")
    p.add_argument("--device", type=checked(str, usable_device),
                   help="cpu or cuda (default: cuda when available)")
    add_op_flag(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--threads", type=checked(int, positive),
                   help="CPU threads (default: 1 for models under 20M parameters, "
                                               "else torch's default)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return parse_checked(p, argv)


def newest_merged(root: Path = Path("out")) -> Path | None:
    found = [q for name in ("merged.pth", "merged.safetensors") for q in root.rglob(name)] if root.is_dir() else []
    return max(found, key=lambda q: q.stat().st_mtime) if found else None


def choose_model(args, note) -> tuple[str, object]:
    """(checkpoint path, adapter or None) from the flags and what is on disk."""
    from .errors import RWKVPeftError
    from .peft.adapter_file import read_adapter, recorded_base

    adapter = (read_adapter(args.adapter, lora_alpha=args.lora_alpha, pissa_init=args.pissa_init)
               if args.adapter else None)
    if args.model:
        return args.model, adapter
    if args.state and adapter is None:
        raise RWKVPeftError(f"--state {args.state} needs --model BASE.pth: the base the state was trained on")
    if adapter is not None:
        return recorded_base(adapter, args.adapter, "pass --model BASE.pth"), adapter
    merged = newest_merged()
    if merged is not None:
        return str(merged), None
    if DEMO_BASE.exists():
        note(f"no merged checkpoint under out/ yet: chatting with the demo base {DEMO_BASE}, "
             f"which has not been fine-tuned ({command('train')}; {command('merge')})")
        return str(DEMO_BASE), None
    raise RWKVPeftError("no --model given and no merged checkpoint under out/; pass --model FILE")


class Chat:
    """One conversation: the rendered turns live only in the recurrent state."""

    def __init__(self, model, tokenizer, sampling, args, generator):
        from .data.chat_format import CHAT_ASSISTANT, chat_segments
        from .generate import prefill

        self.decoder = model.decoder()  # its weight copies, built once for the whole conversation
        self.model, self.tokenizer, self.sampling, self.args, self.generator = (
            model, tokenizer, sampling, args, generator)
        self._assistant, self._segments = CHAT_ASSISTANT, chat_segments
        self.initial_state = None
        if args.system:
            system = "".join(t for t, _ in chat_segments([{"role": "system", "content": args.system}]))
            _, self.initial_state = prefill(model, tokenizer.encode(system))
        self.reset()

    def reset(self):
        self.state = None if self.initial_state is None else self.initial_state.clone()
        self.need_separator = False  # the last reply did not end in "\n\n"

    def reply(self, message: str):
        """Stream the reply to message (yields text); afterwards self.last is the GenerationResult."""
        from .generate import generate

        text = "".join(t for t, _ in self._segments([{"role": "user", "content": message}])) + self._assistant
        if self.need_separator:
            text = "\n\n" + text
        gen = generate(self.model, self.tokenizer, self.tokenizer.encode(text), self.state,
                       max_tokens=self.args.max_tokens, stop=("\n\n",), sampling=self.sampling,
                       generator=self.generator, decoder=self.decoder)
        self.last = None
        yield from gen  # a KeyboardInterrupt here leaves the state as it was before this turn
        self.last = gen.result
        self.state = gen.result.state
        self.need_separator = gen.result.stop_reason != "stop"


def stats_line(result) -> str:
    return (f"[{len(result.tokens)} tokens in {result.decode_s:.2f} s, {result.tokens_per_s:.1f} tokens/s; "
            f"prompt {result.prompt_tokens} tokens in {result.prefill_s:.2f} s]")


def run(args) -> int:
    wkv_dispatch.set_op(args.op)
    chat = _start_chat(args)
    if args.prompt:
        _answer(chat, args.prompt)
    else:
        _converse(chat)
    return 0


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def _start_chat(args) -> Chat:
    """Load the model the flags name (or the newest merged one) and say what was loaded."""
    import torch

    from .data.tokenizer import tokenizer_for
    from .generate import Sampling, set_threads
    from .peft.load import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("fp32" if device == "cpu" else "bf16")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    path, adapter = choose_model(args, _note)
    start = time.perf_counter()
    model = load_model(path, adapter=adapter, state=args.state, dtype=dtype, device=device).eval()
    threads = set_threads(model, args.threads)
    cfg = model.config
    tokenizer = tokenizer_for(model.emb.weight.shape[0], args.tokenizer)
    generator = torch.Generator()
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                        penalty_decay=args.penalty_decay)
    what = f"{path}" + (f" + adapter {args.adapter}" if args.adapter else "") + (
        f" + state {args.state}" if args.state else "")
    n_params = sum(p.numel() for p in model.parameters())
    where = f"{device} {dtype_name}" + (f", {threads} CPU thread(s)" if device == "cpu" else "")
    _note(f"{what}: RWKV-{cfg.version}, {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"{n_params / 1e6:.1f}M parameters, {where}; loaded in {time.perf_counter() - start:.1f} s")
    return Chat(model, tokenizer, sampling, args, generator)


def _answer(chat: Chat, prompts: list[str]) -> None:
    """--prompt: print the reply to each message, one turn after the other."""
    for message in prompts:
        first = True
        for piece in chat.reply(message):
            if first:
                piece, first = piece.lstrip(), False
            print(piece, end="", flush=True)
        print(flush=True)
        _note(stats_line(chat.last))


def _converse(chat: Chat) -> None:
    """The interactive chat, until /quit, Ctrl-D or Ctrl-C at the prompt."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    _note("type a message; /reset starts again, /quit or Ctrl-D ends, Ctrl-C stops a reply")
    while True:
        try:
            message = input("User: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        message = message.strip()
        if not message:
            continue
        if message.startswith("/"):
            command = message.split()[0].lower()
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                chat.reset()
                print("(conversation cleared)\n", flush=True)
            else:
                print("commands: /reset, /quit\n", flush=True)
            continue
        print("Assistant:", end="", flush=True)
        try:
            for piece in chat.reply(message):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped; this turn is forgotten]\n", flush=True)
            continue
        print(flush=True)
        _note(stats_line(chat.last))
        print(flush=True)


def main(argv=None, prog=None) -> int:
    return run_command(lambda argv: run(parse_args(argv, prog)), argv)
