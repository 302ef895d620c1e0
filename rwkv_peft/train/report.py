"""Where a run's figures go: metrics.jsonl always, TensorBoard and Weights & Biases on request.

Every record is a dict with a `step`; a training step's record has `loss`, `lr`, `tokens_per_s`,
`peak_memory_mb`, an evaluation's has `val_loss` (and `val_task`). Each backend receives the
numeric fields under their own names. Only rank 0 reports.

tensorboard and wandb are optional packages: `require_backends` says which to install before
any work starts. wandb writes its run under <proj_dir>/wandb; WANDB_MODE=offline keeps it
off the network (sync later with `wandb sync`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import RWKVPeftError
from ..io import append_line, atomic_write

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def require_backends(names) -> None:
    """One clear error for a --report_to whose package is not installed."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise RWKVPeftError(f"--report_to {name} needs the {PACKAGES[name]} package: "
                                f"pip install {PACKAGES[name]} (or drop --report_to {name})")


class TensorBoard:
    def __init__(self, proj_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(proj_dir / "tensorboard"))
        self.writer.add_text("args", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a run stopped by a signal still leaves readable events

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, proj_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rwkv-peft"), name=proj_dir.name,
                              dir=str(proj_dir), config=config)

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB}


class Report:
    """metrics.jsonl plus the --report_to backends; inert on ranks other than 0."""

    def __init__(self, metrics_path: Path, report_to=(), config: dict | None = None, enabled: bool = True):
        self.metrics_path, self.enabled = metrics_path, enabled
        self.backends = [BACKENDS[name](metrics_path.parent, config or {}) for name in report_to] if enabled else []

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_line(self.metrics_path, json.dumps(record))
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for backend in self.backends:
            backend.log(record["step"], scalars)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def plot_losses(metrics_path: Path, png: Path) -> None:
    """loss.png: the training loss per step, and the validation loss where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1.2, label="training")
    if val:
        ax.plot(*zip(*val), lw=1.5, marker="o", ms=3, label="validation")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
