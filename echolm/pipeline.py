"""`echolm run`: every stage in order (tokenizer, pretrain, sft, rl, rank, rm, rlhf, dpo,
eval) into one run directory, then the report. Finished stages are skipped, an interrupted
one resumes from its last checkpoint."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from echolm.atomic import atomic_write_json
from echolm.config import Config
from echolm.errors import EchoError
from echolm.runfiles import CONFIG_FIX, TIMINGS_FIX, read_json
from echolm.settings import apply_overrides, config_from_dict, load_config
from echolm.summary import read_summary

StageFn = Callable[..., dict]


def stages() -> list[tuple[str, StageFn]]:
    from echolm.train.dpo import run_dpo
    from echolm.train.grpo import run_rl
    from echolm.train.pretrain import run_pretrain
    from echolm.train.reward_model import run_rm
    from echolm.train.rlhf import run_rlhf
    from echolm.train.sft import run_sft
    from echolm.train.tokenize import run_tokenizer

    return [("tokenizer", run_tokenizer), ("pretrain", run_pretrain), ("sft", run_sft),
            ("rl", run_rl), ("rank", run_rank_stage), ("rm", run_rm), ("rlhf", run_rlhf),
            ("dpo", run_dpo), ("eval", run_eval)]


def run_rank_stage(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    """Rankings for the reward model and DPO, from the simulated annotator (clearly labelled
    as such in the store); a person's rankings from `echolm rank` or the web page count too."""
    from echolm.annotator import SimulatedAnnotator
    from echolm.rank import collect_rankings
    from echolm.summary import update_summary

    done = run_dir / "rank_done.json"
    read_summary(run_dir)  # a corrupt summary.json stops the stage now, not at its end
    if done.exists() and not force:
        log("rank: already done (use --force to redo)")
        return read_json(done, "delete it to rank again (the rankings in prefs.sqlite are "
                         "kept and reused)")
    r = cfg.rank
    annotator = SimulatedAnnotator(temperature=r.annotator_noise, seed=cfg.sft.seed)
    result = collect_rankings(run_dir, r.prompts, r.k, annotator, temperature=r.temperatures,
                              budget_s=60 * r.max_minutes, log=log)
    keep = {k: result[k] for k in ("prompts", "ranked", "responses", "annotator",
                                   "gold_agreement", "seconds", "planned_prompts", "fitted",
                                   "cut_short", "budget_minutes", "schedule") if k in result}
    update_summary(run_dir, "rank", keep)
    atomic_write_json(done, result)
    return result


def run_eval(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    from echolm.scorecard import evaluate_run

    return evaluate_run(cfg, run_dir, force=force, log=log, humaneval=cfg.data.humaneval,
                        gold_prompts=cfg.data.gold_prompts)


def resolve_run_config(run_dir: Path, preset: str | None, overrides: list[str]) -> Config:
    """The run's config: the saved one if the directory exists (so a resumed run keeps its
    settings), else the preset; CLI overrides apply on top and are saved."""
    saved = run_dir / "config.json"
    if saved.exists() and preset is None:
        data = read_json(saved, CONFIG_FIX)
        try:
            cfg = config_from_dict(data, where=str(saved))
        except EchoError as e:  # a field of the wrong type or name
            raise EchoError(f"{e}; {CONFIG_FIX}") from None
        apply_overrides(cfg, overrides)
    else:
        cfg = load_config(preset or "cpu", overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here: one writer
        atomic_write_json(saved, cfg.to_dict())
    return cfg


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def record_machine(cfg: Config, run_dir: Path) -> dict:
    """DIR/machine.json: what the run trains on (the report's Machine section)."""
    import torch

    from echolm.machine import describe
    from echolm.runtime import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {**describe(measure=True, device=device),
            "dtype": str(resolve_dtype(cfg.pretrain.dtype, device)).removeprefix("torch."),
            "processes": int(os.environ.get("WORLD_SIZE", "1"))}
    atomic_write_json(run_dir / "machine.json", info)
    return info


def run_pipeline(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    """Every stage in order. A stage that fails leaves the earlier ones intact; the report
    is still written and says which stage failed and why, then the error propagates."""
    from echolm.report import build_report

    t_all = time.time()
    record_machine(cfg, run_dir)
    timings_path = run_dir / "timings.json"
    timings = read_json(timings_path, TIMINGS_FIX, values=dict, default={})
    atomic_write_json(run_dir / "status.json", {"running": True})
    for name, fn in stages():
        log(f"== {name} ==")
        t0 = time.time()
        try:
            fn(cfg, run_dir, force=force, log=log)
        except BaseException as e:
            atomic_write_json(run_dir / "status.json", {
                "failed_stage": name, "error": f"{type(e).__name__}: {e}"})
            try:
                build_report(run_dir, log=log)
            except Exception as report_error:  # never hide the stage's own error
                log(f"run: the report could not be written either: {report_error}")
            raise
        seconds = time.time() - t0
        if seconds > 1 or name not in timings:  # a skipped (finished) stage keeps its time
            timings[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(_peak_rss_mb())}
            atomic_write_json(timings_path, timings)
    atomic_write_json(run_dir / "status.json", {"failed_stage": None})
    build_report(run_dir, log=log)
    summary = read_summary(run_dir)
    log(f"run: all stages done in {(time.time() - t_all) / 60:.1f} min; report in "
        f"{run_dir / 'report' / 'report.md'}")
    return summary
