"""Schedules fitted to a stage's time budget (schedule.py, Trainer.plan/running/end_step):
the arithmetic by hand, a fitted schedule that a resumed run follows exactly, and a loop that
the clock stops, reported as cut short."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from echolm.config import BatchConfig
from echolm.model import Transformer
from echolm.runtime import Dist
from echolm.schedule import FIT_AFTER, MARGIN, Schedule, describe, fit_steps, fitted
from echolm.settings import load_config
from echolm.trainer import SCHEDULE_FILE, Trainer


def test_fit_steps_by_hand() -> None:
    # 600 s budget, 100 s gone over 10 steps, 60 s kept for the final evaluation:
    # (600 - 100 - 60) / 2 s = 220 more steps -> 230 in all, under the planned 300
    assert fit_steps(300, 10, 100.0, 2.0, 600.0, 60.0) == 230
    assert fit_steps(100, 10, 100.0, 2.0, 600.0, 60.0) == 100  # the plan fits: unchanged
    assert fit_steps(300, 10, 590.0, 2.0, 600.0, 60.0) == 10  # no time left: what was done
    assert fit_steps(300, 0, 0.0, 2.0, 1.0, 5.0) == 1  # at least one step


def test_fitted_schedule_keeps_a_margin_and_ends_with_its_warmdown() -> None:
    plan = Schedule(planned=300, steps=300, warmup=20, warmdown_frac=0.4, final_lr_frac=0.05,
                    budget_s=600.0, periodic_s=0.2, reserve_s=60.0)
    got = fitted(plan, done=3, elapsed_s=30.0, step_s=2.0)
    per_step = 2.0 * (1 + MARGIN) + 0.2  # 2.4 s
    assert got.steps == 3 + int((600 - 30 - 60) / per_step) == 215
    assert got.fitted and got.step_s == 2.0 and got.planned == 300
    assert got.warmup == 20 and got.warmdown == int(0.4 * 215)
    assert got.lr_multiplier(0) == pytest.approx(1 / 20)
    assert got.lr_multiplier(100) == 1.0
    assert got.lr_multiplier(214) == pytest.approx(0.05 + 0.95 * 1 / 86)  # the last step
    short = fitted(plan, done=3, elapsed_s=500.0, step_s=2.0)  # 16 more fit: warmup shrinks
    assert short.steps == 3 + int(40 / 2.4) == 19 and short.warmup == 19 // 4
    assert describe(got, 215, False) == ("planned 300 steps; this machine fits 215 in 10.0 "
                                         "min (2.00 s each): ran 215")
    assert "CUT SHORT" in describe(got, 120, True)
    assert describe(plan, 300, False) == "ran 300 steps as planned (fits the 10.0 min budget)"


def _trainer(tmp: Path, cfg: BatchConfig, budget_s: float) -> Trainer:
    torch.manual_seed(0)
    model = Transformer(load_config("micro").model)
    return Trainer(model, cfg, tmp / "out", "base", tmp, Dist(), budget_s=budget_s)


def _step(trainer: Trainer, pause: float = 0.0) -> None:
    rows = torch.randint(512, (2, 9), generator=torch.Generator().manual_seed(trainer.step))

    def loss_fn(m: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
        time.sleep(pause)  # a step of a known minimum length
        return m(b[:, :-1], targets=b[:, 1:])

    trainer.update([rows], loss_fn, 16)
    trainer.end_step({"loss": 0.0})


def test_the_fitted_schedule_is_refined_once_and_a_resumed_run_follows_it(
        tmp_path: Path) -> None:
    cfg = BatchConfig(max_steps=10_000, warmup_steps=2, warmdown_frac=0.5, ckpt_every=1000,
                      dtype="fp32", seq_len=8, micro_batch=2)
    a = _trainer(tmp_path, cfg, budget_s=6.0)
    a.resume()
    while a.running() and a.step < FIT_AFTER:
        _step(a, pause=0.05)
    sched = a.schedule
    assert sched.fitted and 40 < sched.steps < 10_000  # ~6 s / ~0.06 s per step
    saved = json.loads((tmp_path / "out" / SCHEDULE_FILE).read_text())
    assert Schedule.from_dict(saved) == sched
    a.save()
    b = _trainer(tmp_path, cfg, budget_s=6.0)  # a restart: measures nothing, same plan
    assert b.resume() and b.step == FIT_AFTER and b.schedule == sched
    while b.running() and b.step < sched.refit_step:  # then refined once, and kept
        _step(b, pause=0.05)
    assert b.schedule.final and not sched.final and b.schedule.warmup == sched.warmup
    assert abs(b.schedule.steps - sched.steps) < sched.steps * 0.2
    assert b.schedule.steps >= b.step / (1 - cfg.warmdown_frac)  # the warmdown is whole
    assert Schedule.from_dict(json.loads((tmp_path / "out" / SCHEDULE_FILE).read_text())
                              ) == b.schedule
    other = BatchConfig(**{**cfg.__dict__, "max_steps": 500})  # another plan: fitted anew
    c = _trainer(tmp_path / "c", other, budget_s=6.0)
    c.resume()
    assert not c.schedule.fitted and c.schedule.steps == 500


def test_a_loop_that_overruns_its_budget_is_cut_short(tmp_path: Path) -> None:
    cfg = BatchConfig(max_steps=10_000, warmup_steps=1, ckpt_every=1000, dtype="fp32",
                      seq_len=8, micro_batch=2)
    t = _trainer(tmp_path, cfg, budget_s=1.5)
    t.resume()
    while t.running():
        _step(t, pause=0.01 if t.step < FIT_AFTER else 0.3)  # the machine slows down 30x
    facts = t.finish()
    assert facts["cut_short"] and facts["steps"] < facts["scheduled_steps"]
    assert facts["schedule"].startswith("CUT SHORT by the 0.0 min budget")
    assert (tmp_path / "out" / "ckpt" / f"step_{t.step:06d}").is_dir()  # what ran is kept
    assert t.clock.seconds() < 1.5 + 0.3 + 1.0  # stopped within one slow step of the budget


def test_without_a_budget_the_plan_runs_unchanged(tmp_path: Path) -> None:
    cfg = BatchConfig(max_steps=5, warmup_steps=1, ckpt_every=1000, dtype="fp32", seq_len=8,
                      micro_batch=2)
    t = _trainer(tmp_path, cfg, budget_s=0.0)
    t.resume()
    while t.running():
        _step(t)
    facts = t.finish()
    assert (facts["steps"], facts["fitted"], facts["cut_short"]) == (5, False, False)
    assert facts["schedule"] == "ran 5 steps as planned"
    assert not (tmp_path / "out" / SCHEDULE_FILE).exists()


def test_the_refit_can_shrink_a_first_fit_that_was_too_optimistic():
    """The refit comes 80% of the way through the constant rate, so when the first fit (from
    6 steps) promised too many, it can still cut the count and keep the warmdown whole.
    By hand: 574 steps, warmdown 0.4 (229 steps) -> constant until 345, refit after step
    int(0.8 * 345) - 1 = 275. At 240 s of 480 with 8.47 s kept for after training, steps of
    0.86 s (+10%) and 0.0419 s of periodic evaluation each: 231.53 s left / 0.9879 s = 234
    more steps, 509 in all; the warmdown then starts at 509 - 203 = 306, after step 275."""
    from echolm.schedule import Schedule, fitted

    first = Schedule(planned=800, steps=574, warmup=20, warmdown_frac=0.4, final_lr_frac=0.05,
                     budget_s=480.0, fitted=True, step_s=0.78, periodic_s=0.0419,
                     reserve_s=8.47, fitted_at=10.0, final=False)
    assert first.refit_step == 275
    got = fitted(first, 275, 240.0, 0.86, final=True)
    assert got.final and got.steps == 509
    assert got.steps - got.warmdown > 275  # the warmdown is still ahead, whole
    assert got.lr_multiplier(275) == first.lr_multiplier(275) == 1.0


def test_a_schedule_too_short_to_refine_before_its_warmdown_is_fitted_once() -> None:
    """The smollm2-cpu rm stage on a 2-core Xeon: 68 steps planned, 4 min, 73 s kept for
    scoring after training, 6 steps in 45 s. By hand: (240 - 45 - 73) / (7.4 x 1.1) = 14.99
    more, 20 in all; warmdown int(0.5 x 20) = 10, from step 10. The refit would come at
    max(12, int(0.8 x 10) - 1) = 12, after the warmdown began, and could only keep 12 / 0.5 =
    24 steps (the run was cut 2 short of them): so the first fit is final."""
    from echolm.schedule import Schedule, fitted

    plan = Schedule(planned=68, steps=68, warmup=3, warmdown_frac=0.5, final_lr_frac=0.05,
                    budget_s=240.0, reserve_s=73.0)
    got = fitted(plan, 6, 45.0, 7.4)
    assert got.steps == 20 and got.warmdown == 10 and got.refit_step == 12
    assert got.final  # nothing left to refine: 20 steps, no 24
    # steps of 2 s: 122 / 2.2 = 55.45 more, 61 in all, warmdown 30 from step 31: refit at
    # max(12, int(0.8 x 31) - 1) = 23, before it
    longer = fitted(plan, 6, 45.0, 2.0)
    assert longer.steps == 61 and longer.refit_step == 23 and not longer.final


def test_a_run_resumed_before_its_first_fit_replays_the_planned_warmup() -> None:
    """The first fit, after 3 steps with 500 s of 600 gone, keeps 19 steps and shrinks the
    warmup to 19 // 4 = 4; steps 0-2 had run the plan's warmup of 20. A run resumed from a
    checkpoint at step 2 reads the fitted schedule and must replay step 2 as it ran: 3 / 20,
    not 3 / 4. The refit keeps the record of where the plan ended."""
    plan = Schedule(planned=300, steps=300, warmup=20, warmdown_frac=0.4, final_lr_frac=0.05,
                    budget_s=600.0, periodic_s=0.2, reserve_s=60.0)
    got = fitted(plan, done=3, elapsed_s=500.0, step_s=2.0)
    assert (got.steps, got.warmup, got.fit_step, got.plan_warmup) == (19, 4, 3, 20)
    assert [got.lr_multiplier(s) for s in range(3)] == [plan.lr_multiplier(s) for s in range(3)]
    assert got.lr_multiplier(2) == pytest.approx(3 / 20)
    assert got.lr_multiplier(3) == 1.0  # (3 + 1) / 4: the fitted warmup from the fit on
    again = fitted(got, done=12, elapsed_s=560.0, step_s=2.0, final=True)
    assert (again.fit_step, again.plan_warmup) == (3, 20)
    assert Schedule.from_dict(again.to_dict()) == again


def _fake_clock_trainer(tmp: Path, cfg: BatchConfig, budget_s: float, now: list[float]
                        ) -> Trainer:
    """A Trainer whose stage clock reads `now[0]` (seconds), so a test sets each step's time."""
    t = _trainer(tmp, cfg, budget_s)
    t.clock.seconds = lambda: now[0]  # type: ignore[method-assign]
    t.clock.restore = lambda s: now.__setitem__(0, s)  # type: ignore[method-assign]
    return t


