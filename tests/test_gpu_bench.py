"""bench/gpu_mfu.py: without a GPU it says so and exits 0 with the benchmark's JSON line; its
measuring code runs end to end on a tiny preset (a CPU smoke run, no numbers checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_mfu.py"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the bench would run")
def test_gpu_mfu_on_cpu_says_it_needs_a_gpu_and_exits_0() -> None:
    proc = _bench()
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA GPU" in proc.stdout
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["bench"] == "gpu_mfu" and last["ours"] is None
    assert last["detail"] == {"skipped": "needs a CUDA GPU"}


def test_gpu_mfu_measuring_code_runs_on_a_tiny_preset() -> None:
    proc = _bench("--allow-cpu", "--presets", "micro", "--steps", "2", "--warmup", "1",
                  "--no-compile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) == {"bench", "ours", "peer", "ratio", "unit", "detail"}
    micro = last["detail"]["presets"]["micro"]
    assert micro["tok_s"] > 0 and 0 < micro["mfu"] < 1 and micro["timed_steps"] == 2
    assert micro["micro_batch"] == 8 and micro["seq_len"] == 64
    assert last["ratio"] == pytest.approx(last["ours"] / last["peer"], rel=1e-2)


def test_peak_table_matches_specific_names_first() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gpu_mfu import table_peak
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert table_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert table_peak("NVIDIA H100 PCIe") == 756.0
    assert table_peak("NVIDIA H200") == 989.0
    assert table_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert table_peak("NVIDIA L40S") == 362.0 and table_peak("NVIDIA L4") == 121.0
    assert table_peak("Some Future GPU") is None
