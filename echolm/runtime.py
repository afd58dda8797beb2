"""What every training stage sets up before its loop: the processes and device (one, or
`torchrun` processes), the training dtype and the checks they share (their output folder:
echolm/staging.py)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as dist

from echolm.errors import EchoError
from echolm.machine import fast_dtype


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


def single_process(stage: str, why: str = "run it without torchrun") -> Dist:
    """The process set-up for stages that do not shard their work across processes yet."""
    d = setup_distributed()
    if d.world > 1:
        raise EchoError(f"{stage} runs in one process for now ({why})")
    return d


def check_seq_len(section: str, seq_len: int, max_seq_len: int) -> None:
    if seq_len > max_seq_len:
        raise EchoError(f"{section}.seq_len={seq_len} exceeds model.max_seq_len={max_seq_len}")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc on Linux (mallopt's parameters above are glibc's)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(libc: ctypes.CDLL, mmap_max: int, trim_threshold: int) -> bool:
    try:
        ok = libc.mallopt(_M_MMAP_MAX, mmap_max) == 1
        return libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    except AttributeError:
        return False


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the
    system: a training step frees and reallocates the same activations every step, and each
    fresh page is a page fault (a 135M model's GRPO update touched ~0.9 GB of new pages a
    step: ~10% of its time here). Every block comes from the heap, the large ones too (glibc
    would map a block over 32 MiB afresh each time: a vocabulary-wide gradient or logits), and
    the heap is never trimmed below 1 GiB of free space, so peak memory is unchanged but it is
    not handed back between steps. What PyTorch's CPU tuning guide gets from jemalloc or
    tcmalloc, without preloading a library. Linux with glibc only; elsewhere nothing (False)."""
    libc = _glibc()
    return libc is not None and _mallopt(libc, 0, 1 << 30)


def give_back_freed_memory() -> bool:
    """Undo `keep_freed_memory` once its training is over: unreachable objects collected
    (models, optimizer states), glibc's defaults again, and every free page of the heap
    handed back (malloc_trim). The heap a stage kept is fragmented by the time the stage
    ends, so the next stage in the same process (`echolm run`) could not reuse it for its own
    large blocks and grew beside it: the smollm2-cpu eval stage after DPO peaked at 7.2 GB
    where it needs 2.7 GB alone. False where there is nothing to undo (not glibc)."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    ok = _mallopt(libc, _DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)  # returns 1 if memory was released, 0 if there was none to release
    return ok