@pytest.mark.parametrize(("budget_s", "kill_at", "steps"), [(35.0, None, 32), (35.0, 11, 33),
                                                          (29.5, 11, 27)])
def test_a_run_resumed_near_its_refit_keeps_a_whole_warmdown_within_budget(
        tmp_path: Path, budget_s: float, kill_at: int | None, steps: int) -> None:
    """Steps of 1 s, warmdown half the run. By hand, a 35 s budget: the first fit (6 steps in
    6 s, the last 5 timed) keeps 6 + floor(29 / 1.1) = 32 steps, warmdown 16 from step 16,
    refit at max(12, int(0.8 x 16) - 1) = 12. Uninterrupted, the refit at 12 keeps
    12 + floor(23 / 1.1) = 32. Killed after the checkpoint at step 11, the resumed process
    refines once it has timed two steps (at 14: 14 + floor(21 / 1.1) = 33, the warmdown from
    17, still ahead). With 29.5 s: 6 + floor(23.5 / 1.1) = 27 steps, warmdown 13 from 14,
    refit at 12; resumed at 11, the process reaches step 14 before it has timed two steps,
    and the warmdown has begun: the 27 steps are kept as they are. Before, a resumed process
    waited for 7 timed steps (step 18, past the warmdown's start), and a refit that kept the
    warmdown whole needed 18 / 0.5 = 36 steps: the run was cut short by the budget, its
    learning rate back up to 1 mid-warmdown."""
    cfg = BatchConfig(max_steps=10_000, warmup_steps=2, warmdown_frac=0.5, final_lr_frac=0.05,
                      ckpt_every=kill_at or 1000, dtype="fp32", seq_len=8, micro_batch=2)
    now = [0.0]
    t = _fake_clock_trainer(tmp_path, cfg, budget_s, now)
    t.resume()
    lrs = []
    while t.running():
        if t.step == kill_at:
            t = _fake_clock_trainer(tmp_path, cfg, budget_s, now)  # killed: a new process
            assert t.resume() and t.step == kill_at
            kill_at = None
            continue
        lrs.append(t.schedule.lr_multiplier(t.step))
        rows = torch.randint(512, (2, 9), generator=torch.Generator().manual_seed(t.step))
        t.update([rows], lambda m, b: m(b[:, :-1], targets=b[:, 1:]), 16)
        now[0] += 1.0  # the step took 1 s
        t.end_step({"loss": 0.0})
    facts = t.finish()
    assert (facts["steps"], facts["scheduled_steps"], facts["cut_short"]) == (steps, steps, False)
    assert t.schedule.final and now[0] <= budget_s
    after_warmup = lrs[cfg.warmup_steps:]  # constant, then only down
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:], strict=False))


def test_a_resumed_stage_clock_counts_what_the_new_process_did_before_resuming(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from echolm.schedule import StageClock

    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = StageClock(start=100.0)  # the stage started in this process at 100 s
    now[0] = 130.0  # 30 s of loading and a reference's pass, then the checkpoint is read
    clock.restore(50.0)  # the killed process had run 50 s
    assert clock.seconds() == 80.0
    now[0] = 140.0
    assert clock.seconds() == 90.0
