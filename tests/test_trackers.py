"""Experiment trackers: TensorBoard events carry exactly the numbers of metrics.jsonl (also
after a resume replays steps); W&B is optional and says so clearly when it is missing."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from conftest import data_overrides

from echolm.errors import EchoError
from echolm.metrics import MetricsLog, read_metrics
from echolm.settings import load_config
from echolm.train.pretrain import run_pretrain


def _quiet(*_a: object) -> None:
    pass


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_equal_metrics_jsonl(run_dir: Path, corpus: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = load_config("micro", [*data_overrides(corpus), "pretrain.max_steps=6",
                                "pretrain.ckpt_every=3", "pretrain.eval_every=3",
                                "pretrain.trackers=tensorboard"])
    run_pretrain(cfg, run_dir, log=_quiet)
    # killed right after the step-3 checkpoint: the resumed run replays steps 4-6
    ckpt = run_dir / "base" / "ckpt"
    shutil.rmtree(ckpt / "step_000006")
    (ckpt / "latest").write_text("step_000003")
    (run_dir / "base" / "done.json").unlink()
    run_pretrain(cfg, run_dir, log=_quiet)

    records = read_metrics(run_dir / "metrics.jsonl", "base")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    events = _scalars(run_dir / "tb" / "base")
    assert {"loss", "lr_mult", "grad_norm", "tok_per_s", "tokens", "epoch",
            "val_bpb"} <= set(events)
    for tag, points in events.items():
        expected = [(r["step"], r[tag]) for r in records if tag in r]
        assert [s for s, _ in points] == [s for s, _ in expected], tag  # each step once
        for (step, got), (_, want) in zip(points, expected, strict=True):
            assert got == pytest.approx(want, rel=1e-6), f"{tag} at step {step}"


def test_trackers_setting(tmp_path: Path) -> None:
    assert load_config("micro").pretrain.trackers == []  # off by default
    assert load_config("micro", ["sft.trackers=tensorboard"]).sft.trackers == ["tensorboard"]
    both = load_config("micro", ['pretrain.trackers=["tensorboard", "wandb"]'])
    assert both.pretrain.trackers == ["tensorboard", "wandb"]
    with pytest.raises(EchoError, match="unknown tracker 'mlflow'"):
        load_config("micro", ["pretrain.trackers=mlflow"])
    # not the main process: no tracker is opened at all
    assert MetricsLog(tmp_path / "metrics.jsonl", "base", enabled=False,
                      trackers=["wandb"]).trackers == []


def test_wandb_missing_is_a_clear_error_or_offline_run(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(EchoError, match=r"'wandb' needs the wandb package \(pip install"):
            MetricsLog(tmp_path / "metrics.jsonl", "base", trackers=["wandb"])
        return
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    log = MetricsLog(tmp_path / "metrics.jsonl", "base", trackers=["wandb"])
    log.write(step=1, loss=2.5, samples=["text is not a scalar"])
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
