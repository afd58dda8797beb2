"""The training-loop core every stage shares: devices and processes, optimizers (Muon + AdamW),
learning-rate schedule, mixed precision, gradient accumulation and clipping, checkpoints that
resume exactly, metrics and a progress bar. A stage module supplies data and a loss; this
file does the rest, the same way for pretraining, SFT and the stages after them."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from echolm.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_training_state,
    read_weights,
    save_training_state,
)
from echolm.config import TrainConfig
from echolm.errors import EchoError
from echolm.model import Transformer


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
    (AVX512-BF16 / AMX: 2-6x the fp32 rate); fp32 elsewhere."""
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if choice != "auto":
        raise EchoError(f"dtype '{choice}': expected auto, fp32 or bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` over the last part."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    warmdown = int(cfg.warmdown_frac * cfg.max_steps)
    left = cfg.max_steps - step
    if warmdown > 0 and left <= warmdown:
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * left / warmdown
    return 1.0


def build_optimizers(model: Transformer, cfg: TrainConfig,
                     sharded: bool = False) -> list[torch.optim.Optimizer]:
    """Muon for the hidden 2-D matrices (attention and MLP); AdamW for the embedding, the
    output head and the norm weights, each group with its own learning rate. `sharded`:
    the parameters are FSDP2 DTensors (Muon then orthogonalises whole matrices)."""
    hidden, embed, head, scalars = [], [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if name.endswith("embed_tokens.weight"):
            embed.append(p)
        elif name.endswith("lm_head.weight") or (p.ndim == 2 and min(p.shape) == 1):
            head.append(p)  # output heads, including scalar value / score heads
        elif p.ndim == 2:
            hidden.append(p)
        else:
            scalars.append(p)
    groups = [
        {"params": embed, "lr": cfg.lr_embed, "weight_decay": 0.0},
        {"params": head, "lr": cfg.lr_head, "weight_decay": 0.0},
        {"params": scalars, "lr": cfg.lr_scalar, "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    if cfg.optimizer == "adamw":
        groups.append({"params": hidden, "lr": cfg.lr_matrix, "weight_decay": cfg.weight_decay})
        groups = [g for g in groups if g["params"]]
        return [torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-10, fused=fused)]
    if cfg.optimizer != "muon":
        raise EchoError(f"optimizer '{cfg.optimizer}': expected muon or adamw")
    groups = [g for g in groups if g["params"]]
    adam = torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-10, fused=fused)
    # Muon orthogonalises each matrix's momentum (Newton-Schulz): one well-scaled update
    # per matrix, the reason it trains small transformers faster than AdamW per step
    muon_class = torch.optim.Muon
    if sharded:
        from echolm.train.fsdp import ShardedMuon as muon_class
    muon = muon_class(hidden, lr=cfg.lr_matrix, weight_decay=cfg.weight_decay)
    return [adam, muon]


class MetricsLog:
    """Appends one JSON object per line to the run's metrics.jsonl (tagged with the stage),
    and sends its numbers to the experiment trackers named in `trackers` (train/trackers.py:
    "tensorboard" into DIR/tb/<stage>/, "wandb")."""

    def __init__(self, path: Path, stage: str, enabled: bool = True,
                 trackers: list[str] | tuple[str, ...] = (),
                 config: dict[str, Any] | None = None) -> None:
        self.path, self.stage, self.enabled = path, stage, enabled
        self.trackers: list = []
        if enabled and trackers:
            from echolm.train.trackers import open_trackers

            self.trackers = open_trackers(list(trackers), path.parent, stage, config)

    def truncate_after(self, step: int) -> None:
        """Drop this stage's records past `step` (they are replayed after a resume)."""
        for tracker in self.trackers:
            tracker.restart(step)
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if not (rec.get("stage") == self.stage and rec.get("step", 0) > step):
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"stage": self.stage, **record}) + "\n")
            if self.trackers and "step" in record:
                from echolm.train.trackers import scalars_of

                for tracker in self.trackers:
                    tracker.log(int(record["step"]), scalars_of(record))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: Path, stage: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if stage is None or rec.get("stage") == stage:
            out.append(rec)
    return out


