"""`echolm run`: every stage in order (tokenizer, pretrain, sft, rl, rank, rm, rlhf, dpo,
eval) into one run directory, then the report. Finished stages are skipped, an interrupted
one resumes from its last checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from echolm.atomic import atomic_write_json
from echolm.config import Config
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
    if done.exists() and not force:
        log("rank: already done (use --force to redo)")
        return json.loads(done.read_text())
    r = cfg.rank
    annotator = SimulatedAnnotator(temperature=r.annotator_noise, seed=cfg.sft.seed)
    result = collect_rankings(run_dir, r.prompts, r.k, annotator, temperature=r.temperatures,
                              budget_s=60 * r.max_minutes, log=log)
    keep = {k: result[k] for k in ("prompts", "annotator", "gold_agreement", "seconds",
                                   "planned_prompts", "fitted", "cut_short", "budget_minutes",
                                   "schedule") if k in result}
    # every ranking of this run's prompts, also those made before an interruption
    keep.update(ranked=result["ranked_total"], responses=result["responses_total"])
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
        cfg = config_from_dict(json.loads(saved.read_text()))
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


STATUS_FILE = "status.json"


def write_status(run_dir: Path, state: str, command: str, stage: str | None = None,
                 error: str | None = None, started: float | None = None) -> None:
    """DIR/status.json: what the last command that wrote the run is doing or how it ended.
    state: running | succeeded | failed | interrupted; `stage`: the one running, or the one
    that failed or was interrupted (`failed_stage` too, for readers of older runs)."""
    if os.environ.get("RANK", "0") != "0":
        return
    ended = state != "running"
    atomic_write_json(run_dir / STATUS_FILE, {
        "state": state, "command": command, "stage": stage,
        "failed_stage": stage if state in ("failed", "interrupted") else None,
        "error": error, "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started or time.time())),
        "ended": time.strftime("%Y-%m-%d %H:%M:%S") if ended else None})


def _outcome(e: BaseException) -> tuple[str, str]:
    """(state, error) for a stage that raised `e`."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", f"interrupted ({e})" if str(e) else "interrupted"
    return "failed", f"{type(e).__name__}: {e}"


def read_status(run_dir: Path) -> dict:
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


@contextlib.contextmanager
def recording(run_dir: Path, command: str, stage: str) -> Iterator[None]:
    """DIR/status.json around one stage's own command (`echolm sft`): running, then how it
    ended. A success leaves an earlier failure of another stage standing (that stage is
    still to redo); it clears one of this stage. Only in a run directory (config.json): a
    command refused before it starts a run writes nothing."""
    run_dir = Path(run_dir)

    def is_run() -> bool:
        return (run_dir / "config.json").is_file()

    before, started = read_status(run_dir), time.time()
    if is_run():
        write_status(run_dir, "running", command, stage, started=started)
    try:
        yield
    except BaseException as e:
        if is_run():
            state, error = _outcome(e)
            write_status(run_dir, state, command, stage, error, started)
        raise
    if before.get("state") in ("failed", "interrupted") and before.get("stage") != stage:
        atomic_write_json(run_dir / STATUS_FILE, before)
    elif is_run():
        write_status(run_dir, "succeeded", command, stage, started=started)


def run_pipeline(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    """Every stage in order. DIR/status.json says `running` (and which stage) until the end,
    `succeeded` only once every stage and the report are done; a stage that fails or is
    interrupted is recorded there with its error, the earlier ones stay intact, the report is
    still written (after a failure) and says so, then the error propagates."""
    from echolm.report import build_report

    t_all, command = time.time(), "echolm run"
    now = {"stage": "machine"}

    def starting(stage: str) -> None:
        now["stage"] = stage
        write_status(run_dir, "running", command, stage, started=t_all)

    try:
        starting("machine")
        _run_stages(cfg, run_dir, force, log, starting)
        now["stage"] = "report"
        write_status(run_dir, "succeeded", command, started=t_all)
        build_report(run_dir, log=log)
    except BaseException as e:
        state, error = _outcome(e)
        write_status(run_dir, state, command, now["stage"], error, t_all)
        if state == "failed" and now["stage"] != "report":  # interrupted: stop, as asked
            try:
                build_report(run_dir, log=log)
            except Exception as report_error:  # never hide the stage's own error
                log(f"run: the report could not be written either: {report_error}")
        raise
    summary = read_summary(run_dir)
    log(f"run: all stages done in {(time.time() - t_all) / 60:.1f} min; report in "
        f"{run_dir / 'report' / 'report.md'}")
    return summary


def _run_stages(cfg: Config, run_dir: Path, force: bool, log: Callable[[str], object],
                starting: Callable[[str], object]) -> None:
    """The stages in order (`starting(name)` before each), with their times in timings.json."""
    from echolm.staging import ForcePass

    redo = ForcePass(run_dir, cfg.to_dict(), force)  # --force run again resumes its pass
    record_machine(cfg, run_dir)
    timings_path = run_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for name, fn in stages():
        starting(name)
        log(f"== {name} ==")
        t0 = time.time()
        fn(cfg, run_dir, force=redo.force(name), log=log)
        redo.done(name)
        seconds = time.time() - t0
        if seconds > 1 or name not in timings:  # a skipped (finished) stage keeps its time
            timings[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(_peak_rss_mb())}
            atomic_write_json(timings_path, timings)
    redo.finish()
