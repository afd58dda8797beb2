"""Metrics: one JSON object per line in the run's metrics.jsonl, tagged with the stage, and
the same numbers sent to the experiment trackers (train/trackers.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from echolm.atomic import atomic_write_text


class MetricsLog:
    """Appends one JSON object per line to the run's metrics.jsonl (tagged with the stage),
    and sends its numbers to the experiment trackers named in `trackers` (train/trackers.py:
    "tensorboard" into DIR/tb/<stage>/, "wandb")."""

    def __init__(self, path: Path, stage: str, enabled: bool = True,
                 trackers: list[str] | tuple[str, ...] = (),
                 config: dict[str, Any] | None = None) -> None:
        self.path, self.stage, self.enabled = path, stage, enabled
        self.trackers: list = []
        if enabled and trackers:
            from echolm.train.trackers import open_trackers

            self.trackers = open_trackers(list(trackers), path.parent, stage, config)

    def truncate_after(self, step: int) -> None:
        """Drop this stage's records past `step` (they are replayed after a resume)."""
        for tracker in self.trackers:
            tracker.restart(step)
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line, rec in _records(self.path)
                if not (rec.get("stage") == self.stage and rec.get("step", 0) > step)]
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"stage": self.stage, **record}) + "\n")
            if self.trackers and "step" in record:
                from echolm.train.trackers import scalars_of

                for tracker in self.trackers:
                    tracker.log(int(record["step"]), scalars_of(record))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: Path, stage: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    return [rec for _, rec in _records(path) if stage is None or rec.get("stage") == stage]


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every line of `path` that holds a JSON object with a numeric step
    (if any); other lines (cut by a kill mid-write, or garbage) are left out: metrics are a
    log to plot, not something a stage resumes from."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step", 0), (int, float)):
            out.append((line, rec))
    return out