def finished_stage(out: Path, name: str, force: bool, log: Callable[[str], Any] = print,
                   also: tuple[Path, ...] = ()) -> dict | None:
    """A stage's results if it already finished (its done.json) and `force` is off; else
    None, after clearing the stage's folder (and `also`) when forced to start over."""
    done = out / "done.json"
    if done.exists() and not force:
        log(f"{name}: already finished in {out} (use --force to redo)")
        return json.loads(done.read_text())
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


LossFn = Callable[[nn.Module, Any], Tensor]


class Trainer:
    """Owns the model's optimisation: call `step(micro_batches, loss_fn)` once per step.

    Under torchrun the model is replicated (DDP) or, with `parallel = "fsdp"` in a stage that
    allows it (`shardable`), sharded in place (FSDP2, train/fsdp.py): `model` is then a
    sharded module that every process must call together; `unsharded()` gives whole weights."""

    def __init__(self, model: Transformer, cfg: TrainConfig, out: Path, stage: str,
                 run_dir: Path, d: Dist, shardable: bool = False) -> None:
        self.cfg, self.out, self.stage, self.d = cfg, out, stage, d
        self.model = model.to(d.device)
        self.dtype = resolve_dtype(cfg.dtype, d.device)
        self.sharded = d.world > 1 and cfg.parallel == "fsdp"
        if self.sharded:
            if not shardable:
                raise EchoError(f"{stage}: parallel='fsdp' is implemented for pretraining; "
                                "use parallel='ddp' (the default) for this stage")
            from echolm.train.fsdp import shard_model

            shard_model(self.model, d.device, d.world, compile_blocks=cfg.compile)
        self.optimizers = build_optimizers(self.model, cfg, sharded=self.sharded)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
        self.ddp = None
        if d.world > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[d.local_rank] if d.device.type == "cuda"
                           else None)
        self.forward_model: nn.Module = self.ddp or self.model
        if cfg.compile and not self.sharded:  # sharded: compiled block by block
            self.forward_model = torch.compile(self.forward_model)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", stage, enabled=d.main,
                                  trackers=cfg.trackers, config=asdict(cfg))
        self.step_idx, self.tokens, self.elapsed = 0, 0, 0.0
        self.extra: dict[str, Any] = {}  # stage-specific state saved with checkpoints

    # ---- checkpoints -------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the newest checkpoint in `out` if there is one; True if resumed."""
        path = latest_checkpoint(self.out)
        if path is None:
            self.metrics.truncate_after(0)  # records of an earlier start are replayed
            return False
        state = load_training_state(path)
        if (path / "dcp").is_dir():  # written with parallel="fsdp": any world size loads it
            self._load_sharded(path)
        else:
            self._load_whole(path, state)
        self.step_idx, self.tokens = state["step"], state["tokens"]
        self.elapsed, self.extra = state["elapsed"], state.get("extra", {})
        torch.set_rng_state(state["rng_torch"])
        np.random.set_state(state["rng_numpy"])
        random.setstate(state["rng_python"])
        self.metrics.truncate_after(self.step_idx)
        return True

    def _load_sharded(self, path: Path) -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        from echolm.train.fsdp import load_checkpoint

        try:
            load_checkpoint(path, self.model, self.optimizers)
        except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
            failures = getattr(e, "failures", None)  # DCP: {rank: (exception, traceback)}
            cause = next(iter(failures.values()))[0] if failures else e
            msg = " ".join(str(cause).split())[:300]
            raise EchoError(f"{path}: checkpoint does not match the current config ({msg})"
                            ) from None

    def _load_whole(self, path: Path, state: dict) -> None:
        if self.sharded:
            raise EchoError(f"{path}: written without parallel='fsdp' (no dcp/ folder); "
                            "resume it with parallel='ddp' or in one process")
        weights = read_weights(path / "model.safetensors")
        try:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            missing = [k for k in missing
                       if not (k == "lm_head.weight" and self.model.cfg.tie_embeddings)]
            if missing or unexpected:
                raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(sd)
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. a --set changed the model
            msg = " ".join(str(e).split())[:300]
            raise EchoError(f"{path}: checkpoint does not match the current config ({msg})"
                            ) from None

    def save(self) -> None:
        """A checkpoint of everything needed to resume exactly. With parallel="fsdp" (any
        world size) model and optimizer states go through torch.distributed.checkpoint."""
        state = {
            "step": self.step_idx, "tokens": self.tokens, "elapsed": self.elapsed,
            "rng_torch": torch.get_rng_state(), "rng_numpy": np.random.get_state(),
            "rng_python": random.getstate(), "extra": self.extra,
            "train_config": asdict(self.cfg),
        }
        if self.cfg.parallel == "fsdp":
            from echolm.train.fsdp import save_checkpoint

            save_checkpoint(self.out, self.step_idx, self.model, self.optimizers, state,
                            self.d.main, self.d.world)
            return
        if self.d.main:
            state["optimizers"] = [o.state_dict() for o in self.optimizers]
            save_training_state(self.out, self.step_idx, self.model, state)
        if self.d.world > 1:
            dist.barrier()

    def unsharded(self) -> Transformer | None:
        """The model with whole weights, for one process to sample from or save: the model
        itself, or (FSDP) a gathered copy on rank 0 and None elsewhere. Collective then."""
        if not self.sharded:
            return self.model
        from echolm.train.fsdp import unsharded_copy

        return unsharded_copy(self.model, self.d.device, self.d.main)

    # ---- one optimisation step -----------------------------------------------------------
    def step(self, micro_batches: list[Any], loss_fn: LossFn, n_tokens: int) -> float:
        """Forward/backward every micro-batch, average gradients (across processes too),
        clip, schedule, update. Returns the mean loss over all micro-batches and processes."""
        t0 = time.perf_counter()
        mult = lr_multiplier(self.step_idx, self.cfg)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
        total = torch.zeros((), device=self.d.device)
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            sync = self.ddp is None or i == n - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with autocast(self.d.device, self.dtype):
                    loss = loss_fn(self.forward_model, batch)
                (loss / n).backward()
            total += loss.detach().float()
        if self.d.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        grad_norm = 0.0
        if self.cfg.grad_clip > 0:  # over the whole model also when sharded (a DTensor then)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            grad_norm = float(norm.full_tensor() if self.sharded else norm)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.step_idx += 1
        self.tokens += n_tokens * self.d.world
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.elapsed += dt
        self.last = {"lr_mult": mult, "grad_norm": grad_norm, "dt": dt,
                     "tok_per_s": n_tokens * self.d.world / dt}
        return total.item() / (n * self.d.world)

    def out_of_time(self) -> bool:
        return self.cfg.max_minutes > 0 and self.elapsed >= 60 * self.cfg.max_minutes

    def progress(self, desc: str) -> tqdm:
        return tqdm(total=self.cfg.max_steps, initial=self.step_idx, desc=desc,
                    disable=not self.d.main, dynamic_ncols=True, unit="step")

    def fit(self, batches: Callable[[int], list[Any]], loss_fn: LossFn, tokens_per_step: int,
            periodic: Callable[[int], dict] | None = None, epoch: Callable[[int], float] | None
            = None) -> None:
        """Train until max_steps (or max_minutes): one `step` per iteration with the
        micro-batches `batches(step)`, a metrics line per step (plus whatever `periodic(step)`
        returns), a progress bar, and checkpoints every `ckpt_every` steps and at the end."""
        bar = self.progress(self.stage)
        while self.step_idx < self.cfg.max_steps and not self.out_of_time():
            loss = self.step(batches(self.step_idx), loss_fn, tokens_per_step)
            rec = {"step": self.step_idx, "loss": round(loss, 6),
                   "lr_mult": round(self.last["lr_mult"], 5),
                   "grad_norm": round(self.last["grad_norm"], 4),
                   "tok_per_s": round(self.last["tok_per_s"]), "tokens": self.tokens}
            if epoch is not None:
                rec["epoch"] = round(epoch(self.step_idx), 4)
            if periodic is not None:
                rec.update(periodic(self.step_idx))
            self.metrics.write(**rec)
            bar.update(1)
            shown = {k: f"{rec[k]:.3f}" for k in ("val_bpb", "val_loss") if k in rec}
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tok_per_s']:,}", **shown)
            if self.step_idx % self.cfg.ckpt_every == 0 or self.step_idx == self.cfg.max_steps:
                self.save()
        bar.close()
        if self.step_idx % self.cfg.ckpt_every and self.step_idx != self.cfg.max_steps:
            self.save()  # stopped by the clock: keep what was trained
        self.metrics.close()
