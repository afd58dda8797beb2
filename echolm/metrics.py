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
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if not (rec.get("stage") == self.stage and rec.get("step", 0) > step):
                keep.append(line)
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
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if stage is None or rec.get("stage") == stage:
            out.append(rec)
    return out
