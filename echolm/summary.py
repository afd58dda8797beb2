"""The run's `summary.json`: one object per stage with its final metrics (the contract in
docs/architecture.md). Written atomically and mirrored to `report/summary.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from echolm.atomic import atomic_write_json
from echolm.runfiles import read_json


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The summary so far ({} before any stage); a corrupt one is a one-line error. Every
    stage reads it before its first step (staging.StageOutput.finished), so that a corrupt file
    stops the stage there, not after its training when the stage adds its results."""
    return read_json(run_dir / "summary.json", "delete it to start a new one (a finished "
                     "stage adds its results again when rerun with --force)", values=dict,
                     default={})


def update_summary(run_dir: Path, stage: str, values: dict[str, Any]) -> dict[str, Any]:
    summary = read_summary(run_dir)
    summary[stage] = values
    atomic_write_json(run_dir / "summary.json", summary)
    (run_dir / "report").mkdir(exist_ok=True)
    atomic_write_json(run_dir / "report" / "summary.json", summary)
    return summary
