"""GPU training throughput and MFU of Echo's real pretraining step for the `gpu-small` and
`gpu-d20` presets, on whatever CUDA GPU is present, in a few minutes.

Each preset's model is built on the GPU and trained by ``echolm.trainer.Trainer`` exactly as
``echolm pretrain`` does (Muon + fused AdamW, bf16 autocast, ``torch.compile``, SDPA
attention, the fused chunked head + cross-entropy), on random token rows copied from pinned
host memory with ``non_blocking=True``; one micro-batch per step (the preset's micro-batch
and sequence length; halved on out-of-memory). After ``--warmup`` untimed steps (the first
compiles), ``--steps`` timed ones. tokens/s = micro_batch x seq_len / the median step time.

MFU = tokens/s x model FLOPs per token / the peak of the dtype the step ran in. FLOPs per token
are ``Transformer.flops_per_token``: 6 x (non-embedding parameters + the output head) for
the matmuls forward and backward, plus the causal attention scores (6 * N + attention in
the usual notation). The peak: for bf16 on a GPU in a small table of datasheet numbers by
device name (H100/H200 SXM 989 TFLOP/s, A100 312, ...); otherwise (another GPU, fp32, a CPU
smoke run) the best measured matmul rate in that dtype on the device.

The benchmark has no peer: "ours" is the achieved model TFLOP/s (mean over the presets),
"peer" the peak (mean over the presets), "ratio" their quotient, the MFU. Per-preset
numbers (tokens/s, MFU, peak GPU memory, compile time, step times) are in "detail".

    python bench/gpu_mfu.py                       # both presets, < 10 minutes
    python bench/gpu_mfu.py --presets gpu-small --steps 20

On a machine without a CUDA GPU it says that it needs one, prints a JSON line with null
numbers, and exits 0. The last line of stdout is one JSON object (see ``emit_json``).
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import emit_json, median

from echolm.machine import matmul_peak_tflops

# dense (no sparsity) bf16 tensor-core peaks from the datasheets, TFLOP/s; first match wins
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.0),
    ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0),
    ("RTX 6000 Ada", 364.0), ("RTX A6000", 155.0), ("RTX 3090", 71.0),
]


def table_peak(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def peak_tflops(device: torch.device, dtype: str, name: str, cache: dict) -> tuple[float, str]:
    """The peak the MFU of a `dtype` run is taken against: a GPU's datasheet bf16 number for
    bf16 where the table knows the GPU, else the best measured matmul rate in that dtype on
    this device (fp32 on a CPU without native bf16 is what it trains in, so that is its peak)."""
    if (device.type, dtype) == ("cuda", "bfloat16") and table_peak(name):
        return table_peak(name), "datasheet bf16"
    if dtype not in cache:
        cache[dtype] = matmul_peak_tflops(getattr(torch, dtype), device)
    return cache[dtype], f"measured {dtype} matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(preset: str, args: argparse.Namespace, device: torch.device, micro_batch: int,
            deadline: float) -> dict[str, Any]:
    """Warm up and time `preset`'s training step with `micro_batch` rows per step."""
    from echolm.model import Transformer
    from echolm.runtime import Dist
    from echolm.settings import load_config
    from echolm.trainer import Trainer

    cfg = load_config(preset)
    mcfg, tcfg = cfg.model, cfg.pretrain
    tcfg.micro_batch, tcfg.grad_accum = micro_batch, 1
    tcfg.compile = tcfg.compile and not args.no_compile
    tcfg.max_steps = max(tcfg.max_steps, args.warmup + args.steps + 1)
    seq = tcfg.seq_len
    torch.manual_seed(0)
    with torch.device(device):  # built where it trains: no host copy of a large model
        model = Transformer(mcfg)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(mcfg.vocab_size, (micro_batch, seq + 1), generator=g) for _ in range(2)]
    if device.type == "cuda":
        rows = [r.pin_memory() for r in rows]

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return m(x.to(device, non_blocking=True), targets=y.to(device, non_blocking=True))

    with tempfile.TemporaryDirectory(prefix="echolm-gpu-mfu-") as tmp:
        trainer = Trainer(model, tcfg, Path(tmp) / "out", "bench", Path(tmp), Dist(device=device))
        n_tokens = micro_batch * seq
        losses, times = [], []
        t0 = time.perf_counter()
        for i in range(args.warmup):
            r = rows[i % 2]
            losses.append(trainer.update([(r[:, :-1], r[:, 1:])], loss_fn, n_tokens))
        warmup_s = time.perf_counter() - t0
        for i in range(args.steps):
            if times and time.perf_counter() > deadline:
                break  # out of time: report what was measured
            r = rows[i % 2]
            losses.append(trainer.update([(r[:, :-1], r[:, 1:])], loss_fn, n_tokens))
            times.append(trainer.last["dt"])
        peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        fpt = model.flops_per_token(seq)
        params = model.num_params()
        dtype = str(trainer.dtype).removeprefix("torch.")
        del trainer
    if not times or not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"{preset}: no timed step or non-finite loss {losses}")
    tok_s = n_tokens / median(times)
    return {"tok_s": round(tok_s, 1), "model_tflops": round(tok_s * fpt / 1e12, 4),
            "flops_per_token": fpt, "params": params, "seq_len": seq,
            "micro_batch": micro_batch, "dtype": dtype, "compile": tcfg.compile,
            "optimizer": tcfg.optimizer, "warmup_steps": args.warmup,
            "warmup_s": round(warmup_s, 1), "timed_steps": len(times),
            "step_s_median": round(median(times), 4), "step_s_best": round(min(times), 4),
            "peak_mem_gib": round(peak_mem / 2**30, 2),
            "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}


def run_preset(preset: str, args: argparse.Namespace, device: torch.device,
               deadline: float) -> dict[str, Any]:
    """`measure`, halving the micro-batch after an out-of-memory error (down to 1)."""
    from echolm.settings import load_config

    micro = args.micro_batch or load_config(preset).pretrain.micro_batch
    while True:
        try:
            return measure(preset, args, device, micro, deadline)
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
        # outside the except block: the failed attempt's tensors are unreachable now
        print(f"{preset}: out of memory with micro_batch={micro}; trying {micro // 2}",
              flush=True)
        micro //= 2
        torch._dynamo.reset()
        free(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["gpu-small", "gpu-d20"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    p.add_argument("--micro-batch", type=int, default=0, help="0: the preset's micro_batch")
    p.add_argument("--no-compile", action="store_true", help="eager mode (no torch.compile)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for everything; timing stops early when they run out")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # smoke tests
    args = p.parse_args()
    record: dict[str, Any] = {"bench": "gpu_mfu", "ours": None, "peer": None, "ratio": None,
                              "unit": "TFLOP/s"}
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_mfu: needs a CUDA GPU, and none is available here; nothing was measured.")
        emit_json({**record, "detail": {"skipped": "needs a CUDA GPU"}})
        return
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks: dict[str, float] = {}
    print(f"device {name}; torch {torch.__version__}", flush=True)
    results: dict[str, Any] = {}
    for i, preset in enumerate(args.presets):
        left = args.budget - (time.perf_counter() - start)
        # the rest of the budget, shared by this preset and the ones after it
        deadline = time.perf_counter() + left / (len(args.presets) - i)
        try:
            res = run_preset(preset, args, device, deadline)
        except Exception as e:  # one preset failing still reports the others
            results[preset] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{preset}: failed: {results[preset]['error']}", flush=True)
            free(device)
            continue
        res["peak_tflops"], res["peak_source"] = peak_tflops(device, res["dtype"], name, peaks)
        res["mfu"] = round(res["model_tflops"] / res["peak_tflops"], 4)
        results[preset] = res
        print(f"{preset}: {res['tok_s']:,.0f} tok/s, {res['model_tflops']:.1f} TFLOP/s, MFU "
              f"{res['mfu']:.1%} of {res['peak_tflops']:.3g} ({res['peak_source']}), peak "
              f"memory {res['peak_mem_gib']:.1f} GiB (micro_batch "
              f"{res['micro_batch']} x {res['seq_len']}, {res['params'] / 1e6:.0f}M params, "
              f"warm-up {res['warmup_s']:.0f} s)", flush=True)
        torch._dynamo.reset()
        free(device)
    ok = [r for r in results.values() if "mfu" in r]
    ours = sum(r["model_tflops"] for r in ok) / len(ok) if ok else None
    peak = sum(r["peak_tflops"] for r in ok) / len(ok) if ok else None
    emit_json({**record, "ours": round(ours, 4) if ours else None,
               "peer": round(peak, 4) if peak else None,
               "ratio": round(ours / peak, 4) if ours and peak else None,
               "detail": {"device": name, "measured_matmul_tflops": peaks,
                          "presets": results, "torch": torch.__version__,
                          "seconds": round(time.perf_counter() - start, 1)}})


if __name__ == "__main__":
    main()
