"""The training toolbox every stage's loop uses: the model placed on its processes (one,
DDP or FSDP2), its optimizers, one `update` (accumulation, clipping, the scheduled learning
rate), the step counter and schedule fitted to the time budget (echolm/schedule.py), exact
checkpoints, metrics and a progress bar. The loop itself is the stage's own, in plain sight:

    trainer = Trainer(model, tcfg, out, "sft", run_dir, d)
    trainer.resume()
    while trainer.running():
        loss = trainer.update(batches(trainer.step), loss_fn, n_tokens)
        record = {"loss": loss, **(evaluate() if due else {})}
        trainer.end_step(record)          # step + 1, metrics, progress, fit, checkpoint
    result = trainer.finish()             # the schedule that ran, throughput, cut short?
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from echolm import interrupt
from echolm.checkpoint import (
    atomic_write_json,
    latest_checkpoint,
    load_training_state,
    read_weights,
    save_training_state,
    tied_head,
)
from echolm.config import LoopConfig
from echolm.engine import FastDecoder
from echolm.errors import EchoError
from echolm.machine import matmul_peak_tflops
from echolm.metrics import MetricsLog
from echolm.model import Transformer
from echolm.optim import build_optimizers
from echolm.runfiles import read_cache
from echolm.runtime import Dist, autocast, keep_freed_memory, resolve_dtype
from echolm.schedule import FIT_AFTER, Schedule, StageClock, describe, fitted

SCHEDULE_FILE = "schedule.json"


LossFn = Callable[[nn.Module, Any], Tensor]


class Trainer:
    """Owns the model's optimisation; the stage's loop calls `update`, `end_step`, `finish`.

    Under torchrun the model is replicated (DDP) or, with `parallel = "fsdp"` in a stage that
    allows it (`shardable`), sharded in place (FSDP2, train/fsdp.py): `model` is then a
    sharded module that every process must call together; `unsharded()` gives whole weights.

    `step` counts the stage's steps (what one step is, the stage says: an optimizer update in
    pretraining, a batch of rollouts in RL). The stage's clock (`clock`) starts at `started`
    (default: now) and counts everything, so `max_minutes` bounds the whole stage; pass
    `budget_s` to give this Trainer a part of it. Before the loop the stage says what the
    schedule must leave room for (`plan`): the work after training and periodic evaluation.
    """

    def __init__(self, model: nn.Module, cfg: LoopConfig, out: Path, stage: str,
                 run_dir: Path, d: Dist, shardable: bool = False, budget_s: float | None = None,
                 started: float | None = None, unit: str = "step") -> None:
        self.cfg, self.out, self.stage, self.d, self.unit = cfg, out, stage, d, unit
        keep_freed_memory()  # every step remakes the last one's activations: no page faults
        self.model = model.to(d.device)
        self.dtype = resolve_dtype(cfg.dtype, d.device)
        self.sharded = d.world > 1 and cfg.parallel == "fsdp"
        if self.sharded:
            if not shardable:
                raise EchoError(f"{stage}: parallel='fsdp' is implemented for pretraining; "
                                "use parallel='ddp' (the default) for this stage")
            from echolm.train.fsdp import shard_model

            shard_model(self.model, d.device, d.world, compile_blocks=cfg.compile)
        self.optimizers = build_optimizers(self.model, cfg)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
        self.ddp = None
        if d.world > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[d.local_rank] if d.device.type == "cuda"
                           else None)
        self.forward_model: nn.Module = self.ddp or self.model
        if cfg.compile and not self.sharded:  # sharded: compiled block by block
            self.forward_model = torch.compile(self.forward_model)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", stage, enabled=d.main,
                                  trackers=cfg.trackers, config=asdict(cfg))
        budget = 60 * cfg.max_minutes if budget_s is None else budget_s
        self.schedule = Schedule(cfg.max_steps, cfg.max_steps, cfg.warmup_steps,
                                 cfg.warmdown_frac, cfg.final_lr_frac, max(0.0, budget))
        self.clock = StageClock(start=started)
        self.step, self.tokens, self.train_seconds = 0, 0, 0.0
        self.extra: dict[str, Any] = {}  # stage-specific state saved with checkpoints
        self.cut_short = False
        self.last: dict[str, float] = {}
        # (step, clock, evaluation seconds so far) at each end_step in this process
        self._marks: list[tuple[int, float, float]] = []
        self.eval_times: list[float] = []  # seconds of each periodic evaluation (`evaluating`)
        self._every = 0  # steps between periodic evaluations (`plan`)
        self._saved_at = -1
        self._step_stats = {"tokens": 0, "seconds": 0.0}
        self._bar: tqdm | None = None

    # ---- checkpoints -------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the newest checkpoint in `out` if there is one; True if resumed."""
        self._load_schedule()
        path = latest_checkpoint(self.out)
        if path is None:  # a fresh start: an earlier attempt's records (step 0's too) go
            self.metrics.truncate_after(-1)
            return False
        state = load_training_state(path)
        if (path / "dcp").is_dir():  # written with parallel="fsdp": any world size loads it
            self._load_sharded(path)
        else:
            self._load_whole(path, state)
        self.step, self.tokens = state["step"], state["tokens"]
        self.train_seconds = state.get("train_seconds", state.get("elapsed", 0.0))
        self.clock.restore(state.get("stage_seconds", state.get("elapsed", 0.0)))
        self.extra = state.get("extra", {})
        self._saved_at = self.step
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():  # LoRA dropout
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        np.random.set_state(state["rng_numpy"])
        random.setstate(state["rng_python"])
        self.metrics.truncate_after(self.step)
        return True

    def _load_schedule(self) -> None:
        """The schedule an earlier run of this stage fixed (same plan and budget), if any: a
        resumed run follows it exactly instead of measuring again."""
        path = self.out / SCHEDULE_FILE
        try:
            saved = Schedule.from_dict(read_cache(path) or {})
        except (ValueError, TypeError):
            return  # none yet (or unreadable, said by read_cache: it is measured again)
        same = (saved.planned, saved.budget_s) == (self.schedule.planned, self.schedule.budget_s)
        if same and saved.fitted:
            self.schedule = saved

    def _load_sharded(self, path: Path) -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        from echolm.train.fsdp import load_checkpoint

        try:
            load_checkpoint(path, self.model, self.optimizers)
        except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
            failures = getattr(e, "failures", None)  # DCP: {rank: (exception, traceback)}
            cause = next(iter(failures.values()))[0] if failures else e
            msg = " ".join(str(cause).split())[:300]
            raise EchoError(f"{path}: checkpoint does not match the current config ({msg})"
                            ) from None

    def _load_whole(self, path: Path, state: dict) -> None:
        if self.sharded:
            raise EchoError(f"{path}: written without parallel='fsdp' (no dcp/ folder); "
                            "resume it with parallel='ddp' or in one process")
        weights = read_weights(path / "model.safetensors")
        try:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            missing = [k for k in missing
                       if not (tied_head(k) and self.model.cfg.tie_embeddings)]
            if missing or unexpected:
                raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(sd)
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. a --set changed the model
            msg = " ".join(str(e).split())[:300]
            raise EchoError(f"{path}: checkpoint does not match the current config ({msg})"
                            ) from None

    def save(self) -> None:
        """A checkpoint of everything needed to resume exactly. With parallel="fsdp" (any
        world size) model and optimizer states go through torch.distributed.checkpoint."""
        state = {
            "step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
            "stage_seconds": self.clock.seconds(), "schedule": self.schedule.to_dict(),
            "rng_torch": torch.get_rng_state(), "rng_numpy": np.random.get_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rng_python": random.getstate(), "extra": self.extra,
            "train_config": asdict(self.cfg),
        }
        if self.cfg.parallel == "fsdp":
            from echolm.train.fsdp import save_checkpoint

            save_checkpoint(self.out, self.step, self.model, self.optimizers, state,
                            self.d.main, self.d.world)
            self._saved_at = self.step
            return
        if self.d.main:
            state["optimizers"] = [o.state_dict() for o in self.optimizers]
            save_training_state(self.out, self.step, self.model, state)
        if self.d.world > 1:
            dist.barrier()
        self._saved_at = self.step

    def unsharded(self) -> Transformer | None:
        """The model with whole weights, for one process to sample from or save: the model
        itself, or (FSDP) a gathered copy on rank 0 and None elsewhere. Collective then."""
        if not self.sharded:
            return self.model
        from echolm.train.fsdp import unsharded_copy

        return unsharded_copy(self.model, self.d.device, self.d.main)

    # ---- the loop's calls -------------------------------------------------------------
    def plan(self, reserve_s: float | None = None, periodic_s: float | None = None,
             every: int | None = None) -> None:
        """What the schedule must leave time for, in seconds: `reserve_s` after training
        (final evaluation, saving), and periodic evaluation: `periodic_s` per step on
        average, or (`every` steps) the time of the evaluations the loop runs inside
        `evaluating()`. Used when the schedule is fitted, and by the clock that stops an
        overrunning loop."""
        if every is not None:
            self._every = every
        if self.schedule.final:
            return  # fixed already (a resumed run): it keeps what it was fitted with
        if reserve_s is not None:
            self.schedule.reserve_s = max(0.0, reserve_s)
        if periodic_s is not None:
            self.schedule.periodic_s = max(0.0, periodic_s)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around a periodic evaluation in the loop: its time is not a step's; the schedule
        counts it apart (once per `every` steps, see `plan`)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.eval_times.append(time.perf_counter() - t0)

    def running(self) -> bool:
        """True while the schedule has steps left and the budget is not spent (less what is
        reserved for after training): a step started just before the budget runs out may end
        after it, by a step's time (the fitted schedule ends well before it; this catches a
        machine that slowed down). A loop the clock stops is `cut_short`. A loop
        a signal (Ctrl-C, SIGTERM) asked to stop saves a checkpoint at the last finished
        step and raises `Interrupted` (echolm/interrupt.py): the step in progress when the
        signal came has finished, so the checkpoint is the one `end_step` would have saved."""
        sched = self.schedule
        done = self.step >= sched.steps
        over = (not done and sched.budget_s > 0
                and self.clock.seconds() + sched.reserve_s >= sched.budget_s)
        over, stop = self._agreed(over, interrupt.requested())
        if stop:
            self._stop()
        if done:
            interrupt.defer(False)
            return False
        self.cut_short = over
        interrupt.defer(not over)
        return not over

    def _agreed(self, *flags: bool) -> Any:
        """`flags`, each true if it is true in any process (every process must stop at the
        same step); one flag alone, or a tuple."""
        if self.d.world > 1:
            t = torch.tensor([float(f) for f in flags], device=self.d.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = tuple(bool(v) for v in t.tolist())
        return flags[0] if len(flags) == 1 else tuple(flags)

    def _stop(self) -> None:
        interrupt.defer(False)  # a second Ctrl-C while saving stops at once (saves are atomic)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._saved_at != self.step:
            self.save()
        self.metrics.close()
        raise interrupt.Interrupted(f"{self.stage}: saved a checkpoint at step {self.step}")

    def update(self, micro_batches: list[Any], loss_fn: LossFn, n_tokens: int) -> float:
        """One optimizer update at the scheduled learning rate of the current step: forward/
        backward every micro-batch, average gradients (across processes too), clip, step.
        Returns the mean loss over all micro-batches and processes. A step may make several
        updates (RL's epochs x minibatches); `end_step` ends it."""
        t0 = time.perf_counter()
        FastDecoder.forget(self.model)  # its copies go stale now: free them before the forward
        mult = self.schedule.lr_multiplier(self.step)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
        total = torch.zeros((), device=self.d.device)
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            sync = self.ddp is None or i == n - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with autocast(self.d.device, self.dtype):
                    loss = loss_fn(self.forward_model, batch)
                (loss / n).backward()
            total += loss.detach().float()
        if self.d.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        grad_norm = 0.0
        if self.cfg.grad_clip > 0:  # over the whole model also when sharded (a DTensor then)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            grad_norm = float(norm.full_tensor() if self.sharded else norm)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = n_tokens * self.d.world
        self.tokens += tokens
        self.train_seconds += dt
        self._step_stats["tokens"] += tokens
        self._step_stats["seconds"] += dt
        self.last = {"lr_mult": mult, "grad_norm": grad_norm, "dt": dt,
                     "tok_per_s": tokens / dt}
        return total.item() / (n * self.d.world)

    def end_step(self, record: dict[str, Any] | None = None,
                 show: tuple[str, ...] = ("loss",)) -> dict[str, Any]:
        """End the current step: count it, write its metrics line (`record` plus learning
        rate, gradient norm, tokens/s), move the progress bar (showing the `show` fields),
        fix the schedule once enough steps are timed, checkpoint every `ckpt_every` steps
        and at the end of the schedule. Returns the metrics line."""
        self.step += 1
        now = self.clock.seconds()
        self._marks.append((self.step, now, sum(self.eval_times)))
        rec: dict[str, Any] = {"step": self.step, **(record or {})}
        if self.last:
            st = self._step_stats
            rec.update(lr_mult=round(self.last["lr_mult"], 5),
                       grad_norm=round(self.last["grad_norm"], 4),
                       tok_per_s=round(st["tokens"] / max(st["seconds"], 1e-9)))
        rec["tokens"] = self.tokens
        rec = {k: round(v, 6) if isinstance(v, float) else v for k, v in rec.items()}
        self._step_stats = {"tokens": 0, "seconds": 0.0}
        self.metrics.write(**rec)
        if not self.schedule.final and self.schedule.budget_s > 0:
            self._fit()
        bar = self._progress()
        bar.update(self.step - bar.n)
        shown = {k: (f"{rec[k]:.3f}" if isinstance(rec[k], float) else rec[k])
                 for k in show if k in rec}
        if "tok_per_s" in rec:
            shown["tok_s"] = f"{rec['tok_per_s']:,}"
        bar.set_postfix(**shown)
        if self.step % self.cfg.ckpt_every == 0 or self.step == self.schedule.steps:
            self.save()
        return rec

    def _fit(self) -> None:
        """Fit the schedule to the measured time per step: first after FIT_AFTER steps timed
        here (the first not counted: it pays for warm-up), then once more, refined, at its
        `refit_step` (80% of the constant learning rate). Periodic evaluations are timed
        apart. Rank 0 decides for every process.

        A resumed process has timed few steps when it reaches the refit: it refines from
        those after its first, and if its warmdown has already begun (resumed
        just before it), it keeps the schedule as it is: a refit then could only lengthen the
        run to keep the warmdown whole, past the budget, and would restart the warmdown."""
        sched = self.schedule
        if not sched.fitted and len(self._marks) >= FIT_AFTER:
            first = self._marks[0]
        elif sched.fitted and self.step >= sched.refit_step:
            if self.step >= sched.steps - sched.warmdown:
                self._adopt(replace(sched, final=True))
                return
            if len(self._marks) > FIT_AFTER:
                first = self._marks[FIT_AFTER - 1]  # settled steps only
            elif len(self._marks) >= 3:  # the steps after this process's first: two at least
                first = self._marks[0]
            else:
                return
        else:
            return
        (s0, t0, e0), (s1, t1, e1) = first, self._marks[-1]
        step_s = (t1 - t0 - (e1 - e0)) / (s1 - s0)
        if self._every and self.eval_times:
            sched.periodic_s = sum(self.eval_times) / len(self.eval_times) / self._every
        self._adopt(fitted(sched, self.step, t1, step_s, final=sched.fitted))

    def _adopt(self, sched: Schedule) -> None:
        """Follow `sched` from now on (rank 0's, in every process): saved, logged, shown."""
        if self.d.world > 1:
            box = [sched]
            dist.broadcast_object_list(box, src=0)
            sched = box[0]
        self.schedule = sched
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / SCHEDULE_FILE, sched.to_dict())
            self.metrics.write(step=self.step, schedule=describe(sched, self.step, False,
                                                                 plural(self.unit)))
        if self._bar is not None:
            self._bar.total = sched.steps
            self._bar.set_description(self._bar_label())
            self._bar.refresh()

    def _bar_label(self) -> str:
        s = self.schedule
        if s.fitted and s.steps < s.planned:
            return f"{self.stage} ({s.steps} of {s.planned} planned fit {s.budget_s / 60:g} min)"
        return self.stage

    def _progress(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(total=self.schedule.steps, initial=self.step,
                             desc=self._bar_label(), disable=not self.d.main,
                             dynamic_ncols=True, unit=self.unit)
        return self._bar

    def finish(self, seq_len: int | None = None) -> dict[str, Any]:
        """After the loop: close the progress bar, checkpoint what was trained if the clock
        stopped it between checkpoints, and return the run's facts for the stage's result:
        the schedule that ran (planned, fitted, cut short, in words too), time, throughput
        and (with the `seq_len` trained at) MFU against this machine's matmul peak in the
        training dtype."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        interrupt.defer(False)
        if self._saved_at != self.step:
            self.save()
        if self._agreed(interrupt.requested()):  # came in the last step (or a guard's stop)
            self._stop()
        self.metrics.close()
        s = self.schedule
        facts: dict[str, Any] = {
            "steps": self.step, "planned_steps": s.planned, "scheduled_steps": s.steps,
            "fitted": s.fitted, "cut_short": self.cut_short,
            "budget_minutes": round(s.budget_s / 60, 2),
            "schedule": describe(s, self.step, self.cut_short, plural(self.unit)),
            "step_seconds": s.step_s, "minutes": round(self.clock.seconds() / 60, 2),
            "train_minutes": round(self.train_seconds / 60, 2), "tokens": self.tokens,
            "tok_per_s": round(self.tokens / max(self.train_seconds, 1e-9)),
            "dtype": str(self.dtype).removeprefix("torch."), "world_size": self.d.world,
            "threads": torch.get_num_threads()}
        model = self.model.policy if hasattr(self.model, "policy") else self.model
        if seq_len and hasattr(model, "flops_per_token") and self.train_seconds > 0:
            peak = peak_tflops(self.dtype, self.d.device)
            achieved = facts["tok_per_s"] * model.flops_per_token(seq_len) / 1e12
            facts["mfu"] = round(achieved / (peak * self.d.world), 4)
            facts["peak_tflops"] = round(peak, 4)
        return facts


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


_PEAKS: dict[tuple, float] = {}


def peak_tflops(dtype: torch.dtype, device: torch.device) -> float:
    """This process's matmul peak in `dtype` (measured once per process, ~1 s)."""
    key = (dtype, device.type, torch.get_num_threads())
    if key not in _PEAKS:
        _PEAKS[key] = matmul_peak_tflops(dtype, device)
    return _PEAKS[key]
