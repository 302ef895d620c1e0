"""What a run writes into its directory: the weights (final, periodic, best), resumable
checkpoints, args.json, metrics.jsonl, loss.png and summary.json.

Every process calls these methods (ZeRO's checkpoints need all of them); only rank 0 writes
the files that are not checkpoints.
"""

from __future__ import annotations

import json
import math
import resource
import shlex
from dataclasses import asdict
from pathlib import Path

import torch

from ..cli import command
from ..io import atomic_write, save_checkpoint_file
from ..peft.adapter_file import save_adapter
from .args import TrainArgs
from .checkpoint import Progress, save_checkpoint
from .report import Report, plot_losses
from .run_dir import resume_hint


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def _record_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a killed process counts as past the end."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Outputs:
    def __init__(self, run, engine, validation, global_batch: int, progress: Progress, main: bool):
        self.run, self.engine, self.validation, self.progress, self.main = run, engine, validation, progress, main
        self.args: TrainArgs = run.args
        self.proj_dir: Path = run.proj_dir
        self.global_batch = global_batch
        self.metrics = self.proj_dir / "metrics.jsonl"
        fmt = self.args.model_format
        self.final = self.proj_dir / (f"model.{fmt}" if run.full else "adapter.safetensors")
        self.best = self.proj_dir / (f"model-best.{fmt}" if run.full else "adapter-best.safetensors")
        self.quant = None if self.args.quant == "none" else {"format": self.args.quant,
                                                               "targets": self.args.quant_targets}
        self.report = None

    def begin(self, settings: TrainArgs) -> None:
        """args.json, and metrics.jsonl without the records past the step the run continues from."""
        if self.main:
            atomic_write(self.proj_dir / "args.json",
                         lambda f: f.write(json.dumps(asdict(settings), indent=1).encode()))
            kept = []
            if self.progress.step and self.metrics.exists():  # they will be redone
                kept = [line for line in self.metrics.read_text().splitlines()
                        if _record_step(line) <= self.progress.step]
            atomic_write(self.metrics, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
        self.report = Report(self.metrics, self.args.report_to, asdict(settings), enabled=self.main)

    def write_weights(self, target: Path) -> None:
        module = self.engine.module
        if not self.main:
            return
        if self.run.full:
            save_checkpoint_file({k: v.detach().cpu() for k, v in module.state_dict().items()}, target)
        else:
            trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
            save_adapter(target, self.run.methods, {k: trainable[k] for k in self.run.parts}, self.run.base_info,
                         self.quant)

    def save(self, step: int, final: bool = False) -> None:
        """The weights and a resumable checkpoint at step."""
        if self.run.full:
            self.write_weights(self.final)
        else:
            if self.main and not final:  # created with the first periodic adapter, never left empty
                (self.proj_dir / "adapters").mkdir(exist_ok=True)
            self.write_weights(self.final if final else self.proj_dir / f"adapters/step-{step:08d}.safetensors")
        state = {"step": step, "global_batch": self.global_batch, "samples": step * self.global_batch,
                 "segment": self.progress.segment, "elapsed_s": self.progress.elapsed(),
                 "validation": self.validation.state()}
        save_checkpoint(self.engine, self.proj_dir, step, state, self.args.keep_last)

    def log(self, record: dict, val_record: dict | None) -> None:
        """The step's metrics (and an evaluation's); the best weights when validation improved."""
        if val_record and self.args.save_best and self.validation.improved:
            self.write_weights(self.best)
        if self.main:
            self.report.log(record)
            if val_record:
                self.report.log(val_record)

    def stop_early(self, step: int, interrupted: bool, log) -> dict:
        """A checkpoint at step, for --resume: after Ctrl-C / SIGTERM, or at --stop_at_step."""
        self.save(step)
        why = "\ninterrupted: saved a checkpoint" if interrupted else "stopped (--stop_at_step): saved a checkpoint"
        log(f"{why} at step {step}\n{resume_hint(self.proj_dir)}")
        self.report.close()
        if interrupted:
            raise KeyboardInterrupt
        return {"steps": step, "stopped": True, "proj_dir": str(self.proj_dir)}

    def finish(self, step: int, tokens_per_step: int, final_loss: float | None, skipped: int, train_file: str,
               device: torch.device, log) -> dict:
        """The final weights and checkpoint, summary.json and loss.png; returns the summary."""
        self.save(step, final=True)
        # the whole run, over every resumed segment; tokens/s leaves out time spent validating
        elapsed = self.progress.elapsed()
        training_s = max(elapsed - self.validation.seconds, 1e-9)
        summary = {"steps": step, "tokens_seen": step * tokens_per_step, "time_s": round(elapsed, 2),
                   "tokens_per_s": round(tokens_per_step * step / training_s, 1), "segments": self.progress.segment,
                   "peak_memory_mb": round(peak_memory_mb(device), 1), "final_loss": final_loss,
                   "skipped_micro_batches": skipped, "proj_dir": str(self.proj_dir), "train_data": train_file,
                   **self.validation.summary()}
        if self.args.save_best:
            summary["best_checkpoint"] = str(self.best)
        if self.validation.should_stop():
            summary["early_stopped"] = True
        self.report.close()
        if self.main:
            atomic_write(self.proj_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
            plot_losses(self.metrics, self.proj_dir / "loss.png")
            log("\n" + "  ".join(f"{k}: {v}" for k, v in summary.items()))
            log(f"wrote {self.final}")
            # commands that work exactly as printed (the tokenizer named when it is not found by itself)
            tokenizer = [] if self.args.tokenizer == "auto" else ["--tokenizer", self.args.tokenizer]
            log(f"next: {command('run')} " + shlex.join(["--model", str(self.final), *tokenizer]) if self.run.full
                else f"next: {command('merge')} " + shlex.join(["--adapter", str(self.final)]))
        return summary
