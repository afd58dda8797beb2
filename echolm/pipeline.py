"""`echolm run`: every stage in order (tokenizer, pretrain, sft, rl, rank, rm, rlhf, dpo,
eval) into one run directory, then the report. Finished stages are skipped, an interrupted
one resumes from its last checkpoint. `run.stages` picks which stages run; `run.source`
(`--from FILE`) starts from an open model instead: it is imported first (`import_source`)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from echolm.atomic import atomic_write_json
from echolm.config import Config
from echolm.errors import EchoError
from echolm.runfiles import CONFIG_FIX, TIMINGS_FIX, read_json
from echolm.runlock import LOCK_NAME
from echolm.settings import apply_overrides, config_changes, config_from_dict, load_config
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


def import_source(cfg: Config, run_dir: Path, log=print) -> dict:
    """Import `run.source` (a .gguf file or a Hugging Face folder) into `run_dir`: its
    tokenizer, finished base stage and import.json, once. The import is made beside the run
    directory and its three entries are moved in, import.json last (a killed move is finished
    by the next run)."""
    import shutil

    from echolm.hf import import_hf
    from echolm.import_gguf import import_gguf

    src = Path(cfg.run.source).expanduser()
    info_file = run_dir / "import.json"
    tmp = run_dir.parent / f".{run_dir.name}.import"
    if info_file.exists() and not tmp.exists():
        info = read_json(info_file, "re-import into a new run directory")
        if Path(info.get("source", "")) != src.resolve():
            raise EchoError(f"{run_dir}: imported from {info.get('source')}, not run.source="
                            f"{cfg.run.source}; use a new run directory for another model")
        log(f"import: already done ({info['source']})")
        return info
    if not tmp.exists():
        for name in ("tokenizer", "base"):
            if (run_dir / name).exists():
                raise EchoError(f"{run_dir / name}: the run has a {name} of its own; "
                                "run.source (--from) needs a new run directory")
        # (a missing source was refused before any stage: _check_inputs)
        how = import_gguf if src.is_file() else import_hf
        how(src, tmp, chat_format=cfg.run.chat_format, log=log)
    else:  # an import killed while it was moved in: finish the move if it is this model's
        staged = tmp / "import.json" if (tmp / "import.json").exists() else info_file
        then = read_json(staged, f"delete {tmp} and run again").get("source")
        if Path(then or "") != src.resolve():
            raise EchoError(f"{tmp}: a stopped import of {then} was being moved into the run, "
                            f"not of run.source={cfg.run.source}; delete {tmp} and use a new "
                            "run directory for another model")
    for name in ("tokenizer", "base", "import.json"):
        if (tmp / name).exists():
            os.replace(tmp / name, run_dir / name)
    shutil.rmtree(tmp)
    return read_json(info_file, "re-import into a new run directory")


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


def resolve_run_config(run_dir: Path, preset: str | None, overrides: list[str],
                       reconfigure: bool = False, read_only: bool = False) -> Config:
    """The run's config, every setting checked before any stage runs. A new run directory:
    the preset (default cpu) + overrides, saved now as DIR/config.json so that a killed first
    run resumes with the same settings. An existing one: its saved config; a --preset or --set
    that changes a saved value is refused, showing what would change, unless `reconfigure`
    (checked against what the run already built; `run_config` saves it once the command
    succeeded) or `read_only` (used by this command only, never saved)."""
    saved = run_dir / "config.json"
    if not saved.exists():
        if read_only:
            raise EchoError(f"{run_dir}: not a run directory (no config.json)")
        cfg = load_config(preset or "cpu", overrides)
        _check_inputs(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here: one writer
            atomic_write_json(saved, cfg.to_dict())
        return cfg
    data = read_json(saved, CONFIG_FIX)
    try:
        old = config_from_dict(data, where=str(saved))
    except EchoError as e:  # a field of the wrong type or name
        raise EchoError(f"{e}; {CONFIG_FIX}") from None
    try:
        old.validate()
        broken = None
    except EchoError as e:  # saved before a check existed: say where, and how to fix it
        broken = str(e)
    try:
        cfg = load_config(preset, overrides) if preset else config_from_dict(data)
        if not preset:
            apply_overrides(cfg, overrides)
    except EchoError as e:
        if str(e) == broken:
            raise EchoError(f"{saved}: {e} (change it with --set SECTION.FIELD=VALUE"
                            f"{'' if read_only else ' --reconfigure'})") from None
        raise
    changes = config_changes(old, cfg)
    if changes and read_only:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6
                                          else "")
        print(f"echolm: for this command only ({saved} unchanged): {shown}", file=sys.stderr)
    elif changes and not reconfigure:
        asked = " and ".join(x for x, on in (("--preset", preset), ("--set", overrides)) if on)
        lines = changes[:30] + ([f"... and {len(changes) - 30} more"] if len(changes) > 30
                                else [])
        raise EchoError(f"{saved}: {asked} would change {len(changes)} saved setting"
                        f"{'s' * (len(changes) > 1)} of this run; add --reconfigure to change "
                        "them, or leave them out to go on as saved:\n  " + "\n  ".join(lines))
    elif changes:
        _check_fits_run(old, cfg, run_dir)
    if not read_only:
        _check_inputs(cfg, run_dir)
    return cfg


@contextmanager
def run_config(run_dir: Path, preset: str | None, overrides: list[str],
               reconfigure: bool = False) -> Iterator[Config]:
    """`resolve_run_config` for a command that trains: a --reconfigure's settings are saved
    when the command has succeeded, never by one that failed (or was interrupted: running
    the same command again resumes with them)."""
    cfg = resolve_run_config(run_dir, preset, overrides, reconfigure=reconfigure)
    asked = cfg.to_dict()  # a stage may adjust its cfg in memory: save what was asked
    yield cfg
    save_run_config(run_dir, asked)


def save_run_config(run_dir: Path, asked: dict) -> None:
    """DIR/config.json := `asked`, when a value differs (a file of an earlier layout that
    holds the same values is left as it is)."""
    saved = run_dir / "config.json"
    if os.environ.get("RANK", "0") != "0":
        return
    if saved.exists() and not config_changes(config_from_dict(read_json(saved, CONFIG_FIX)),
                                             config_from_dict(asked)):
        return
    atomic_write_json(saved, asked)


def _check_fits_run(old: Config, new: Config, run_dir: Path) -> None:
    """A --reconfigure may change how stages train, not what the run already built: the
    tokenizer's vocabulary and the model's shape are those of its files."""
    built = [("tokenizer", "tokenizer", run_dir / "tokenizer"), ("model", "base model",
                                                                   run_dir / "base")]
    for section, what, folder in built:
        if not folder.exists():
            continue
        for key, value in vars(getattr(new, section)).items():
            was = getattr(getattr(old, section), key)
            if value != was and (section, key) != ("tokenizer", "train_bytes"):
                raise EchoError(f"{section}.{key}={json.dumps(value)} does not match the {what} "
                                f"in {folder} ({key}={json.dumps(was)}); a different "
                                f"{'vocabulary' if section == 'tokenizer' else 'shape'} needs a "
                                "new run directory")


def _check_inputs(cfg: Config, run_dir: Path) -> None:
    """What the settings name must be there before the first stage: data files (unless the
    stages that read them are done) and the trackers' packages."""
    import importlib.util

    source = cfg.run.source
    if source and not (run_dir / "import.json").exists() and not Path(source).exists():
        raise EchoError(f"run.source: {source}: no such file or folder")
    reads = [("pretrain", run_dir / "tokens" / "meta.json"), ("sft", run_dir / "sft" / "done.json")]
    for name, done in reads:
        for source in getattr(cfg.data, name):
            local = source != "builtin" and not source.startswith("hf:")
            if local and not done.exists() and not Path(source).expanduser().exists():
                raise EchoError(f"data.{name}: source '{source}': no such file or folder")
    for section in ("pretrain", "sft", "rl", "rm", "rlhf", "dpo"):
        for tracker in getattr(cfg, section).trackers:
            if importlib.util.find_spec(tracker) is None:
                raise EchoError(f"{section}.trackers: '{tracker}' needs the {tracker} package "
                                f"(pip install {tracker}), or remove it from {section}.trackers")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def record_machine(run_dir: Path) -> dict:
    """DIR/machine.json: what the run trains on (the report's Machine section)."""
    import torch

    from echolm.machine import describe
    from echolm.runtime import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {**describe(measure=True, device=device),
            # what `dtype = "auto"` picks here; each stage's own is in summary.json (dtype)
            "auto_dtype": str(resolve_dtype("auto", device)).removeprefix("torch."),
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
    """DIR/status.json, or {} when there is none or it is unreadable (it is rewritten)."""
    try:
        return read_json(run_dir / STATUS_FILE, "", default={})
    except EchoError:
        return {}


@contextmanager
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


# written by the pipeline or the lock around every stage, not by a stage's work
_BOOKKEEPING = frozenset({"timings.json", STATUS_FILE, "machine.json", LOCK_NAME})


def output_stamp(run_dir: Path) -> tuple[int, int]:
    """(newest modification time in ns, number of files) over the files a stage writes when
    it works: DIR/* and DIR/*/* (done.json, model files, eval/<stage>.json, metrics.jsonl, the
    rankings), the pipeline's own bookkeeping left out. Unchanged across a stage = it had
    nothing to do."""
    newest, count = 0, 0
    for path in (*run_dir.glob("*"), *run_dir.glob("*/*")):
        if path.name in _BOOKKEEPING:
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # removed while we looked (a stage's temporary file)
            continue
        if stat.S_ISREG(st.st_mode):
            newest, count = max(newest, st.st_mtime_ns), count + 1
    return newest, count


def _run_stages(cfg: Config, run_dir: Path, force: bool, log: Callable[[str], object],
                starting: Callable[[str], object]) -> None:
    """The stages in order (`starting(name)` before each), with their times in timings.json."""
    from echolm.runtime import give_back_freed_memory
    from echolm.staging import ForcePass

    redo = ForcePass(run_dir, cfg.to_dict(), force)  # --force run again resumes its pass
    record_machine(run_dir)
    timings_path = run_dir / "timings.json"
    timings = read_json(timings_path, TIMINGS_FIX, values=dict, default={})
    if cfg.run.source:
        starting("import")
        log("== import ==")
        t0 = time.time()
        import_source(cfg, run_dir, log)
        if "import" not in timings:
            timings["import"] = {"seconds": round(time.time() - t0, 1),
                                 "peak_rss_mb": round(_peak_rss_mb())}
            atomic_write_json(timings_path, timings)
    for name, fn in stages():
        if name not in cfg.run.stages:
            log(f"== {name} == left out (run.stages)")
            continue
        starting(name)
        log(f"== {name} ==")
        t0, before = time.time(), output_stamp(run_dir)
        fn(cfg, run_dir, force=redo.force(name), log=log)
        redo.done(name)
        give_back_freed_memory()  # the next stage starts from what it needs, not beside it
        seconds = time.time() - t0
        # a stage with nothing to do (finished; eval's results still current) keeps the time
        # its work took, however long its checks took (eval hashes every model: seconds)
        if output_stamp(run_dir) != before or name not in timings:
            timings[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(_peak_rss_mb())}
            atomic_write_json(timings_path, timings)
    redo.finish()
