"""Data parallelism: 2 processes (torchrun, gloo on CPU) x 1 micro-batch must train exactly like
1 process x 2 accumulated micro-batches: same rows, same averaged gradients, same losses."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import losses, pretrain_args, subprocess_env, tmp_leftovers
from safetensors.torch import load_file

from echolm.runlock import LOCK_NAME

STEPS = 10
COMMON = (f"pretrain.max_steps={STEPS}", "pretrain.ckpt_every=5", "pretrain.eval_every=0",
          "pretrain.micro_batch=4", "pretrain.seed=7")


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(),
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_two_processes_equal_one_with_grad_accum(run_dir: Path, corpus: Path,
                                                 tmp_path: Path) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    shutil.copytree(run_dir, single)
    run_dir.rename(ddp)

    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "echolm", *pretrain_args(ddp, corpus, *COMMON, "pretrain.grad_accum=1")])
    _run([sys.executable, "-m", "echolm",
          *pretrain_args(single, corpus, *COMMON, "pretrain.grad_accum=2")])

    a, b = losses(ddp), losses(single)
    assert [s for s, _ in a] == list(range(1, STEPS + 1))  # rank 0 alone writes metrics
    assert [s for s, _ in b] == list(range(1, STEPS + 1))
    for (step, la), (_, lb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, rel=1e-4), f"step {step}: ddp {la} vs single {lb}"
    # training actually moved (the comparison is not between two flat lines)
    assert a[-1][1] < a[0][1] - 0.3

    wa = load_file(str(ddp / "base" / "model.safetensors"))
    wb = load_file(str(single / "base" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4, msg=k)

    done = json.loads((ddp / "base" / "done.json").read_text())
    assert done["world_size"] == 2 and done["steps"] == STEPS
    assert done["tokens"] == json.loads((single / "base" / "done.json").read_text())["tokens"]
    assert tmp_leftovers(ddp) == []


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_the_agreed_step_and_resumes_exactly(
        run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches every process of the foreground group: torchrun's agent
    and both ranks. The ranks agree on the step to stop after (a rank that stopped alone
    would leave the other waiting in an all-reduce), rank 0 saves it, and the same command
    resumes from it to the weights of a run never interrupted."""
    steps = 40
    ref = tmp_path / "ref"
    shutil.copytree(run_dir, ref)
    over = (f"pretrain.max_steps={steps}", "pretrain.ckpt_every=1000", "pretrain.eval_every=0",
            "pretrain.micro_batch=4", "pretrain.seed=7", "pretrain.grad_accum=1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "echolm"]
    proc = subprocess.Popen([*torchrun, *pretrain_args(run_dir, corpus, *over)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(), start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_steps(run_dir)) < 3:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no steps within 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    saved = re.findall(r"echolm: interrupted base: saved a checkpoint at step (\d+)", out)
    assert len(set(saved)) == 1, out  # every rank names the same step
    step = int(saved[0])
    assert 3 <= step < steps, out
    ckpt = run_dir / "base" / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"step_{step:06d}"
    assert [s for s, _ in losses(run_dir)] == list(range(1, step + 1))
    assert not (run_dir / LOCK_NAME).exists() and tmp_leftovers(run_dir) == []

    out = _run([*torchrun, *pretrain_args(run_dir, corpus, *over)])
    assert f"pretrain: resuming from step {step}" in out
    _run([*torchrun, *pretrain_args(ref, corpus, *over)])
    assert losses(run_dir) == losses(ref)
    want = load_file(str(ref / "base" / "model.safetensors"))
    have = load_file(str(run_dir / "base" / "model.safetensors"))
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)


def _steps(run: Path) -> list[int]:
    try:
        return [s for s, _ in losses(run)]
    except (FileNotFoundError, json.JSONDecodeError):  # a line being written
        return []
