"""Every training option, its default and its help text, in one frozen dataclass.

`train.py --help` and the README's option table are both generated from these fields. The
flags of the PEFT methods (--lora_r, --bone_r, ...) come from the methods themselves
(peft/methods.py). What the user left out is decided once, in settings.py.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields, make_dataclass

import torch

from ..cli import HelpFormatter, fraction, non_negative, positive, value_problem
from ..data.sources import DATA_TYPES
from ..errors import RWKVPeftError
from ..model.wkv_dispatch import OPS
from ..peft.methods import METHODS, method_flags
from ..peft.quant import QUANT_FORMATS, QUANT_TARGETS

LR_INIT = 1e-4  # --lr_init when none is given, except on the embedded demo (trainer.DEMO_LR)
STATE_LR = 1.0  # --state_lr when none is given: the state needs a far higher rate than weights (README)
# what --resume may change of a run's own settings (run_settings.py); the rest are the run's
RESUME_CHANGES = ("max_steps", "epochs", "save_every", "keep_last", "eval_every", "eval_generate", "early_stop",
                  "report_to", "skip_nonfinite", "grad_cp", "cpu_malloc", "max_memory", "op")
SEGMENT_FLAGS = ("stop_at_step", "dry_run", "debug")  # a command's own: never taken from the run
STRATEGIES = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")


def opt(default, help, group="training", check=None, **kw):
    """A field of TrainArgs: its default, help, --help group, argparse keywords and, for a number,
    check: its range (cli.positive, ...), which check_args applies."""
    return field(default=default, metadata={"help": help, "group": group, "check": check, **kw})


def at_least_two(v) -> str | None:
    return None if v >= 2 else "must be at least 2 (advantages compare the completions of a prompt)"


def probability(v) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def grad_cp_flag(text: str) -> int | None:
    """--grad_cp auto / 0 / 1; None stands for auto."""
    if text not in ("auto", "0", "1"):
        raise argparse.ArgumentTypeError(f"choose auto, 0 or 1, not '{text}'")
    return None if text == "auto" else int(text)


SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """--max_memory: '2.5G', '800M', '4096K' or bytes (binary units; a trailing B or iB is allowed)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    size = float(match.group(1)) * SIZE_UNITS[match.group(2)] if match else 0
    if not 2**26 <= size < 2**50:
        raise RWKVPeftError(f"--max_memory takes a size from 64M to 1024T such as 2.5G or 800M, got '{text}'")
    return int(size)


def held_out_fraction(v) -> str | None:
    return None if v == 0 or 0 < v <= 0.5 else "must be a fraction in (0, 0.5]"


