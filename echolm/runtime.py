"""What every training stage sets up before its loop: the processes and device (one, or
`torchrun` processes), the training dtype, and the checks and folder handling they share."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from echolm.errors import EchoError
from echolm.machine import fast_dtype
from echolm.runfiles import read_json
from echolm.summary import read_summary


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """One process, or `torchrun` processes (gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, local, device)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on GPUs that support it and on CPUs with native bf16 matmul
    (AVX512-BF16 / AMX: 2-6x the fp32 rate); fp32 elsewhere (an AVX2 CPU emulates bf16
    ~40x slower than fp32)."""
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if choice != "auto":
        raise EchoError(f"dtype '{choice}': expected auto, fp32 or bf16")
    return fast_dtype(device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def finished_stage(out: Path, name: str, force: bool, log: Callable[[str], Any] = print,
                   also: tuple[Path, ...] = ()) -> dict | None:
    """A stage's results if it already finished (its done.json) and `force` is off; else
    None, after clearing the stage's folder (and `also`) when forced to start over."""
    read_summary(out.parent)  # a corrupt summary.json stops the stage now, not after training
    done = out / "done.json"
    if done.exists() and not force:
        log(f"{name}: already finished in {out} (use --force to redo)")
        return read_json(done, f"rerun `echolm {name} --force`")
    if force:
        for folder in (out, *also):  # ignore_errors: under torchrun every rank does this
            shutil.rmtree(folder, ignore_errors=True)
    return None


def single_process(stage: str, why: str = "run it without torchrun") -> Dist:
    """The process set-up for stages that do not shard their work across processes yet."""
    d = setup_distributed()
    if d.world > 1:
        raise EchoError(f"{stage} runs in one process for now ({why})")
    return d


def check_seq_len(section: str, seq_len: int, max_seq_len: int) -> None:
    if seq_len > max_seq_len:
        raise EchoError(f"{section}.seq_len={seq_len} exceeds model.max_seq_len={max_seq_len}")
