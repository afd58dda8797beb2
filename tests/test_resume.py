"""Exact resume after a real SIGKILL: a pretraining run killed at random moments (and once in
the middle of writing a checkpoint), then restarted with the same command, must end with the
same per-step losses and the same weights as a run that was never interrupted."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import losses, pretrain_args, subprocess_env, tmp_leftovers
from safetensors.torch import load_file

STEPS = 40
OVERRIDES = (f"pretrain.max_steps={STEPS}", "pretrain.ckpt_every=2", "pretrain.eval_every=20")


def _start(run: Path, corpus: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "echolm",
                             *pretrain_args(run, corpus, *OVERRIDES, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env())


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no cleanup handlers run
    proc.communicate(timeout=30)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60, poll: float = 2e-4) -> bool:
    """Poll `cond()` until true (-> True) or the process exits / time runs out (-> False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(poll)  # yield the CPU: the training process needs it
    return False


def _base_records(run: Path) -> list[str]:
    try:
        return [ln for ln in (run / "metrics.jsonl").read_text().splitlines()
                if '"stage": "base"' in ln and ln.endswith("}")]
    except FileNotFoundError:
        return []


def _saves_in_progress(ckpt: Path) -> set[str]:
    """Names of half-written checkpoint folders (`step_NNNNNN.tmp`)."""
    try:
        return {n for n in os.listdir(ckpt) if n.startswith("step_") and n.endswith(".tmp")}
    except FileNotFoundError:
        return set()


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    rng = random.Random(1234)

    # reference: the same command, never interrupted
    ref, run = tmp_path / "ref", run_dir
    shutil.copytree(run_dir, ref)
    _finish(_start(ref, corpus))
    ref_losses = losses(ref)
    assert [s for s, _ in ref_losses] == list(range(1, STEPS + 1))

    ckpt = run / "base" / "ckpt"

    # 0) kill before the first checkpoint (here: none until step 1000): the restart begins
    # from scratch and must replay, not duplicate, the metrics already written
    proc = _start(run, corpus, "pretrain.ckpt_every=1000")
    assert _wait_for(lambda: len(_base_records(run)) >= 3, proc), "no progress"
    _kill(proc)
    assert not ckpt.exists() and len(_base_records(run)) >= 3

    # 1) kill at a random moment once a checkpoint exists
    proc = _start(run, corpus)
    assert _wait_for(lambda: (ckpt / "latest").exists(), proc), "no checkpoint"
    time.sleep(rng.uniform(0.0, 0.4))
    _kill(proc)
    assert not (run / "base" / "done.json").exists(), "run finished before it was killed"

    # 2) restart and kill while a checkpoint is being written (a step_*.tmp folder exists);
    # a few tries, since the save window is only milliseconds long
    killed_mid_save = False
    for _ in range(6):
        stale = _saves_in_progress(ckpt)  # left by an earlier kill: the restart removes them
        proc = _start(run, corpus)
        if stale:
            assert _wait_for(lambda s=stale: not _saves_in_progress(ckpt) & s, proc)
        if not _wait_for(lambda: bool(_saves_in_progress(ckpt)), proc):
            _finish(proc)
            break
        _kill(proc)
        if _saves_in_progress(ckpt):
            killed_mid_save = True
            break
    assert killed_mid_save, "never managed to kill the run during a checkpoint save"
    assert not (run / "base" / "done.json").exists()
    last_complete = int((ckpt / "latest").read_text().strip().removeprefix("step_"))

    # 3) run to the end: resumes from the last complete checkpoint, ignoring the cut one
    out = _finish(_start(run, corpus))
    assert f"resuming from step {last_complete}" in out

    got = losses(run)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "metrics.jsonl has gaps/repeats"
    for (step, a), (_, b) in zip(got, ref_losses, strict=True):
        assert a == pytest.approx(b, abs=1e-6), f"step {step}: {a} != {b}"

    want = load_file(str(ref / "base" / "model.safetensors"))
    have = load_file(str(run / "base" / "model.safetensors"))
    assert want.keys() == have.keys()
    for k in want:
        assert torch.equal(want[k], have[k]), k

    assert tmp_leftovers(run) == []
    assert len(list(ckpt.glob("step_*"))) <= 2
    assert (run / "base" / "done.json").exists()


def test_a_fresh_start_drops_an_earlier_attempts_records(tmp_path):
    """A stage killed before its first checkpoint starts again from step 0: its earlier
    records go, step 0's too (SFT and the reward model log step 0 again: the plots had it
    twice); other stages' records stay."""
    import json

    from echolm.config import BatchConfig
    from echolm.model import Transformer
    from echolm.runtime import Dist
    from echolm.settings import load_config
    from echolm.trainer import Trainer

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"stage": "base", "step": 40, "loss": 2.0}, {"stage": "sft", "step": 0, "val": 1.0},
        {"stage": "sft", "step": 3, "loss": 1.5}, {"stage": "sft", "note": "no step"}]))
    model = Transformer(load_config("micro").model)
    t = Trainer(model, BatchConfig(dtype="fp32", seq_len=8, micro_batch=2), tmp_path / "out",
                "sft", tmp_path, Dist())
    assert not t.resume()
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert kept == [{"stage": "base", "step": 40, "loss": 2.0}]
