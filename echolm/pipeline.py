"""`echolm run`: every stage implemented so far, in order, into one run directory. Finished
stages are skipped, an interrupted one resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from echolm.checkpoint import atomic_write_json
from echolm.config import Config, apply_overrides, config_from_dict, load_config
from echolm.summary import read_summary

StageFn = Callable[..., dict]


def stages() -> list[tuple[str, StageFn]]:
    from echolm.train.grpo import run_rl
    from echolm.train.pretrain import run_pretrain
    from echolm.train.sft import run_sft
    from echolm.train.tokenize import run_tokenizer

    return [("tokenizer", run_tokenizer), ("pretrain", run_pretrain), ("sft", run_sft),
            ("rl", run_rl)]


def resolve_run_config(run_dir: Path, preset: str | None, overrides: list[str]) -> Config:
    """The run's config: the saved one if the directory exists (so a resumed run keeps its
    settings), else the preset; CLI overrides apply on top and are saved."""
    saved = run_dir / "config.json"
    if saved.exists() and preset is None:
        cfg = config_from_dict(json.loads(saved.read_text()))
        apply_overrides(cfg, overrides)
    else:
        cfg = load_config(preset or "cpu", overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here: one writer
        atomic_write_json(saved, cfg.to_dict())
    return cfg


def run_pipeline(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    t0 = time.time()
    for name, fn in stages():
        log(f"== {name} ==")
        fn(cfg, run_dir, force=force, log=log)
    from echolm.plots import plot_all

    for figure in plot_all(run_dir):
        log(f"run: figure {figure}")
    summary = read_summary(run_dir)
    log(f"run: all stages done in {(time.time() - t0) / 60:.1f} min; summary in "
        f"{run_dir / 'summary.json'}")
    return summary
