"""Experiment trackers beside metrics.jsonl: TensorBoard and Weights & Biases, off by default.

`<section>.trackers = ["tensorboard", "wandb"]` (e.g. ``--set pretrain.trackers=tensorboard``)
makes the stage's MetricsLog send every numeric field of each metrics record to them, keyed
by the record's step. Nothing per stage: whatever a stage writes to metrics.jsonl reaches
the trackers too.

- tensorboard: event files in DIR/tb/<stage>/ (``tensorboard --logdir DIR/tb``); no network.
  After a resume the replayed steps replace the earlier ones (TensorBoard's purge_step).
- wandb: one W&B run per stage, named ``<run dir>/<stage>`` and grouped by the run directory;
  project from WANDB_PROJECT (default "echolm"), mode from WANDB_MODE (online, offline,
  disabled), files under DIR/wandb/. Needs ``pip install wandb``.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Protocol

from echolm.errors import EchoError


class Tracker(Protocol):
    def restart(self, step: int) -> None: ...
    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise EchoError("trackers: 'tensorboard' needs the tensorboard package "
                            "(pip install tensorboard)") from None
        self._writer_class = SummaryWriter
        self.folder, self.writer, self.purge_step = folder, None, None

    def restart(self, step: int) -> None:
        """Training continues after `step`: events logged before at later steps are dropped."""
        if self.writer is None:
            self.purge_step = step + 1

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:  # opened on first use, so that a resume can set purge_step
            self.writer = self._writer_class(str(self.folder), purge_step=self.purge_step)
            self.purge_step = None  # purge once: a reopened writer appends
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    def __init__(self, run_dir: Path, stage: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise EchoError("trackers: 'wandb' needs the wandb package (pip install wandb), "
                            "or remove it from the stage's trackers") from None
        if wandb.run is not None:  # the previous stage's run in this process
            wandb.run.finish()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "echolm"),
                              name=f"{run_dir.name}/{stage}", group=run_dir.name,
                              job_type=stage, dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE") or None)

    def restart(self, step: int) -> None:
        pass  # a new W&B run per start; W&B keeps steps monotonic within a run

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], run_dir: Path, stage: str,
                  config: dict[str, Any] | None = None) -> list[Tracker]:
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            (run_dir / "tb").mkdir(parents=True, exist_ok=True)
            trackers.append(TensorBoardTracker(run_dir / "tb" / stage))
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir, stage, config or {}))
        else:
            raise EchoError(f"trackers: unknown tracker '{name}' (expected tensorboard or wandb)")
    return trackers


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record (not the step, not booleans, lists or text)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}
