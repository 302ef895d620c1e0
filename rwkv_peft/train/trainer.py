"""The training run: model and adapters, data, the DeepSpeed engine, the loop, the records.

Exact resume rests on statelessness: sample g of the data depends only on g and the seed,
the learning rate only on the step, and dropout is reseeded per micro batch. A checkpoint
then needs only DeepSpeed's state (optimizer and trainable weights) and the step.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..assets import DEMO_BASE, DEMO_DATA
from ..data.tokenizer import check_fits_model, load_tokenizer, tokenizer_for
from ..errors import RWKVPeftError
from ..io import atomic_write, check_writable_dir, save_checkpoint_file
from ..model import RWKVConfig, create_model, load_model
from ..model.time_state import add_time_state
from ..model.wkv_dispatch import set_op as set_wkv_op
from ..peft.adapt import parse_rules, plan_adapters, prepare_peft, set_frozen_weight, trainable_summary
from ..peft.adapter_file import describe_base, save_adapter
from ..peft.quant import import_torchao, quant_summary
from .args import LR_INIT, STATE_LR, TrainArgs
from .checkpoint import find_checkpoint, load_checkpoint, newest_run, save_checkpoint
from .cpu_memory import choose_cpu_memory
from .engine import (deepspeed_config, device_for_rank, import_deepspeed, make_optimizer, optimizer_offloaded,
                     quiet_known_notices, set_launcher_env, weights_only_load)
from .interrupt import StopRequest, survive_lost_output
from .long_context import chunked_loss
from .loss import masked_loss
from .report import Report, plot_losses, require_backends
from .schedule import learning_rate
from .validation import Validation, data_files, load_heldout

DEMO_LR = 1e-3
SHORT_RUN_STEPS = 50  # fewer optimizer steps than this: say so, and how to train more


def _defaults(args: TrainArgs) -> None:
    """The embedded demo when no model or data is named."""
    if args.data_file is None:
        if not DEMO_DATA.exists():
            raise RWKVPeftError(f"no --data_file given and the embedded demo data {DEMO_DATA} is missing")
        args.data_file = str(DEMO_DATA)
        if args.lr_init is None:
            args.lr_init = DEMO_LR  # the tiny demo model learns its facts far better at 1e-3
        if args.load_model is None and not args.n_layer:
            args.load_model = str(DEMO_BASE)
    if args.peft is None:  # a new model is trained whole: an adapter on random weights teaches nothing useful
        args.peft = "full" if args.n_layer else "bone"
    if args.lr_init is None:
        args.lr_init = LR_INIT
    if args.state_lr is None:
        args.state_lr = STATE_LR
    if args.precision == "auto":
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if args.load_model is None and not args.n_layer:
        raise RWKVPeftError("give --load_model FILE to fine-tune, or --n_layer and --n_embd to train from scratch")


def _proj_dir(args: TrainArgs) -> Path:
    if args.proj_dir:
        return Path(args.proj_dir)
    if args.resume == "latest":
        return newest_run(Path("out"))
    return Path("out") / time.strftime("run-%Y%m%d-%H%M%S")


def _model_and_tokenizer(args: TrainArgs, dtype):
    """The model to train and its tokenizer: --tokenizer auto chooses as chat and eval do for
    a checkpoint, and the World tokenizer for a new model."""
    if args.load_model:
        model = load_model(args.load_model, dtype=dtype, quantizing=args.quant != "none")
        return model, tokenizer_for(model.config.vocab_size, args.tokenizer)
    tokenizer = load_tokenizer("world" if args.tokenizer == "auto" else args.tokenizer)
    model = _new_model(args, args.vocab_size or tokenizer.vocab_size, dtype)
    check_fits_model(tokenizer, model.config.vocab_size, args.tokenizer)
    return model, tokenizer


def _new_model(args: TrainArgs, vocab_size: int, dtype):
    C = args.n_embd

    def lora_dim(scale, power=0.5):  # the official x070 sizes of the low-rank mixers
        return max(32, int(round(scale * C ** power / 32)) * 32)

    config = RWKVConfig(version=7, n_layer=args.n_layer, n_embd=C, head_size=args.head_size,
                        vocab_size=vocab_size, dim_ffn=4 * C,
                        d_decay=lora_dim(1.8), d_aaa=lora_dim(1.8), d_mv=lora_dim(1.3), d_gate=lora_dim(0.6, 0.8))
    return create_model(config, seed=args.random_seed, dtype=dtype)


def _default_method(args: TrainArgs):
    return {
        "none": None,
        "full": None,
        "lora": ("lora", {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}),
        "pissa": ("pissa", {"r": args.pissa_r, "svd_niter": args.svd_niter or None, "dropout": args.lora_dropout}),
        "bone": ("bone", {"r": args.bone_r}),
        "bat": ("bat", {"r": args.bat_r}),
    }[args.peft]


def _param_groups(model, args: TrainArgs):
    """Weight decay on trainable matrices only; the decay base (w0 / time_decay) at 2x lr; the
    learned initial state at --state_lr."""
    groups = {"decay": [], "plain": [], "fast": [], "state": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".att.time_state"):
            groups["state"].append(p)
        elif name.endswith((".att.w0", ".att.time_decay")):
            groups["fast"].append(p)
        elif p.dim() >= 2 and args.weight_decay > 0 and not name.endswith(("w1", "w2")):
            groups["decay"].append(p)
        else:
            groups["plain"].append(p)
    spec = {"decay": (1.0, args.weight_decay), "plain": (1.0, 0.0), "fast": (2.0, 0.0),
            "state": (args.state_lr / args.lr_init, 0.0)}
    return [{"params": ps, "lr_scale": spec[k][0], "weight_decay": spec[k][1]} for k, ps in groups.items() if ps]


def _record_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a killed process counts as past the end."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _check_writable(proj_dir: Path) -> None:
    """Fail before any work if the run could not write its outputs (without creating anything)."""
    check_writable_dir(proj_dir, lambda existing: f"--proj_dir {proj_dir} cannot be written ({existing} is not a "
                       "writable directory); choose another --proj_dir", nearest_existing=True)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def train(args: TrainArgs) -> dict:
    """Run training as described by args; returns the summary. Call from every rank."""
    _defaults(args)
    set_launcher_env()
    if not args.debug:
        quiet_known_notices()
    with survive_lost_output():
        # every input is checked before DeepSpeed starts: errors come at once and leave nothing
        run = _prepare(args, main=int(os.environ["RANK"]) == 0, world=int(os.environ["WORLD_SIZE"]))
        deepspeed = import_deepspeed()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
        try:
            return _train(args, run, deepspeed)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()  # ranks that exit without this sometimes abort


def _prepare(args: TrainArgs, main: bool, world: int) -> dict:
    """Output directory, DeepSpeed config, tokenizer, model and adapters: no process group needed."""
    log = print if main else (lambda *a, **k: None)
    proj_dir = _proj_dir(args)
    args.proj_dir = str(proj_dir)  # what args.json records
    resume_from = find_checkpoint(proj_dir, args.resume) if args.resume else None
    if not args.dry_run:
        _check_writable(proj_dir)
    require_backends(args.report_to)
    config = deepspeed_config(args, world)  # a user's JSON may set the batch sizes and precision
    set_wkv_op(args.op)
    if args.op == "cuda" and not torch.cuda.is_available():
        raise RWKVPeftError("--op cuda needs a CUDA GPU; use --op auto or torch here")
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise RWKVPeftError("--precision fp16 needs a CUDA GPU (DeepSpeed has no fp16 on CPUs); "
                            "use --precision bf16 or fp32 here")

    if args.quant != "none":
        import_torchao(args.quant)  # a missing library fails here, before the model loads
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    model, tokenizer = _model_and_tokenizer(args, dtype)
    base_sd = {k: v for k, v in model.state_dict().items()}  # before adapters: what merges start from
    rules = parse_rules(args.peft_rules)
    if args.peft == "full" and rules:
        raise RWKVPeftError("--peft full trains every weight, so --peft_rules cannot apply; drop one of them")
    full = args.peft == "full" or (args.peft == "none" and not rules and not args.train_parts)
    # adapters on a new model: its random base is saved beside the run, for merge and chat
    base_path = args.load_model or proj_dir / f"base.{args.model_format}"
    if full:
        if "state" in args.train_parts:  # every weight, and a learned initial state besides
            add_time_state(model)
        methods, parts = {}, dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        log(f"trainable {n:,} of {n:,} parameters (100%): full training (--peft {args.peft})")
    else:
        plan = plan_adapters(model, rules, _default_method(args))
        if not plan and not args.train_parts:
            raise RWKVPeftError("nothing to train: --peft none with rules that adapt no layer; "
                                "choose a method or --train_parts")
        torch.manual_seed(args.random_seed)  # LoRA's Kaiming init
        quant = None if args.quant == "none" else args.quant
        methods, parts = prepare_peft(model, plan, args.train_parts, init=resume_from is None, quant=quant,
                                      quant_targets=args.quant_targets)
        log(trainable_summary(model, methods, parts))
        if quant:
            log(quant_summary(model))
    return {"proj_dir": proj_dir, "resume_from": resume_from, "config": config, "tokenizer": tokenizer,
            "model": model, "base_sd": base_sd, "base_path": base_path,
            "base_info": describe_base(base_sd, model.config, base_path), "full": full, "methods": methods,
            "parts": parts}


def _train(args: TrainArgs, run: dict, deepspeed) -> dict:
    from tqdm import tqdm

    from ..data.datasets import load_training_data

    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    # tqdm.write: validation replies and the early-stop line print above the progress bar, not through it
    log = (lambda *parts: tqdm.write(" ".join(map(str, parts)))) if main else (lambda *a, **k: None)
    device = device_for_rank()
    proj_dir, resume_from, config, tokenizer = run["proj_dir"], run["resume_from"], run["config"], run["tokenizer"]
    model, base_sd, base_path, base_info = run["model"], run["base_sd"], run["base_path"], run["base_info"]
    full, methods, parts = run["full"], run["methods"], run["parts"]

    # --val_split: the two parts of --data_file
    train_file, val_file = data_files(args, world, config["zero_optimization"]["stage"], log)

    def load_data():
        data = load_training_data(train_file, tokenizer, args.ctx_len, data_type=args.data_type,
                                  sft_fields=tuple(args.sft_fields) if args.sft_fields else None,
                                  mode=args.data_mode, seed=args.random_seed, progress=main)
        return data, load_heldout(val_file, args, tokenizer, main) if val_file else (None, ())

    # rank 0 tokenizes into the cache first; the others then read the cache
    loaded = load_data() if main else None
    dist.barrier()
    data, (heldout, heldout_items) = loaded or load_data()
    validation = Validation(heldout, heldout_items, tokenizer, args.eval_every, args.early_stop, args.micro_bsz, log,
                            val_file)
    if args.dry_run:
        log(f"\ndata: {args.data_file}: {len(data):,} samples of {args.ctx_len} tokens per epoch "
            f"({data.tokens_total:,} tokens)\none sample, loss-masked spans marked:\n")
        log(data.render(0))
        return {}

    if main:  # created only now, so that a run that fails on its inputs leaves nothing behind
        proj_dir.mkdir(parents=True, exist_ok=True)
        if not full and not args.load_model and not Path(base_path).exists():
            save_checkpoint_file(base_sd, base_path)
            log(f"saved the new model's initial weights to {base_path}: the base the adapter merges into")
    model.to(device)
    if device.type == "cpu":
        from ..generate import set_threads

        set_threads(model)  # one thread for small models: splitting tiny ops costs far more than it gains
    memory_note = choose_cpu_memory(args, model, device)  # --grad_cp and --cpu_malloc auto
    if memory_note:
        log(memory_note)
    model.grad_checkpointing = bool(args.grad_cp)
    global_batch = args.micro_bsz * args.accumulate_grad_batches * world
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(data) / global_batch))
    warmup = args.warmup_steps if args.warmup_steps is not None else min(10, total_steps // 10)
    if not args.max_steps and total_steps < SHORT_RUN_STEPS:
        log(f"note: {args.epochs:g} epoch(s) of {len(data)} samples of {args.ctx_len} tokens make only {total_steps} "
            f"optimizer steps; for more training pass --epochs N or --max_steps N")
    optimizer = make_optimizer(_param_groups(model, args), args, device, optimizer_offloaded(config))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.checkpoint_engine.load = weights_only_load

    step, earlier_s, segment = 0, 0.0, 1
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        step, earlier_s, segment = state["step"], state.get("elapsed_s", 0.0), state.get("segment", 1) + 1
        if state.get("global_batch") != global_batch:
            raise RWKVPeftError(f"--resume: the checkpoint was trained with a global batch of "
                                f"{state.get('global_batch')} samples, this run has {global_batch}")
        with torch.no_grad():  # PiSSA keeps W - B0 A0 frozen; B0, A0 came back with the checkpoint
            for name, method in methods.items():
                if method.name != "pissa":
                    continue
                frozen = method.frozen_weight(base_sd[f"{name}.weight"].float())
                set_frozen_weight(engine.module.get_submodule(name), frozen)
        validation.load_state(state.get("validation"))
        if step >= total_steps or validation.should_stop():
            how = "stopped early" if step < total_steps else "complete"
            log(f"the run in {proj_dir} is already {how} ({step} of {total_steps} steps); nothing was changed. "
                "To train more, start a new run (or resume with a larger --max_steps)")
            return {"steps": step, "complete": True, "proj_dir": str(proj_dir)}
        log(f"resumed from {resume_from} at step {step}")

    metrics_path = proj_dir / "metrics.jsonl"
    if main:
        atomic_write(proj_dir / "args.json", lambda f: f.write(json.dumps(asdict(args), indent=1).encode()))
        kept = []
        if step and metrics_path.exists():  # drop records past the checkpoint: they will be redone
            kept = [line for line in metrics_path.read_text().splitlines() if _record_step(line) <= step]
        atomic_write(metrics_path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))

    quant_record = None if args.quant == "none" else {"format": args.quant, "targets": args.quant_targets}

    def write_weights(target: Path):
        trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        if main:
            if full:
                save_checkpoint_file({k: v.detach().cpu() for k, v in engine.module.state_dict().items()}, target)
            else:
                save_adapter(target, methods, {k: trainable[k] for k in parts}, base_info, quant_record)

    def save(step: int, final: bool = False):
        if full:
            write_weights(proj_dir / f"model.{args.model_format}")
        else:
            if main:
                (proj_dir / "adapters").mkdir(exist_ok=True)
            write_weights(proj_dir / ("adapter.safetensors" if final else f"adapters/step-{step:08d}.safetensors"))
        save_checkpoint(engine, proj_dir, step, {"step": step, "global_batch": global_batch,
                                                 "samples": step * global_batch, "segment": segment,
                                                 "elapsed_s": earlier_s + time.perf_counter() - start,
                                                 "validation": validation.state()}, args.keep_last)

    best_path = proj_dir / (f"model-best.{args.model_format}" if full else "adapter-best.safetensors")
    report = Report(metrics_path, args.report_to, asdict(args), enabled=main)

    tokens_per_step = global_batch * args.ctx_len
    pieces = f"in pieces of {args.chunk_ctx} tokens; " if args.chunk_ctx else ""
    log(f"\ntraining {total_steps} steps of {global_batch} x {args.ctx_len} tokens on {world} "
        f"{device.type} process(es), ZeRO stage {config['zero_optimization']['stage']}, {args.precision}; "
        f"{pieces}writing to {proj_dir}")
    bar = tqdm(total=total_steps, initial=step, disable=not main, unit="step", dynamic_ncols=True)
    start, first_step, losses, skipped = time.perf_counter(), step, [], 0
    stop = StopRequest(announce=main)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    engine.train()
    with stop:
        while step < total_steps:
            lr = learning_rate(step, total_steps, lr_init=args.lr_init, lr_final=args.lr_final,
                               warmup=warmup, schedule=args.lr_schedule)
            step_loss, bad = torch.zeros((), device=device), 0
            for micro in range(args.accumulate_grad_batches):
                first = ((step * args.accumulate_grad_batches + micro) * world + rank) * args.micro_bsz
                batch = data.batch(list(range(first, first + args.micro_bsz)))
                torch.manual_seed(args.random_seed + first)  # dropout: a function of the sample index
                inputs, targets, mask = (batch[k].to(device) for k in ("input_ids", "targets", "loss_mask"))
                if args.chunk_ctx:
                    loss = chunked_loss(engine, inputs, targets, mask, args.chunk_ctx, detach=args.chunk_detach)
                else:
                    loss = masked_loss(engine(inputs), targets, mask)
                finite = torch.isfinite(loss.detach()).float()
                if world > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank takes the same decision
                if not finite.item():
                    bad += 1
                    if skipped + bad > args.skip_nonfinite:
                        raise RWKVPeftError(
                            f"loss became {loss.item()} at step {step + 1} (micro batch {micro + 1}, samples from "
                            f"{first}); stopped without saving, the last checkpoint in {proj_dir / 'checkpoints'} "
                            "is intact. Lower --lr_init, check the data, or allow skips with --skip_nonfinite N")
                    # contribute no gradient: a zero with a graph through finite tensors only
                    loss = sum(p.sum() for p in trainable) * 0.0
                else:
                    step_loss += loss.detach().float()
                if micro == args.accumulate_grad_batches - 1:
                    # the optimizer steps now; a step whose every micro batch was bad moves nothing
                    scale = 0.0 if bad == args.accumulate_grad_batches else 1.0
                    for group in engine.optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0) * scale
                engine.backward(loss)
                engine.step()
            skipped += bad
            # one all-reduce for the loss and the stop request: every rank stops at the same step
            reduced = torch.stack([step_loss / max(args.accumulate_grad_batches - bad, 1),
                                   torch.tensor(float(stop.requested), device=device)])
            if world > 1:
                dist.all_reduce(reduced)
            step_loss, stop_now = reduced[0].item() / world, reduced[1].item() > 0
            # In fp16, DeepSpeed's loss scaler owns overflow: it skips that step, reports the
            # norm as inf and lowers the scale, as it routinely does.  Elsewhere it is fatal.
            grad_norm = engine.get_global_grad_norm()
            if (grad_norm is not None and not math.isfinite(float(grad_norm)) and not bad
                    and not engine.fp16_enabled()):
                raise RWKVPeftError(f"gradient norm became {grad_norm} at step {step + 1}; stopped without saving, "
                                    f"the last checkpoint in {proj_dir / 'checkpoints'} is intact. "
                                    "Lower --lr_init or use --precision fp32")
            step += 1
            losses.append(step_loss)
            elapsed = time.perf_counter() - start
            tps = tokens_per_step * (step - first_step) / max(elapsed - validation.seconds, 1e-9)
            val_record = validation.evaluate(engine.module, step) if validation.due(step, total_steps) else None
            if val_record and args.save_best and validation.improved:
                write_weights(best_path)
            if main:
                record = {"step": step, "loss": round(step_loss, 6), "lr": lr, "tokens": step * tokens_per_step,
                          "tokens_per_s": round(tps, 1), "elapsed_s": round(earlier_s + elapsed, 3),
                          "peak_memory_mb": round(_peak_memory_mb(device), 1)}
                if bad:
                    record["skipped_micro_batches"] = bad
                report.log(record)
                if val_record:
                    report.log(val_record)
                val = {"val": f"{validation.last_loss:.4f}"} if validation.last_loss is not None else {}
                bar.set_postfix(loss=f"{step_loss:.4f}", **val, tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                bar.update(1)
            if validation.should_stop():
                log(f"\nearly stop: no lower validation loss in {args.early_stop} evaluations; "
                    f"the best was {validation.best_loss:.4f} at step {validation.best_step}")
                break
            if (stop_now or step == args.stop_at_step) and step < total_steps:
                bar.close()
                save(step)
                why = "\ninterrupted: saved a checkpoint" if stop_now else "stopped (--stop_at_step): saved a checkpoint"
                log(f"{why} at step {step}; continue with --resume --proj_dir {proj_dir}")
                report.close()
                if stop_now:
                    raise KeyboardInterrupt
                return {"steps": step, "stopped": True, "proj_dir": str(proj_dir)}
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save(step)
    bar.close()
    save(step, final=True)

    # the whole run, over every resumed segment; tokens/s leaves out time spent validating
    elapsed = earlier_s + time.perf_counter() - start
    training_s = max(elapsed - validation.seconds, 1e-9)
    summary = {"steps": step, "tokens_seen": step * tokens_per_step, "time_s": round(elapsed, 2),
               "tokens_per_s": round(tokens_per_step * step / training_s, 1), "segments": segment,
               "peak_memory_mb": round(_peak_memory_mb(device), 1),
               "final_loss": losses[-1] if losses else None, "skipped_micro_batches": skipped,
               "proj_dir": str(proj_dir), "train_data": train_file, **validation.summary()}
    if args.save_best:
        summary["best_checkpoint"] = str(best_path)
    if validation.should_stop():
        summary["early_stopped"] = True
    report.close()
    if main:
        atomic_write(proj_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
        plot_losses(metrics_path, proj_dir / "loss.png")
        log("\n" + "  ".join(f"{k}: {v}" for k, v in summary.items()))
        out = proj_dir / (f"model.{args.model_format}" if full else "adapter.safetensors")
        log(f"wrote {out}")
        log(f"next: python -m rwkv_peft.run --model {out}" if full else f"next: python merge.py --adapter {out}")
    return summary

