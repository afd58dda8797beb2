"""Pretraining throughput: Echo's real training step vs a plain Hugging Face loop, same shape.

Ours: ``echolm.model.Transformer`` trained by ``echolm.trainer.Trainer`` (Muon for the
hidden matrices + AdamW for the rest, LR schedule, grad clipping, autocast) with
the fused head + cross-entropy (``m(x, targets=y)``): the code path ``echolm pretrain`` runs.
Peer: ``transformers.LlamaForCausalLM`` (attn_implementation="sdpa", use_cache=False) with
``torch.optim.AdamW``: forward with labels, ``loss.backward()``, ``clip_grad_norm_``, step,
zero_grad -- the loop most users would otherwise write.

Same shape (hidden, layers, heads, KV heads, SwiGLU width = Echo's ``d_mlp``, vocab, RoPE
theta, RMSNorm eps, untied embeddings), same batch and sequence length, fp32 weights, and
the same precision choice for both (``--dtype bf16`` = ``torch.autocast(bfloat16)``).
Echo's QK-norm (on by default in ModelConfig) is off here because Llama has none; pass
``--qk-norm`` to measure Echo with it.

Each side runs in its own subprocess (``--side echo|peer --serve``), so its peak RSS
(ru_maxrss) is its own. Both processes stay alive and are stepped in alternation, one
training step at a time (echo, peer, peer, echo, ...): step i of each side sees the same
machine load, which matters on a CPU shared with other jobs. ``--rounds`` fresh pairs of
processes run ``--steps`` timed steps each after ``--warmup`` untimed ones; tokens/s is
batch x seq_len / the median step time over all rounds. Also reported: the median of the
per-step paired ratios, the best-step ratio and the CPU-time ratio (the most load-robust
with ``--threads 1``), and the load average before and after.
MFU = tokens/s x Echo's ``flops_per_token(seq_len)`` / the best rate of a 1024^3 matmul
in the same dtype, measured in the same run (before, between and after the rounds; best).

    python bench/pretrain_throughput.py                 # fp32, the "7M" shape
    python bench/pretrain_throughput.py --preset cpu    # the cpu preset's shape and dtype
    python bench/pretrain_throughput.py --dtype bf16
    python bench/pretrain_throughput.py --threads 1     # steadier on a busy machine
    python bench/pretrain_throughput.py --side echo --profile 1   # where one side's time goes

The last line of stdout is one JSON object (see ``emit_json``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    LockstepChild,
    current_rss_mb,
    emit_json,
    llama_config,
    median,
    parse_dtype,
    peak_rss_mb,
    serve_lockstep,
)

from echolm.config import ModelConfig, PretrainConfig
from echolm.machine import matmul_peak_tflops


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.hidden,
                       n_head=args.heads, n_kv_head=args.kv_heads, max_seq_len=args.seq_len,
                       qk_norm=args.qk_norm)


def make_batches(args: argparse.Namespace, n: int = 4) -> list[torch.Tensor]:
    """A few fixed random token rows (B, T+1); identical for both sides (same seed)."""
    g = torch.Generator().manual_seed(args.seed)
    return [torch.randint(args.vocab, (args.batch, args.seq_len + 1), generator=g)
            for _ in range(n)]


def autocast_ctx(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cpu", dtype=dtype)


# ---- one side, in its own process ----------------------------------------------------------

def echo_stepper(args: argparse.Namespace, tmp: Path):
    from echolm.model import Transformer
    from echolm.runtime import Dist
    from echolm.trainer import Trainer

    torch.manual_seed(args.seed)
    model = Transformer(model_config(args))
    total_steps = args.warmup + args.steps
    tcfg = PretrainConfig(seq_len=args.seq_len, micro_batch=args.batch, grad_accum=1,
                       max_steps=total_steps, dtype=args.dtype, grad_clip=1.0,
                       optimizer=args.echo_optimizer, seed=args.seed)
    trainer = Trainer(model, tcfg, tmp / "ckpt", "bench", tmp, Dist())
    assert trainer.dtype == parse_dtype(args.dtype)
    n_tokens = args.batch * args.seq_len

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return m(x, targets=y)  # exactly what echolm pretrain does

    def step(rows: torch.Tensor) -> float:
        return trainer.update([(rows[:, :-1], rows[:, 1:])], loss_fn, n_tokens)

    return model, step


def peer_stepper(args: argparse.Namespace, tmp: Path):
    from transformers import LlamaForCausalLM

    mcfg = model_config(args)
    cfg = llama_config(mcfg, use_cache=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    dtype = parse_dtype(args.dtype)

    def step(rows: torch.Tensor) -> float:
        x = rows[:, :-1]
        with autocast_ctx(dtype):
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side alone: warm up, time `--steps` steps (optionally under torch.profiler)."""
    rss_start = current_rss_mb()
    with tempfile.TemporaryDirectory(prefix="echolm-bench-") as tmp:
        model, step = (echo_stepper if args.side == "echo" else peer_stepper)(args, Path(tmp))
        batches = make_batches(args)
        losses = [step(batches[i % len(batches)]) for i in range(args.warmup)]
        walls, cpus = [], []
        prof_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            prof_ctx = profile(activities=[ProfilerActivity.CPU], record_shapes=args.profile > 1)
        with prof_ctx as prof:
            for i in range(args.steps):
                rec = timed_step(step, batches[(args.warmup + i) % len(batches)])
                walls.append(rec["wall"])
                cpus.append(rec["cpu"])
                losses.append(rec["loss"])
        if args.profile:
            print(prof.key_averages(group_by_input_shape=args.profile > 1).table(
                sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    check_losses(args.side, losses)
    n_tokens = args.batch * args.seq_len
    return {"side": args.side, "tok_s_median": n_tokens / median(walls),
            "cpu_s_median": median(cpus), "step_s": walls, "loss_first": losses[0],
            "loss_last": losses[-1], "params": sum(p.numel() for p in model.parameters()),
            "rss_after_import_mb": rss_start, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def timed_step(step, rows: torch.Tensor) -> dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step(rows)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "loss": loss}


def check_losses(side: str, losses: list[float]) -> None:
    if not all(math.isfinite(v) for v in losses):
        raise SystemExit(f"{side}: non-finite loss {losses}")


def serve_side(args: argparse.Namespace) -> None:
    """Child of `compare`: build and warm up, then run one timed step per "step" line."""
    rss_start = current_rss_mb()  # interpreter + torch (+ transformers for the peer below)
    with tempfile.TemporaryDirectory(prefix="echolm-bench-") as tmp:
        model, step = (echo_stepper if args.side == "echo" else peer_stepper)(args, Path(tmp))
        batches = make_batches(args)
        losses = [step(batches[i % len(batches)]) for i in range(args.warmup)]

        def one() -> dict[str, float]:
            rec = timed_step(step, batches[len(losses) % len(batches)])
            losses.append(rec["loss"])
            return rec

        def done() -> dict[str, Any]:
            check_losses(args.side, losses)
            return {"side": args.side, "loss_first": losses[0], "loss_last": losses[-1],
                    "params": sum(p.numel() for p in model.parameters()),
                    "rss_after_import_mb": rss_start, "peak_rss_mb": peak_rss_mb(),
                    "threads": torch.get_num_threads()}

        serve_lockstep({"step": one, "done": done}, {"ready": args.side})


# ---- the comparison (parent) ---------------------------------------------------------------

def child_argv(args: argparse.Namespace, side: str) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--side", side, "--serve"]
    for name in ("hidden", "layers", "heads", "kv_heads", "vocab", "seq_len", "batch",
                 "warmup", "dtype", "seed", "threads", "echo_optimizer"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.qk_norm:
        argv.append("--qk-norm")
    return argv


def run_round(args: argparse.Namespace, r: int) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Both sides alive in their own processes, stepped alternately: step i of the peer runs
    right after (or right before) step i of Echo, so each pair sees the same machine load."""
    steps: dict[str, list[dict]] = {"echo": [], "peer": []}
    final: dict[str, dict] = {}
    children: dict[str, LockstepChild] = {}
    try:
        for side in ("echo", "peer"):  # started one after the other: warm-ups do not overlap
            children[side] = LockstepChild(child_argv(args, side))
        for i in range(args.steps):
            for side in (("echo", "peer") if (i + r) % 2 == 0 else ("peer", "echo")):
                steps[side].append(children[side].request("step"))
        for side, child in children.items():
            final[side] = child.close()
    finally:
        for child in children.values():
            child.kill()
    return steps, final


def compare(args: argparse.Namespace) -> dict[str, Any]:
    dtype = parse_dtype(args.dtype)
    n_tokens = args.batch * args.seq_len
    peaks = [matmul_peak_tflops(dtype)]
    print(f"matmul peak ({args.dtype}, 2048^3): {peaks[0]:.3f} TFLOP/s", flush=True)
    load = [os.getloadavg()[0]]
    wall: dict[str, list[float]] = {"echo": [], "peer": []}
    cpu: dict[str, list[float]] = {"echo": [], "peer": []}
    rss: dict[str, list[float]] = {"echo": [], "peer": []}
    final: dict[str, dict] = {}
    for r in range(args.rounds):
        if r:
            peaks.append(matmul_peak_tflops(dtype))  # the peak too is hit by other load
        steps, final = run_round(args, r)
        for side in ("echo", "peer"):
            wall[side] += [s["wall"] for s in steps[side]]
            cpu[side] += [s["cpu"] for s in steps[side]]
            rss[side].append(final[side]["peak_rss_mb"])
            w = [s["wall"] for s in steps[side]]
            print(f"round {r + 1}/{args.rounds} {side}: {n_tokens / median(w):9,.0f} tok/s "
                  f"(median of {len(w)} steps; best {n_tokens / min(w):,.0f}), loss "
                  f"{final[side]['loss_first']:.3f} -> {final[side]['loss_last']:.3f}, "
                  f"peak RSS {final[side]['peak_rss_mb']:.0f} MiB", flush=True)
    peaks.append(matmul_peak_tflops(dtype))
    peak = max(peaks)
    load.append(os.getloadavg()[0])

    from echolm.model import Transformer

    fpt = Transformer(model_config(args)).flops_per_token(args.seq_len)
    ours, peer = n_tokens / median(wall["echo"]), n_tokens / median(wall["peer"])
    paired = median([p / e for e, p in zip(wall["echo"], wall["peer"], strict=True)])
    cpu_ours, cpu_peer = median(cpu["echo"]), median(cpu["peer"])
    best_ours, best_peer = n_tokens / min(wall["echo"]), n_tokens / min(wall["peer"])
    mfu = {"ours": ours * fpt / (peak * 1e12), "peer": peer * fpt / (peak * 1e12)}
    mcfg = model_config(args)
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "vocab": args.vocab, "d_mlp": mcfg.d_mlp,
             "seq_len": args.seq_len, "batch": args.batch, "qk_norm": args.qk_norm}
    print(f"\nshape {shape}; {fpt / 1e6:.1f} MFLOP/token (Echo's flops_per_token); params "
          f"echo {final['echo']['params']:,} / peer {final['peer']['params']:,}; "
          f"{final['echo']['threads']} torch thread(s)")
    print(f"matmul peak ({args.dtype}): {', '.join(f'{p:.3f}' for p in peaks)} TFLOP/s "
          f"(before, between and after the rounds; using the best, {peak:.3f})")
    print(f"{'':6s}{'tok/s (median)':>16s}{'best':>9s}{'MFU':>8s}{'CPU s/step':>12s}"
          f"{'peak RSS MiB':>14s}{'RSS after import':>18s}")
    for label, side, v, b, m, c in (("echo", "echo", ours, best_ours, mfu["ours"], cpu_ours),
                                    ("peer", "peer", peer, best_peer, mfu["peer"], cpu_peer)):
        print(f"{label:6s}{v:16,.0f}{b:9,.0f}{m:8.1%}{c:12.3f}{median(rss[side]):14.0f}"
              f"{final[side]['rss_after_import_mb']:18.0f}")
    print(f"ratio echo/peer: {ours / peer:.3f} (medians); paired per-step {paired:.3f}; "
          f"best steps {best_ours / best_peer:.3f}; CPU time {cpu_peer / cpu_ours:.3f}")
    print(f"1-min load average {load[0]:.2f} -> {load[1]:.2f} on {os.cpu_count()} CPUs "
          f"(above ~1 other processes share the cores and skew wall-clock numbers)")
    return {
        "bench": "pretrain_throughput", "ours": round(ours, 1), "peer": round(peer, 1),
        "ratio": round(ours / peer, 4), "unit": "tok/s",
        "detail": {
            "mfu_ours": round(mfu["ours"], 4), "mfu_peer": round(mfu["peer"], 4),
            "peak_tflops": round(peak, 4),
            "peak_rss_mb_ours": round(median(rss["echo"]), 1),
            "peak_rss_mb_peer": round(median(rss["peer"]), 1),
            "dtype": args.dtype, "shape": shape,
            "flops_per_token": fpt, "rounds": args.rounds, "steps": args.steps,
            "ratio_paired_median": round(paired, 4),
            "ratio_best_step": round(best_ours / best_peer, 4),
            "tok_s_best_ours": round(best_ours, 1), "tok_s_best_peer": round(best_peer, 1),
            "cpu_s_per_step_ours": round(cpu_ours, 4), "cpu_s_per_step_peer": round(cpu_peer, 4),
            "ratio_cpu_time": round(cpu_peer / cpu_ours, 4),
            "loadavg_start_end": [round(v, 2) for v in load],
            "echo_optimizer": args.echo_optimizer, "threads": final["echo"]["threads"],
            "peer": "transformers LlamaForCausalLM sdpa + torch.optim.AdamW",
        },
    }


def from_preset(args: argparse.Namespace) -> None:
    """The preset's model shape, sequence length, micro-batch and dtype into `args`."""
    from echolm.machine import fast_dtype
    from echolm.settings import load_config

    cfg = load_config(args.preset)
    m, t = cfg.model, cfg.pretrain
    args.hidden, args.layers, args.heads = m.n_embd, m.n_layer, m.n_head
    args.kv_heads, args.vocab, args.qk_norm = m.n_kv_head, m.vocab_size, m.qk_norm
    args.seq_len, args.batch = t.seq_len, t.micro_batch
    if t.dtype == "auto":
        args.dtype = "bf16" if fast_dtype("cpu") == torch.bfloat16 else "fp32"
    else:
        args.dtype = t.dtype
    print(f"preset {args.preset}: hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
          f"/ {args.kv_heads} KV, vocab {args.vocab}, seq {args.seq_len}, batch {args.batch}, "
          f"QK-norm {args.qk_norm} (Echo only: Llama has none), {args.dtype}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="", help="take the shape (and QK-norm), sequence "
                   "length, micro-batch and dtype of this preset's model and pretraining; "
                   "dtype auto = the machine's fast one")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--rounds", type=int, default=2,
                   help="fresh pairs of processes (medians over all their steps)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--qk-norm", action="store_true", help="Echo with QK-norm (Llama has none)")
    p.add_argument("--echo-optimizer", choices=["muon", "adamw"], default="muon",
                   help="Echo's pretrain.optimizer (muon is Echo's default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--side", choices=["echo", "peer"], help="run one side only (child mode)")
    p.add_argument("--profile", type=int, default=0,
                   help="with --side: torch.profiler table (1; 2 = grouped by input shape)")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # compare's child
    args = p.parse_args()
    if args.preset and not args.side:
        from_preset(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side and args.serve:
        serve_side(args)
    else:
        emit_json(run_side(args) if args.side else compare(args))


if __name__ == "__main__":
    main()