@dataclass(frozen=True)
class _Options:
    # model
    load_model: str | None = opt(None, "official RWKV-6/7 checkpoint (.pth or .safetensors) to fine-tune "
                                       "(default: the embedded demo base "
                                       "when no --data_file is given; omit with --n_layer/--n_embd to train from scratch)",
                                 "model")
    n_layer: int = opt(0, "layers of a new RWKV-7 trained from scratch (with --n_embd)", "model",
                       check=non_negative)
    n_embd: int = opt(0, "width of a new RWKV-7 trained from scratch", "model", check=non_negative)
    head_size: int = opt(64, "head size of a new model", "model", check=positive)
    vocab_size: int | None = opt(None, "vocabulary of a new model (default: the tokenizer's)", "model",
                                 check=positive)
    # data
    data_file: str | None = opt(None, "training data: .jsonl (text or chat/SFT), .txt, or a binidx prefix "
                                      "(default: the embedded demo data set)", "data")
    data_type: str = opt("auto", "auto (from the extension), text (txt), jsonl (json: text, chat or --sft_fields "
                                 "records), binidx", "data", choices=tuple(DATA_TYPES))
    sft_fields: list[str] | None = opt(None, "question and answer fields of SFT jsonl records, e.g. query response",
                                       "data", nargs=2)
    data_mode: str = opt("pack", "pack short samples into full windows, or pad each to ctx_len", "data",
                         choices=("pack", "pad"))
    tokenizer: str = opt("auto", "'world', a Hugging Face tokenizer.json, or auto: the demo's tokenizer.json for a "
                                 "model of its vocabulary size, the World tokenizer for 65536 (and for new models)",
                         "data")
    ctx_len: int = opt(512, "tokens per sample", "data", check=positive)
    # validation
    val_file: str | None = opt(None, "held-out data in any training format: its loss is computed every "
                                     "--eval_every steps and at the end", "validation")
    val_split: float = opt(0.0, "hold out this fraction (0 < F <= 0.5) of the .jsonl records of --data_file, "
                                "chosen from --random_seed and never trained on", "validation",
                            check=held_out_fraction)
    eval_every: int = opt(0, "validation loss every N steps (0: only at the end); needs --val_file or "
                             "--val_split", "validation", check=non_negative)
    eval_generate: int = opt(0, "also answer the first K held-out chat records greedily and log the task "
                                "score, as rwkv_peft.eval does", "validation", check=non_negative)
    save_best: bool = opt(False, "keep adapter-best.safetensors (model-best.pth for --peft full) of the lowest "
                                 "validation loss", "validation")
    early_stop: int = opt(0, "stop after P evaluations without a lower validation loss (0: never)", "validation",
                          check=non_negative)
    # PEFT
    peft: str | None = opt(None, f"method for the default target layers: {', '.join(METHODS)}, or full (every "
                                 "weight; 'none' is the same when no --peft_rules/--train_parts are given) "
                                 "(default: bone when fine-tuning, full when training from scratch)", "peft",
                           choices=(*METHODS, "full", "none"))
    peft_rules: str | None = opt(None, "per-layer rules 'glob=method:rank; ...' or a JSON file; first match "
                                       "wins, e.g. 'blocks.*.att.*=bone:64; blocks.0.*=none'", "peft")
    train_parts: list[str] = opt((), "whole tensor groups to train as well: ln time emb head, or state (a learned "
                                     "initial WKV state for every layer: state tuning; alone with --peft none)",
                                 "peft", nargs="*")
    quant: str = opt("none", "store the frozen base weights under the adapters quantized (QLoRA-style, through "
                             "torchao): nf4 (4-bit NormalFloat, about 0.26x the bf16 bytes) or int8 (per row, about "
                             "0.5x); none keeps them in --precision. The adapters train in --precision either way",
                     "peft")
    quant_targets: str = opt("adapted", "with --quant: the weights of the adapted layers, or all (every frozen "
                                        "linear layer, the head included)", "peft", choices=QUANT_TARGETS)
    state_lr: float | None = opt(None, f"peak learning rate of the learned state (--train_parts state), on the "
                                       f"schedule of --lr_init (default {STATE_LR:g})", "peft", check=positive)
    # objective (train/objectives.py; README "Objectives")
    objective: str = opt("sft", "what to train for: sft (next-token loss on the replies), or preference tuning on "
                                "prompt/chosen/rejected .jsonl records: dpo (against the reference: the model with "
                                "its adapters off), simpo or orpo (no reference), or grpo: reward tuning on "
                                "completions sampled for the prompts of a .jsonl file (needs --reward)", "objective",
                         choices=("sft", "dpo", "simpo", "orpo", "grpo"))
    beta: float | None = opt(None, "DPO / SimPO temperature beta, GRPO's weight of the KL term to the reference "
                                   "(default: 0.1 for dpo, 2.0 for simpo, 0 for grpo: no KL, no reference pass)",
                             "objective", check=non_negative)
    gamma: float = opt(0.5, "SimPO target reward margin gamma", "objective", check=non_negative)
    orpo_lambda: float = opt(0.1, "ORPO weight lambda of the odds-ratio term beside the SFT loss", "objective",
                              check=non_negative)
    reward: str | None = opt(None, "grpo: the reward of a completion: exact (equals the record's 'answer'), "
                                   "contains (holds 'answer' as whole words), regex (--reward_regex matches), or "
                                   "your function as module:function or path/file.py:function, called as "
                                   "fn(prompts, completions, **fields) -> list of floats", "objective")
    reward_regex: str | None = opt(None, "with --reward regex: reward 1 when this pattern matches in the completion "
                                         "(Python re.search), else 0", "objective")
    num_generations: int = opt(8, "grpo: completions sampled per prompt (the group G of its advantages)",
                               "objective", check=at_least_two)
    max_completion_length: int = opt(64, "grpo: most tokens of a completion (a reply ends at its blank line)",
                                     "objective", check=positive)
    temperature: float = opt(1.0, "grpo: sampling temperature of the completions (0: greedy)", "objective",
                             check=non_negative)
    top_p: float = opt(1.0, "grpo: nucleus sampling, from the most likely tokens whose probability reaches P "
                            "(1: all)", "objective", check=probability)
    epsilon: float = opt(0.2, "grpo: clip range of the probability ratio (1 - eps, 1 + eps)", "objective",
                         check=non_negative)
    loss_type: str = opt("grpo", "grpo: mean over each completion's tokens, advantages divided by the group's "
                                 "std; dr_grpo: sum over tokens / (completions x --max_completion_length), "
                                 "advantages not divided (TRL's names)", "objective", choices=("grpo", "dr_grpo"))
    init_adapter: str | None = opt(None, "start from this trained adapter file (e.g. an SFT run's "
                                         "adapter.safetensors) instead of fresh adapters; its method and ranks are "
                                         "kept, and the new adapter file records it", "objective")
    # optimisation
    max_steps: int = opt(0, "optimizer steps to run (0: --epochs over the data)", check=non_negative)
    epochs: float = opt(1.0, "passes over the data when --max_steps is 0", check=non_negative)
    micro_bsz: int = opt(1, "samples per micro batch per process", check=positive)
    accumulate_grad_batches: int = opt(1, "micro batches per optimizer step", check=positive)
    lr_init: float | None = opt(None, f"peak learning rate (default {LR_INIT:g}; the embedded demo: 1e-3)",
                                check=positive)
    lr_final: float = opt(1e-5, "learning rate at the end of the schedule", check=non_negative)
    warmup_steps: int | None = opt(None, "linear warm-up steps (default: 10, or a tenth of a run shorter than "
                                         "100 steps)", check=non_negative)
    lr_schedule: str = opt("cos", "cos, wsd (warm-up, stable, decay over the last 20%%), or const",
                           choices=("cos", "wsd", "const"))
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)", check=non_negative)
    beta1: float = opt(0.9, "AdamW beta1", check=fraction)
    beta2: float = opt(0.99, "AdamW beta2", check=fraction)
    adam_eps: float = opt(1e-8, "AdamW epsilon", check=positive)
    grad_clip: float = opt(1.0, "gradient norm clipping (0: off)", check=non_negative)
    precision: str = opt("auto", "auto (bf16 on GPUs, fp32 on CPUs, where bf16 matmuls are slow), bf16, fp16 or "
                                 "fp32", choices=("auto", "bf16", "fp16", "fp32"))
    skip_nonfinite: int = opt(0, "micro batches with a non-finite loss that may be skipped before the run "
                                 "stops (0: stop at the first)", check=non_negative)
    grad_cp: int | None = opt(None, "gradient checkpointing per block: 1 saves activation memory for ~30%% more "
                                    "compute (CPUs: 1.1-1.2x the step time), 0 is off; auto (the default): the "
                                    "fastest setting whose estimated peak memory fits the memory free (see "
                                    "--max_memory)", type=grad_cp_flag, metavar="{auto,0,1}", check=None)
    cpu_malloc: str = opt("auto", "CPU runs: compact keeps freed activations out of the resident set (0.1B "
                                  "model, ctx 512: 1-1.7 GB less): on tcmalloc or jemalloc where installed (the "
                                  "process restarts itself once with it preloaded), else with glibc's mmap "
                                  "threshold fixed (steps 1.5-2x slower); default leaves malloc alone; auto: "
                                  "decided with --grad_cp auto from the estimated peak. MALLOC_* variables or "
                                  "RWKV_PEFT_MALLOC=glibc in the environment win",
                          choices=("auto", "compact", "default"))
    max_memory: str | None = opt(None, "memory budget SIZE (e.g. 2.5G, 800M) for --grad_cp / --cpu_malloc auto, "
                                       "instead of the memory free on the device (RAM, or the GPU's)", metavar="SIZE")
    chunk_ctx: int = opt(0, "long-context training: run each sample as pieces of N tokens carrying the RNN state, "
                            "with exact gradients; activation memory is one piece's (0: off)")
    chunk_detach: bool = opt(False, "with --chunk_ctx: cut the gradient at piece boundaries (truncated BPTT, as "
                                    "RWKV-PEFT's infctx; not exact)")
    op: str = opt("auto", "WKV implementation: auto (the CUDA kernel on GPUs when it builds and passes its "
                          "start-up self-test, else PyTorch with one warning line), cuda (the kernel or an error), "
                          "or torch", choices=OPS)
    strategy: str = opt("deepspeed_stage_1", "DeepSpeed ZeRO strategy", choices=STRATEGIES)
    deepspeed_config: str | None = opt(None, "your own DeepSpeed JSON; it wins over the flags it sets")
    random_seed: int = opt(42, "seed for initialisation, data order and dropout", check=non_negative)
    # output
    proj_dir: str | None = opt(None, "where the run writes (default: a new out/run-<time>/)", "output")
    save_every: int = opt(0, "save an adapter and a resumable checkpoint every N steps (0: only at the end)",
                          "output", check=non_negative)
    keep_last: int = opt(2, "resumable checkpoints to keep", "output", check=positive)
    model_format: str = opt("pth", "file format of a fully trained model (--peft full or from scratch): pth "
                                   "(model.pth, what official runtimes load) or safetensors (model.safetensors)",
                            "output", choices=("pth", "safetensors"))
    resume: str | None = opt(None, "continue a run with its own settings (its args.json): 'latest' (or no value: "
                                   "--proj_dir's run, else the newest under out/) or one of its checkpoint "
                                   "directories. Only these flags may differ from the run's: "
                                   f"{', '.join('--' + n for n in RESUME_CHANGES + SEGMENT_FLAGS)}", "output",
                             nargs="?", const="latest")
    stop_at_step: int = opt(0, "save a checkpoint and stop at this step, keeping the schedule of --max_steps "
                               "(for time-limited jobs; continue with --resume)", "output", check=non_negative)
    report_to: list[str] = opt((), "also log to: tensorboard (event files in <proj_dir>/tensorboard), wandb "
                                   "(set WANDB_MODE=offline to keep it local)", "output", nargs="*",
                               choices=("tensorboard", "wandb"))
    dry_run: bool = opt(False, "print the layer table and one rendered sample with its loss mask, then exit",
                        "output")
    debug: bool = opt(False, "show Python tracebacks", "output")


