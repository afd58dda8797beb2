"""Muon's optimizer step: Echo's `Muon` (Newton-Schulz in the machine's fast dtype: fp32 on a
CPU without native bf16, bf16 on AMX / AVX512-BF16 / GPUs) vs `torch.optim.Muon` (always
bf16), on the hidden matrices of a preset's model (default `cpu`: 4 layers x q, k, v, o,
gate, up, down), same gradients, same threads.

Both optimizers step the same parameters with the same random gradients; timed steps
alternate (ours, torch's, torch's, ours, ...) so both see the same machine load; the median
step time of each side is reported, and the ratio ours / torch's (below 1 = faster). Also
printed: the largest difference between the two updates relative to the update's size (bf16
rounding, ~1e-2, when the dtypes differ; 0 when both run in bf16).

    python bench/muon_step.py                  # cpu preset, the machine's dtype
    python bench/muon_step.py --preset gpu-small --steps 3

The last line of stdout is one JSON object (see ``emit_json``).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import emit_json, median

from echolm.machine import cpu_model, fast_dtype, isa, native_bf16
from echolm.model import Transformer
from echolm.optim import Muon
from echolm.settings import load_config


def hidden_matrices(preset: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(load_config(preset).model)
    return [p.detach().clone() for name, p in model.named_parameters()
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mats = hidden_matrices(args.preset)
    params = {side: [torch.nn.Parameter(m.clone()) for m in mats] for side in ("ours", "torch")}
    opts = {"ours": Muon(params["ours"], lr=0.02), "torch": torch.optim.Muon(params["torch"],
                                                                             lr=0.02)}
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(m.shape, generator=g) for m in mats] for _ in range(2)]
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for i in range(args.steps + 1):  # the first step of each side is a warm-up
        for side in (("ours", "torch") if i % 2 == 0 else ("torch", "ours")):
            for prm, grad in zip(params[side], grads[i % 2], strict=True):
                prm.grad = grad.clone()
            t0 = time.perf_counter()
            opts[side].step()
            if i:
                times[side].append(time.perf_counter() - t0)
    diff = max(float((a - b).abs().max() / (a - m).abs().max().clamp(min=1e-12))
               for a, b, m in zip(params["ours"], params["torch"], mats, strict=True))
    ours, peer = median(times["ours"]), median(times["torch"])
    n_params = sum(m.numel() for m in mats)
    print(f"{cpu_model()} ({', '.join(isa()) or 'ISA unknown'}); native bf16: "
          f"{native_bf16('cpu')}; {torch.get_num_threads()} torch thread(s)")
    print(f"{len(mats)} matrices, {n_params:,} parameters ({args.preset} preset)")
    print(f"Echo Muon (Newton-Schulz in {opts['ours'].ns_dtype}): {1000 * ours:9.1f} ms/step")
    print(f"torch.optim.Muon (bf16):{'':12s}{1000 * peer:9.1f} ms/step")
    print(f"ratio ours/torch: {ours / peer:.3f}; largest update difference {diff:.2e} of the "
          "update")
    emit_json({"bench": "muon_step", "ours": round(ours, 5), "peer": round(peer, 5),
               "ratio": round(ours / peer, 4), "unit": "s/step",
               "detail": {"preset": args.preset, "matrices": len(mats), "params": n_params,
                          "ns_dtype_ours": str(opts["ours"].ns_dtype).removeprefix("torch."),
                          "fast_dtype": str(fast_dtype("cpu")).removeprefix("torch."),
                          "cpu": cpu_model(), "isa": isa(), "threads": torch.get_num_threads(),
                          "steps": args.steps, "max_update_diff": diff}})


if __name__ == "__main__":
    main()
