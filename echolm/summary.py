"""The run's `summary.json`: one object per stage with its final metrics (the contract in
docs/architecture.md). Written atomically and mirrored to `report/summary.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from echolm.atomic import atomic_write_json


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_summary(run_dir: Path, stage: str, values: dict[str, Any]) -> dict[str, Any]:
    summary = read_summary(run_dir)
    summary[stage] = values
    atomic_write_json(run_dir / "summary.json", summary)
    (run_dir / "report").mkdir(exist_ok=True)
    atomic_write_json(run_dir / "report" / "summary.json", summary)
    return summary