TrainArgs = make_dataclass("TrainArgs", [(f.flag, type(f.default), opt(f.default, f.help, "peft", f.check))
                                        for f in method_flags()], bases=(_Options,), frozen=True)
TrainArgs.__doc__ = "The parsed train.py flags: _Options plus every PEFT method's own flags."
GROUPS = ("model", "data", "validation", "peft", "objective", "training", "output")


def ordered_fields() -> list:
    """The options in the order --help and the README show them: the methods' flags after --peft."""
    own = [f for f in fields(TrainArgs) if f.name in _Options.__dataclass_fields__]
    methods = [f for f in fields(TrainArgs) if f.name not in _Options.__dataclass_fields__]
    at = [f.name for f in own].index("peft") + 1
    return own[:at] + methods + own[at:]


def build_parser(prog: str = "train.py", description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for f in ordered_fields():
        meta = dict(f.metadata)
        group, help_text = meta.pop("group"), meta.pop("help")
        meta.pop("check")
        kw = {"default": f.default, "help": help_text, **meta}
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        if type_name == "bool":
            kw["action"] = "store_true"
        elif "nargs" not in meta:
            kw.setdefault("type", {"int": int, "float": float}.get(type_name.removesuffix(" | None"), str))
        elif f.default == ():  # a list option: argparse wants a list default
            kw["default"] = []
        groups[group].add_argument(f"--{f.name}", **kw)
    # the deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None, prog: str = "train.py", description: str | None = None) -> TrainArgs:
    ns = vars(build_parser(prog, description).parse_args(argv))
    ns.pop("local_rank")
    args = TrainArgs(**ns)
    check_args(args)
    return args


def check_args(args: TrainArgs) -> None:
    """Values argparse cannot check, each as one line naming the flag: every number finite and in
    the range its field declares (check=), then how the flags go together."""
    for f in fields(TrainArgs):
        problem = value_problem(getattr(args, f.name), f.metadata["check"])
        if problem:
            raise RWKVPeftError(f"--{f.name} {problem}, got {getattr(args, f.name)}")
    if args.max_steps == 0 and args.epochs <= 0:
        raise RWKVPeftError("give --max_steps N or a positive --epochs")
    if args.chunk_ctx < 0 or args.chunk_ctx > args.ctx_len:  # a range that depends on --ctx_len
        raise RWKVPeftError(f"--chunk_ctx must be between 1 and --ctx_len ({args.ctx_len}), or 0 for off; "
                            f"got {args.chunk_ctx}")
    if args.max_memory is not None:
        parse_size(args.max_memory)
    if args.chunk_detach and not args.chunk_ctx:
        raise RWKVPeftError("--chunk_detach needs --chunk_ctx N: it cuts the gradient between pieces of N tokens")
    if (args.n_layer > 0) != (args.n_embd > 0):
        raise RWKVPeftError("training from scratch needs both --n_layer and --n_embd")
    has_val = bool(args.val_file or args.val_split)
    if args.val_file and args.val_split:
        raise RWKVPeftError("give either --val_file or --val_split, not both")
    for name in ("eval_every", "eval_generate", "early_stop"):
        if getattr(args, name) and not has_val:
            raise RWKVPeftError(f"--{name} needs held-out data: add --val_file FILE or --val_split 0.05")
    if args.save_best and not has_val:
        raise RWKVPeftError("--save_best needs held-out data: add --val_file FILE or --val_split 0.05")
    check_quant_args(args)
    if args.n_layer and args.load_model:
        raise RWKVPeftError("give either --load_model (fine-tune) or --n_layer/--n_embd (from scratch), not both")


def process_memory() -> int:
    """Bytes of memory one training process can have: its GPU's, or its share of the RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def check_fits_memory(args: TrainArgs, n_layer: int, n_embd: int, available: int | None = None) -> None:
    """Refuse a --ctx_len x --micro_bsz whose activations cannot fit this machine, before anything is
    written. A lower bound, so a run that could fit is never refused: backward keeps at least
    each block's input ([micro_bsz, tokens, n_embd]: --grad_cp 1 keeps exactly that), for one
    piece of --chunk_ctx tokens at a time, and the batch's ids, targets and mask (20 bytes a token)."""
    available = process_memory() if available is None else available
    piece = args.chunk_ctx or args.ctx_len
    width = 2 if args.precision in ("bf16", "fp16") else 4
    need = args.micro_bsz * (piece * (n_layer + 1) * n_embd * width + args.ctx_len * 20)
    if need > available:
        gib = 2**30
        raise RWKVPeftError(f"--ctx_len {args.ctx_len} x --micro_bsz {args.micro_bsz} needs at least "
                            f"{need / gib:,.1f} GiB for activations ({n_layer} layers x {n_embd} wide, "
                            f"{args.precision}), more than the {available / gib:,.1f} GiB one process has here; "
                            "lower --ctx_len or --micro_bsz, or train in pieces with --chunk_ctx N")


QUANT_CHOICES = ("none", *QUANT_FORMATS)


def default_peft(args: TrainArgs) -> str:
    """--peft when none is given: a new model is trained whole (an adapter on random weights
    teaches nothing useful), a checkpoint gets Bone."""
    return "full" if args.n_layer else "bone"


def check_quant_args(args: TrainArgs) -> None:
    """--quant quantizes a frozen base under adapters: it needs a base and something frozen over it."""
    if args.quant not in QUANT_CHOICES:
        raise RWKVPeftError(f"--quant: unknown format '{args.quant}'; choose one of {', '.join(QUANT_CHOICES)}")
    if args.quant == "none":
        if args.quant_targets != "adapted":
            raise RWKVPeftError(f"--quant_targets {args.quant_targets} needs --quant nf4 or int8")
        return
    peft = args.peft or default_peft(args)
    adapts = peft in METHODS or (peft == "none" and args.peft_rules)
    if not (adapts or (peft == "none" and args.train_parts and args.quant_targets == "all")):
        raise RWKVPeftError(f"--quant {args.quant} quantizes the frozen base under adapters, but --peft "
                            f"{args.peft or 'full (the default from scratch)'} adapts no layer; choose an adapter "
                            f"method (--peft {' / '.join(METHODS)}), or drop --quant")


def markdown_table() -> str:
    """The options as a markdown table, for the README."""
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for group in GROUPS:
        for f in ordered_fields():
            if f.metadata["group"] != group:
                continue
            default = f.default
            shown = "" if default is None or default is False or default == () else f"`{default}`"
            text = f.metadata["help"].replace("%%", "%").replace("|", "\\|")
            rows.append(f"| `--{f.name}` | {shown} | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    # no argument: print the table; a README path: replace the table between its markers
    import sys

    from ..io import atomic_write

    if len(sys.argv) < 2:
        print(markdown_table())
    else:
        readme = open(sys.argv[1]).read()
        block = re.compile(r"(<!-- options:start[^\n]*-->\n).*?(\n<!-- options:end -->)", re.S)
        if not block.search(readme):
            sys.exit(f"{sys.argv[1]}: no <!-- options:start --> ... <!-- options:end --> block")
        updated = block.sub(lambda m: m.group(1) + markdown_table() + m.group(2), readme)
        atomic_write(sys.argv[1], lambda f: f.write(updated.encode()))
