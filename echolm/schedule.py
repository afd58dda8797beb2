"""How many steps a stage runs, and its learning-rate shape: fitted to the time budget.

A stage with a budget (`max_minutes` > 0) covers everything in it with that budget:
evaluation before and after, periodic evaluation, sampling, saving. It times its first
`FIT_AFTER` steps and fits its schedule so that the whole schedule (warmdown included) and
the work after training fit (`fit_steps`), with a 10% margin; 80% of the way through the
constant learning rate (halfway without a warmdown), with many steps timed, it refines the
count once more with a 10% margin and then keeps it: the learning rate is still constant until then,
so the warmdown, fixed once, is always whole. A faster machine runs the planned
`max_steps`; a slower one fewer, and says so ("planned 300 steps; this machine fits 140 in
8.0 min: ran 140"). The schedule is saved with the run (`schedule.json` and every
checkpoint), so a resumed run follows the schedule the interrupted one fixed. If the
machine slows down and the stage hits its budget anyway, it stops and is marked as cut
short.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

from echolm.config import BatchConfig

FIT_AFTER = 6  # steps timed before the schedule is fitted (the first is a warm-up, not counted)
MARGIN = 0.1  # the first fit assumes steps 10% slower than measured (load, evals vary)
# the refined fit assumes the rest 10% slower too: on a 2-core Xeon the steps after it ran 7.8%
# slower than the 66 before it (the rm stage of the cpu preset), and 5% cut it 4 steps short
FINAL_MARGIN = 0.1
# The refit comes at this share of the constant-rate phase, not at its end: a count that must
# shrink can then do so by up to 20% while the warmdown still starts after the refit. Refitting
# at the very last constant step could not shrink the count at all (the warmdown would have
# begun in the past), so a first fit that was 1-3% optimistic ran into the budget: three
# stages of one demo were cut 7-9 steps short of ~500.
REFIT_AT = 0.8


@dataclass
class Schedule:
    """The steps a stage runs and the learning-rate multiplier at each: linear warmup over
    `warmup` steps, constant, then a linear warmdown to `final_lr_frac` over the last
    `warmdown_frac` of `steps`."""

    planned: int  # the configured max_steps
    steps: int  # the steps this run makes: `planned`, or fewer when fitted to the budget
    warmup: int
    warmdown_frac: float
    final_lr_frac: float
    budget_s: float = 0.0  # 0 = no budget
    fitted: bool = False  # fixed from measured step times (False: the plan, unchanged)
    step_s: float | None = None  # measured seconds per step (whole iteration)
    periodic_s: float = 0.0  # periodic evaluation, seconds per step on average
    reserve_s: float = 0.0  # seconds kept for what follows training (final eval, save)
    fitted_at: float | None = None  # stage seconds when the schedule was fitted
    final: bool = False  # fitted for good (refined, or too short to refine)
    # the steps taken when it was first fitted, and the planned warmup: the steps before ran
    # the plan, and a run resumed from a checkpoint among them replays them as they ran
    fit_step: int | None = None
    plan_warmup: int | None = None

    @property
    def refit_step(self) -> int:
        """The step after which a first fit is refined: `REFIT_AT` of the way through the
        constant learning rate (the warmdown starts later), or halfway without a warmdown."""
        start = self.steps - self.warmdown if self.warmdown else self.steps // 2
        return max(2 * FIT_AFTER, int(REFIT_AT * start) - 1 if self.warmdown else start - 1)

    @property
    def warmdown(self) -> int:
        return int(self.warmdown_frac * self.steps)

    def lr_multiplier(self, step: int) -> float:
        if self.fit_step is not None and step < self.fit_step:  # it ran the plan then
            plan = replace(self, steps=self.planned, warmup=self.plan_warmup, fit_step=None)
            return plan.lr_multiplier(step)
        if step < self.warmup:
            return (step + 1) / self.warmup
        left = self.steps - step
        if self.warmdown > 0 and left <= self.warmdown:
            return self.final_lr_frac + (1 - self.final_lr_frac) * left / self.warmdown
        return 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def fit_steps(planned: int, done: int, elapsed_s: float, step_s: float, budget_s: float,
              reserve_s: float = 0.0) -> int:
    """The total number of steps that fit: `done` already taken after `elapsed_s` seconds of
    the stage, `step_s` seconds for each further one, `reserve_s` kept for what follows
    training, within `budget_s`. Never more than `planned`, never fewer than `done`, at
    least one step."""
    left = budget_s - elapsed_s - reserve_s
    more = math.floor(left / step_s) if step_s > 0 else planned
    return max(1, done, min(planned, done + max(0, more)))


def fitted(schedule: Schedule, done: int, elapsed_s: float, step_s: float,
           final: bool = False) -> Schedule:
    """`schedule` fitted for the measured `step_s` (see `fit_steps`). The first fit keeps a
    10% margin and shortens the warmup when the run is too short for it (at most a quarter of
    the steps); the refined one (`final`) a 10% margin too, the warmup as it was, and never ends
    so early that the warmdown would already have begun."""
    per_step = step_s * (1 + (FINAL_MARGIN if final else MARGIN)) + schedule.periodic_s
    steps = fit_steps(schedule.planned, done, elapsed_s, per_step, schedule.budget_s,
                      schedule.reserve_s)
    if final:
        warmup = schedule.warmup
        steps = max(steps, min(schedule.planned,
                               math.ceil(done / max(1e-9, 1 - schedule.warmdown_frac))))
    else:
        warmup = min(schedule.warmup, max(1, steps // 4)) if steps < schedule.planned else (
            schedule.warmup)
    out = Schedule(schedule.planned, steps, warmup, schedule.warmdown_frac,
                   schedule.final_lr_frac, schedule.budget_s, True, round(step_s, 4),
                   round(schedule.periodic_s, 4), round(schedule.reserve_s, 2),
                   round(elapsed_s, 2), final,
                   schedule.fit_step if schedule.fitted else done,
                   schedule.plan_warmup if schedule.fitted else schedule.warmup)
    # Too short to refine: this is the fit. A refit must come before the warmdown begins (the
    # refined count may not end before it), and it comes no earlier than 2 x FIT_AFTER steps:
    # for a short schedule that is past the warmdown's start (19 steps, warmdown 0.5: refit at
    # 12, the warmdown from 10), where it could only hold 12 / 0.5 = 24 steps, over the budget.
    if not final and out.refit_step >= steps - out.warmdown:
        out.final = True
    return out


def describe(schedule: Schedule, ran: int, cut_short: bool, unit: str = "steps") -> str:
    """One line a person reads: what was planned, what this machine fits, what ran."""
    budget = f"{schedule.budget_s / 60:.1f} min"
    if cut_short:
        return (f"CUT SHORT by the {budget} budget: ran {ran} of the {schedule.steps} {unit} "
                f"it had planned to (of {schedule.planned} configured)")
    if not schedule.fitted or schedule.steps >= schedule.planned:
        fits = f" (fits the {budget} budget)" if schedule.budget_s else ""
        return f"ran {ran} {unit} as planned{fits}"
    return (f"planned {schedule.planned} {unit}; this machine fits {schedule.steps} in "
            f"{budget} ({schedule.step_s:.2f} s each): ran {ran}")


class StageClock:
    """Seconds a stage has run: what earlier runs of it recorded (a resumed run) plus the time
    since `start` (a `time.perf_counter()` reading; default now)."""

    def __init__(self, before: float = 0.0, start: float | None = None) -> None:
        self.before = before
        self.start = time.perf_counter() if start is None else start

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def restore(self, seconds: float) -> None:
        """Continue from `seconds` (a checkpoint's stage time) plus this process's time so
        far: what it did before resuming (loading, a reference's pass over held-out data) is
        done again on every resume, and the budget covers it."""
        self.before = seconds


def capped_steps(tcfg: BatchConfig, epochs: float, n_examples: int) -> BatchConfig:
    """`tcfg` with max_steps capped at `epochs` passes over n_examples (0 = no cap)."""
    if epochs <= 0 or n_examples <= 0:
        return tcfg
    per_step = tcfg.micro_batch * tcfg.grad_accum
    return replace(tcfg, max_steps=min(tcfg.max_steps,
                                       max(1, math.ceil(epochs * n_examples / per_step))))
