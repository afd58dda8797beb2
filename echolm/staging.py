"""A stage's output folder, and a `--force` that never loses the finished one.

Without `--force` a stage works in its own folder (DIR/sft): a killed run resumes from its
checkpoints there. Forced to redo it, the stage works in a staging folder beside it instead,
DIR/.sft.force/: its folders (sft/, and RLHF's rlhf_unguarded/), its metrics.jsonl and
tb/<stage>/. Until the new output is complete, the old one, its done.json, its summary.json
entry and its metrics.jsonl records stay as they were. Then the staging folder's commit.json
(written last, after the new done.json) says the redo is complete: what summary.json gets and
which folders the new output has; the folders are swapped in (each old one moved into
DIR/.sft.old/, removed only once every new one is in place), metrics.jsonl gets the new
records instead of the old ones, and summary.json the new entry.

A forced run killed before commit.json resumes its staging folder when the same command runs
again (it says so; delete the staging folder to start the redo afresh). Killed after it,
any later command of the stage (forced or not) completes the swap first. `echolm run --force`
killed and run again with `--force` does not redo the stages its pass already redid
(`ForcePass`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from echolm.atomic import atomic_write_json, atomic_write_text
from echolm.errors import EchoError
from echolm.runfiles import read_json
from echolm.summary import read_summary, update_summary

COMMIT = "commit.json"
METRICS = "metrics.jsonl"


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _barrier() -> None:
    if _world() > 1:
        from echolm.runtime import setup_distributed

        setup_distributed()  # idempotent: the stage sets it up next anyway
        dist.barrier()


class StageOutput:
    """Where a stage writes (`out`, `folder(...)`, `log_dir`) and how its result is published
    (`commit`). `name` is the stage's folder and its summary.json key; `also` names other
    folders of DIR the stage writes and a forced redo replaces (RLHF's rlhf_unguarded)."""

    def __init__(self, run_dir: Path, name: str, force: bool, label: str | None = None,
                 also: tuple[str, ...] = ()) -> None:
        self.run_dir, self.name, self.force = Path(run_dir), name, force
        self.label = label or name
        self.also = also
        self.final = self.run_dir / name
        self.staging = self.run_dir / f".{name}.force"
        self.trash = self.run_dir / f".{name}.old"

    @property
    def out(self) -> Path:
        """The folder the stage writes into (DIR/.sft.force/sft when forced)."""
        return self.folder(self.name)

    def folder(self, name: str) -> Path:
        return (self.staging if self.force else self.run_dir) / name

    @property
    def log_dir(self) -> Path:
        """Where the stage's Trainer keeps metrics.jsonl and tb/ (the run's own unless forced)."""
        return self.staging if self.force else self.run_dir

    def _tracked(self) -> list[str]:
        """What a forced redo replaces, relative to DIR: its folders and their tb/ logs."""
        names = [*self.also, self.name]  # the stage's own folder last: its done.json says done
        return [*(f"tb/{n}" for n in names), *names]

    # ---- before the stage ---------------------------------------------------------------
    def finished(self, log: Callable[[str], Any] = print) -> dict | None:
        """The stage's results if it already finished (its done.json) and `force` is off;
        else None. A complete forced redo that a kill left unswapped is swapped in first
        (and its results returned, forced or not: the redo is done)."""
        read_summary(self.run_dir)  # a corrupt summary.json stops the stage now, not at its end
        pending = (self.staging / COMMIT).exists()
        _barrier()  # under torchrun every process decides before process 0 moves anything
        if pending:
            if _main():
                self._swap()
                log(f"{self.label}: completed the swap of the finished --force redo into "
                    f"{self.final}")
            _barrier()
        done = self.final / "done.json"
        if done.exists() and (pending or not self.force):
            if not pending:
                note = (f"; an unfinished --force redo waits in {self.staging} (rerun with "
                        "--force to resume it)" if self.staging.exists() else "")
                log(f"{self.label}: already finished in {self.final} (use --force to redo)"
                    + note)
            return read_json(done, f"rerun `echolm {self.label} --force`")
        return None

    def start(self, log: Callable[[str], Any] = print) -> Path:
        """Make the output folder, once the stage's inputs have been read; returns `out`."""
        if self.force and (self.out / "ckpt").exists() and _main():
            log(f"{self.label}: resuming the --force redo in {self.staging} (delete that "
                "folder to start the redo afresh)")
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out

    # ---- after it -----------------------------------------------------------------------
    def commit(self, result: dict, summary: dict | None = None) -> None:
        """Publish the finished stage (one process: the main one): done.json with `result`,
        summary.json's entry (`summary`, default `result`); forced: swapped in complete."""
        entry = result if summary is None else summary
        if not self.force:
            update_summary(self.run_dir, self.name, entry)
            atomic_write_json(self.final / "done.json", result)
            return
        atomic_write_json(self.out / "done.json", result)
        have = [p for p in self._tracked() if (self.staging / p).exists()]
        atomic_write_json(self.staging / COMMIT, {"summary": entry, "have": have})
        self._swap()

    def _swap(self) -> None:
        """Swap a complete redo in (idempotent: a swap cut short by a kill is finished by
        doing it again)."""
        plan = read_json(self.staging / COMMIT, f"delete {self.staging} and rerun `echolm "
                         f"{self.label} --force`")
        for rel in self._tracked():
            new, cur = self.staging / rel, self.run_dir / rel
            old = self.trash / rel.replace("/", "_")
            if rel in plan["have"] and not new.exists():
                continue  # already in place
            if cur.exists():  # the old one (a new one only gets here from `new`)
                self.trash.mkdir(exist_ok=True)
                if old.exists():
                    shutil.rmtree(old)
                os.replace(cur, old)
            if rel in plan["have"]:
                cur.parent.mkdir(parents=True, exist_ok=True)
                os.replace(new, cur)
        self._merge_metrics()
        update_summary(self.run_dir, self.name, plan["summary"])
        shutil.rmtree(self.trash, ignore_errors=True)
        shutil.rmtree(self.staging)  # last: while it exists, the swap is redone

    def _merge_metrics(self) -> None:
        """DIR/metrics.jsonl with the redo's records instead of the old ones of its stages."""
        new = self.staging / METRICS
        if not new.exists():
            return
        path = self.run_dir / METRICS
        lines = [ln for ln in new.read_text().splitlines() if ln.strip()]
        tags = {self.name, *self.also} | {_stage_of(ln) for ln in lines}
        keep = [ln for ln in (path.read_text().splitlines() if path.exists() else [])
                if _stage_of(ln) not in tags]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep + lines))


def _stage_of(line: str) -> str | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line cut by a kill: kept as it was
    return rec.get("stage") if isinstance(rec, dict) else None


class ForcePass:
    """`echolm run --force`, resumable: the stages this forced pass has redone are listed in
    DIR/.force_pass.json (with the pass's settings) and not redone when the same command
    runs again after a kill or a failure; the file goes when the pass completes."""

    def __init__(self, run_dir: Path, settings: dict, force: bool) -> None:
        self.path, self.settings, self.active = Path(run_dir) / ".force_pass.json", settings, force
        self.redone: list[str] = []
        if force and self.path.exists():
            try:
                saved = read_json(self.path, "")
            except EchoError:  # unreadable: the pass starts over
                saved = {}
            if saved.get("settings") == settings:
                self.redone = list(saved.get("redone", []))

    def force(self, stage: str) -> bool:
        return self.active and stage not in self.redone

    def done(self, stage: str) -> None:
        if self.force(stage) and _main():
            self.redone.append(stage)
            atomic_write_json(self.path, {"settings": self.settings, "redone": self.redone})

    def finish(self) -> None:
        if self.active and _main():
            self.path.unlink(missing_ok=True)
