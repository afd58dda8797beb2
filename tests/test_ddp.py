"""Data parallelism: 2 processes (torchrun, gloo on CPU) x 1 micro-batch must train exactly like
1 process x 2 accumulated micro-batches: same rows, same averaged gradients, same losses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import losses, pretrain_args, subprocess_env, tmp_leftovers
from safetensors.torch import load_file

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
