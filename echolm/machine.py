"""The machine Echo runs on: CPU model and instruction sets, whether bf16 matrix products are
native (fast) or emulated, and measured matmul peaks to take MFU against.

Why it matters: on a CPU without native bf16 (AVX2 only, most laptops and AMD EPYC before
Zen 4) a bf16 matmul is ~40-65x slower than fp32, so anything that silently works in bf16
(autocast, Muon's Newton-Schulz) must pick fp32 there; with AVX512-BF16 or AMX, or on a GPU,
bf16 is 2-6x faster than fp32.
"""

from __future__ import annotations

import os
import platform
import time
from functools import cache

import torch

# /proc/cpuinfo flag -> the name people know it by, for reports
ISA_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16",
             "amx_bf16": "AMX-BF16", "avx512_fp16": "AVX512-FP16", "asimd": "NEON",
             "sve": "SVE"}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matrix products run in hardware at more than the fp32 rate: GPUs with
    bf16, and CPUs with AMX-BF16 or AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def fast_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The cheapest dtype that is still good enough for training matmuls on this device."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def isa(flags: frozenset[str] | None = None) -> list[str]:
    """The instruction sets that matter for matmul speed, by their usual names."""
    flags = cpu_flags() if flags is None else flags
    return [name for flag, name in ISA_NAMES.items() if flag in flags]


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device | str = "cpu",
                       n: int | None = None, repeats: int = 20) -> float:
    """Best observed rate of an n x n @ n x n matmul in `dtype` with the current threads, in
    TFLOP/s: the practical peak to take MFU against (the best of `repeats`: a shared machine's
    neighbours slow some of them). An emulated dtype (bf16 on an AVX2 CPU) is measured at
    n = 256, where one product still takes only ~25 ms."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else (
            1024 if dtype == torch.float32 or native_bf16(device) else 256)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, kernel choice
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def describe(measure: bool = True, device: torch.device | str = "cpu") -> dict:
    """The machine as a report shows it: CPU model, instruction sets, cores, torch threads,
    whether bf16 is native, and (measure=True, ~1 s) the fp32 and bf16 matmul peaks."""
    device = torch.device(device)
    info: dict = {"cpu": cpu_model(), "isa": isa(), "cores": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "native_bf16": native_bf16(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if measure:
        info["peak_tflops"] = {
            "fp32": round(matmul_peak_tflops(torch.float32, device), 4),
            "bf16": round(matmul_peak_tflops(torch.bfloat16, device), 4)}
    return info
