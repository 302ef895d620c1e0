"""The training run: model and adapters, data, the DeepSpeed engine, the loop, the records.

    train()   the process group, then _prepare (the settings, the run directory held, the
              model), then _train
    _train()  data and validation, the engine, resume, then _fit: the loop over optimizer
              steps, which calls the named parts: Stepper.step (step.py), Validation,
              Outputs (outputs.py: weights, checkpoints, metrics, summary)

Exact resume rests on statelessness: sample g of the data depends only on g and the seed,
the learning rate only on the step, and dropout is reseeded per micro batch. A checkpoint
then needs only DeepSpeed's state (optimizer and trainable weights) and the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.tokenizer import check_fits_model, load_tokenizer, tokenizer_for
from ..errors import RWKVPeftError
from ..io import check_writable_dir, load_tensor_file, save_checkpoint_file
from ..model import RWKV, create_model, load_model
from ..model.init import rwkv7_config
from ..model.time_state import add_time_state
from ..model.wkv_dispatch import set_op as set_wkv_op
from ..peft.adapt import parse_rules, plan_adapters, prepare_peft, trainable_summary
from ..peft.adapter_file import describe_base
from ..peft.init_adapter import continue_adapter, origin_record
from ..peft.quant import import_torchao, quant_summary
from .args import TrainArgs, check_fits_memory
from .checkpoint import Progress, find_checkpoint, resume
from .cpu_memory import place_model
from .engine import (destroy_process_group, device_for_rank, import_deepspeed, init_process_group, make_optimizer,
                     optimizer_offloaded, param_groups, quiet_known_notices, weights_only_load)
from .interrupt import StopRequest, survive_lost_output
from .objectives import BAR, load_objective_data, make_objective
from .outputs import Outputs, peak_memory_mb
from .own_files import check_run_outputs
from .report import require_backends
from .run_dir import RunDirectory, resume_hint
from .run_settings import changes_from_run
from .schedule import Schedule, plan_schedule
from .settings import default_method, resolve, trains_whole_model
from .step import Stepper
from .validation import Validation, data_files, load_heldout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Run:
    """What _prepare builds from the settings, before any process group exists."""

    args: TrainArgs        # the resolved settings
    ds_config: dict        # DeepSpeed's config
    proj_dir: Path
    resume_from: Path | None
    tokenizer: object
    model: RWKV
    new_base: dict | None  # a new model's initial weights, for its base file; no other copy of a base is kept
    base_path: Path | str
    base_info: dict        # the base as the adapter file records it
    full: bool             # every weight trains (no adapter file)
    methods: dict          # adapted layer -> its PEFT method
    parts: dict            # whole tensors trained beside the adapters (--train_parts)

    def base_weights(self, names: list[str]) -> dict:
        """These base weights as training started from them (PiSSA's resume), read again from the
        base file: the run keeps no copy, whose mapped pages would stay in its memory. In the
        run's precision, except under --quant, which reads a base in the file's dtype."""
        sd = load_tensor_file(self.base_path, "base")
        return {n: sd[n] if self.args.quant != "none" else sd[n].to(DTYPES[self.args.precision]) for n in names}


def train(args: TrainArgs, given: frozenset[str] | None = None) -> dict:
    """Run training as described by args; returns the summary. Call from every rank. given: the
    flags named on the command line, which a --resume checks against the run's own settings
    (None: those that differ from their defaults)."""
    if not args.debug:
        quiet_known_notices()
    with survive_lost_output():
        init_process_group()  # first: the ranks decide the run directory together
        try:
            with RunDirectory() as run_dir:  # held until the run ends; left empty, removed
                # every input is checked before DeepSpeed starts: errors come at once and leave nothing
                run = _prepare(args, given, run_dir)
                return _train(run, import_deepspeed())
        finally:
            destroy_process_group()  # ranks that exit without this sometimes abort


def _prepare(args: TrainArgs, given: frozenset[str] | None, run_dir: RunDirectory) -> Run:
    """Settings, the run directory, tokenizer, model and adapters."""
    main, world = dist.get_rank() == 0, dist.get_world_size()
    log = print if main else (lambda *a, **k: None)
    args, ds_config = resolve(args, world, given, run_dir.choose)
    proj_dir = Path(args.proj_dir)
    resume_from = find_checkpoint(proj_dir, args.resume) if args.resume else None
    if resume_from is not None:
        changes = changes_from_run(args)
        log(f"continuing the run in {proj_dir} with its settings ({proj_dir / 'args.json'})"
            + (f"; changed: {', '.join(changes)}" if changes else ""))
    if not args.dry_run:  # fail before any work if the run could not write (creating nothing)
        check_writable_dir(proj_dir, lambda existing: f"--proj_dir {proj_dir} cannot be written ({existing} is "
                           "not a writable directory); choose another --proj_dir", nearest_existing=True)
        check_run_outputs(args, trains_whole_model(args, parse_rules(args.peft_rules)))  # outputs are no inputs
    require_backends(args.report_to)
    set_wkv_op(args.op)
    if args.op == "cuda" and not torch.cuda.is_available():
        raise RWKVPeftError("--op cuda needs a CUDA GPU; use --op auto or torch here")
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise RWKVPeftError("--precision fp16 needs a CUDA GPU (DeepSpeed has no fp16 on CPUs); "
                            "use --precision bf16 or fp32 here")
    if args.quant != "none":
        import_torchao(args.quant)  # a missing library fails here, before the model loads
    if not args.dry_run:  # one run per directory: a second one stops here, before the long work
        run_dir.hold(proj_dir, resuming=resume_from is not None, log=log)

    model, tokenizer = _model_and_tokenizer(args, DTYPES[args.precision])
    check_fits_memory(args, model.config.n_layer, model.config.n_embd)
    # adapters on a new model: its random base is saved beside the run, for merge and chat
    base_path = args.load_model or proj_dir / f"base.{args.model_format}"
    base_info = describe_base(model.state_dict(), model.config, base_path)  # before adapters change it
    rules = parse_rules(args.peft_rules)
    full = trains_whole_model(args, rules)
    new_base = None if full or args.load_model else dict(model.state_dict())
    if full:
        methods, parts = _train_every_weight(model, args, log)
    else:
        plan = {} if args.init_adapter else plan_adapters(model, rules, default_method(args))
        if not plan and not args.train_parts and not args.init_adapter:
            raise RWKVPeftError("nothing to train: --peft none with rules that adapt no layer; "
                                "choose a method or --train_parts")
        torch.manual_seed(args.random_seed)  # LoRA's Kaiming init
        quant = None if args.quant == "none" else args.quant
        if args.init_adapter:  # its layers, methods and trained values instead of fresh ones
            methods, parts = continue_adapter(model, args.init_adapter, model.state_dict(), args.train_parts,
                                              quant=quant, quant_targets=args.quant_targets)
        else:
            methods, parts = prepare_peft(model, plan, args.train_parts, init=resume_from is None, quant=quant,
                                          quant_targets=args.quant_targets)
        log(trainable_summary(model, methods, parts))
        if quant:
            log(quant_summary(model))
    if args.init_adapter:  # the new adapter file names the adapter it continued
        base_info["init_adapter"] = origin_record(args.init_adapter)
    return Run(args, ds_config, proj_dir, resume_from, tokenizer, model, new_base, base_path, base_info, full,
               methods, parts)


def _model_and_tokenizer(args: TrainArgs, dtype):
    """The model to train and its tokenizer: --tokenizer auto chooses as chat and eval do for
    a checkpoint, and the World tokenizer for a new model."""
    if args.load_model:
        model = load_model(args.load_model, dtype=dtype, quantizing=args.quant != "none")
        return model, tokenizer_for(model.config.vocab_size, args.tokenizer)
    tokenizer = load_tokenizer("world" if args.tokenizer == "auto" else args.tokenizer)
    config = rwkv7_config(args.n_layer, args.n_embd, args.head_size, args.vocab_size or tokenizer.vocab_size)
    model = create_model(config, seed=args.random_seed, dtype=dtype)
    check_fits_model(tokenizer, model.config.vocab_size, args.tokenizer)
    return model, tokenizer


def _train_every_weight(model, args: TrainArgs, log) -> tuple[dict, dict]:
    if "state" in args.train_parts:  # every weight, and a learned initial state besides
        add_time_state(model)
    for p in model.parameters():
        p.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters())
    log(f"trainable {n:,} of {n:,} parameters (100%): full training (--peft {args.peft})")
    return {}, dict(model.named_parameters())


def _train(run: Run, deepspeed) -> dict:
    args, main, world = run.args, dist.get_rank() == 0, dist.get_world_size()
    log = _logger(main)
    device = device_for_rank()
    train_file, val_file = data_files(args, world, run.ds_config["zero_optimization"]["stage"], log)
    data, validation = _load_data(run, train_file, val_file, main, log)
    if args.dry_run:
        what = {"sft": "samples", "grpo": "prompts (each with its completion) of up to"}.get(
            args.objective, f"{args.objective} preference pairs of up to")
        log(f"\ndata: {args.data_file}: {len(data):,} {what} {args.ctx_len} tokens per epoch "
            f"({data.tokens_total:,} tokens)\none sample, loss-masked spans marked:\n")
        log(data.render(0))
        return {}
    if main:  # (the directory is held since _prepare; left empty by a failed run, it is removed)
        if run.new_base is not None and not Path(run.base_path).exists():
            save_checkpoint_file(run.new_base, run.base_path)
            log(f"saved the new model's initial weights to {run.base_path}: the base the adapter merges into")
    run.new_base = None  # the file is the base from now on (PiSSA's resume reads it)
    memory = place_model(run.model, args, device, log)
    schedule = plan_schedule(args, len(data), world, log)
    objective = make_objective(run)  # its reference is the model as it stands now, before any resume
    optimizer = make_optimizer(param_groups(run.model, args), args, device, optimizer_offloaded(run.ds_config))
    engine, _, _, _ = deepspeed.initialize(model=run.model, optimizer=optimizer, config=run.ds_config)
    engine.checkpoint_engine.load = weights_only_load
    progress = Progress()
    if run.resume_from is not None:
        progress = resume(engine, run.resume_from, run, schedule.global_batch, validation)
        if progress.step >= schedule.total_steps:
            longer = resume_hint(run.proj_dir, "--max_steps", 2 * schedule.total_steps)
            log(f"the run in {run.proj_dir} is already complete ({progress.step} of {schedule.total_steps} steps); "
                f"nothing was changed. To train it longer:\n{longer}")
            return {"steps": progress.step, "complete": True, "proj_dir": str(run.proj_dir)}
        if validation.should_stop():
            log(f"the run in {run.proj_dir} already stopped early at step {progress.step} of {schedule.total_steps} "
                f"(no lower validation loss in {args.early_stop} evaluations); nothing was changed. To train on "
                f"regardless:\n{resume_hint(run.proj_dir, '--early_stop', 0)}")
            return {"steps": progress.step, "complete": True, "proj_dir": str(run.proj_dir)}
        log(f"resumed from {run.resume_from} at step {progress.step}")
    outputs = Outputs(run, engine, validation, schedule.global_batch, progress, main)
    outputs.begin(replace(args, grad_cp=memory.grad_cp, cpu_malloc=memory.cpu_malloc, warmup_steps=schedule.warmup))
    return _fit(run, engine, Stepper(engine, data, args, device, run.proj_dir, objective), schedule, validation, outputs,
                train_file, device, log)


def _fit(run: Run, engine, stepper: Stepper, schedule: Schedule, validation: Validation, outputs: Outputs,
         train_file: str, device, log) -> dict:
    """The loop over optimizer steps, from outputs.progress to the schedule's end."""
    from tqdm import tqdm

    args, progress, main = run.args, outputs.progress, outputs.main
    tokens_per_step = schedule.global_batch * args.ctx_len
    pieces = f"in pieces of {args.chunk_ctx} tokens; " if args.chunk_ctx else ""
    log(f"\ntraining {schedule.total_steps} steps of {schedule.global_batch} x {args.ctx_len} tokens on "
        f"{stepper.world} {device.type} process(es), ZeRO stage {run.ds_config['zero_optimization']['stage']}, "
        f"{args.precision}; {pieces}writing to {run.proj_dir}")
    bar = tqdm(total=schedule.total_steps, initial=progress.step, disable=not main, unit="step", dynamic_ncols=True)
    progress.started, first_step, losses = time.perf_counter(), progress.step, []
    stop = StopRequest(announce=main)
    engine.train()
    with stop:
        while progress.step < schedule.total_steps:
            lr = schedule.lr(progress.step)
            result = stepper.step(progress.step, lr, stop.requested)
            progress.step += 1
            step = progress.step
            losses.append(result.loss)
            val_record = validation.evaluate(engine.module, step) if validation.due(step, schedule.total_steps) else None
            elapsed = time.perf_counter() - progress.started
            tps = tokens_per_step * (step - first_step) / max(elapsed - validation.seconds, 1e-9)
            record = {"step": step, "loss": round(result.loss, 6), "lr": lr, "tokens": step * tokens_per_step,
                      "tokens_per_s": round(tps, 1), "elapsed_s": round(progress.earlier_s + elapsed, 3),
                      "peak_memory_mb": round(peak_memory_mb(device), 1)}
            if result.skipped:
                record["skipped_micro_batches"] = result.skipped
            record.update(result.metrics)
            outputs.log(record, val_record)
            if main:
                val = {"val": f"{validation.last_loss:.4f}"} if validation.last_loss is not None else {}
                extra = {label: f"{result.metrics[k]:.3f}" for k, label in BAR.items() if k in result.metrics}
                bar.set_postfix(loss=f"{result.loss:.4f}", **val, **extra, tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                bar.update(1)
            if validation.should_stop():
                log(f"\nearly stop: no lower validation loss in {args.early_stop} evaluations; "
                    f"the best was {validation.best_loss:.4f} at step {validation.best_step}")
                break
            if (result.stop_requested or step == args.stop_at_step) and step < schedule.total_steps:
                bar.close()
                return outputs.stop_early(step, result.stop_requested, log)
            if args.save_every and step % args.save_every == 0 and step < schedule.total_steps:
                outputs.save(step)
    bar.close()
    return outputs.finish(progress.step, tokens_per_step, losses[-1] if losses else None, stepper.skipped,
                          train_file, device, log)


def _logger(main: bool):
    # tqdm.write: validation replies and the early-stop line print above the progress bar, not through it
    from tqdm import tqdm

    return (lambda *parts: tqdm.write(" ".join(map(str, parts)))) if main else (lambda *a, **k: None)


def _load_data(run: Run, train_file: str, val_file: str | None, main: bool, log):
    """The training data and the validation; rank 0 tokenizes into the cache first, the others then read it."""
    from ..data.datasets import load_training_data

    args = run.args

    def load():
        if args.objective != "sft":
            data = load_objective_data(args, train_file, run.tokenizer)
        else:
            data = load_training_data(train_file, run.tokenizer, args.ctx_len, data_type=args.data_type,
                                      sft_fields=tuple(args.sft_fields) if args.sft_fields else None,
                                      mode=args.data_mode, seed=args.random_seed, progress=main)
        return data, load_heldout(val_file, args, run.tokenizer, main) if val_file else (None, ())

    loaded = load() if main else None
    dist.barrier()
    data, (heldout, heldout_items) = loaded or load()
    return data, Validation(heldout, heldout_items, run.tokenizer, args.eval_every, args.early_stop, args.micro_bsz,
                            log, val_file)
