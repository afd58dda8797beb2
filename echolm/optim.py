"""The optimizers a stage trains with: Muon for the hidden matrices, AdamW for the rest.

Muon here is torch's, with its Newton-Schulz iteration in a dtype the hardware runs fast.
`torch.optim.Muon` orthogonalises every update in bf16. Where bf16 matmul is native (GPUs,
Intel AMX / AVX512-BF16) that is the fast choice; on an AVX2-only CPU bf16 is emulated at
~1 GFLOP/s against ~85 for fp32 on one core, and the orthogonalisation became the whole cost
of a training step (measured on a 2-core AMD EPYC, `cpu` preset shape: 6.3 s of a 7.5 s step).
This `Muon` is torch's algorithm with the dtype as a parameter (`ns_dtype`, default: the
machine's fast dtype, `machine.fast_dtype`); in bf16 it equals torch's Muon bit for bit.

It also takes FSDP2 (DTensor) parameters: Newton-Schulz must see the whole matrix, so each
process gathers the update, orthogonalises it and keeps its own shard's rows (no further
communication); momentum and weight decay stay sharded. Every process repeats the small NS
matmuls, as under DDP; the update equals DDP's bit for bit given the same gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim._muon import _adjust_lr

from echolm.config import LoopConfig
from echolm.errors import EchoError
from echolm.machine import fast_dtype
from echolm.model import Transformer


def build_optimizers(model: Transformer, cfg: LoopConfig) -> list[torch.optim.Optimizer]:
    """Muon for the hidden 2-D matrices (attention and MLP); AdamW for the embedding, the
    output head and the norm weights, each group with its own learning rate. Only trainable
    parameters: with LoRA (echolm/lora.py) the adapters, in AdamW, and whatever a wrapper
    adds (RLHF's value head)."""
    hidden, embed, head, scalars, adapters = [], [], [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if name.endswith(("lora_A.weight", "lora_B.weight")):
            adapters.append(p)
        elif name.endswith("embed_tokens.weight"):
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
        # LoRA's A and B: AdamW, as peft/TRL train them. Muon orthogonalises a whole matrix's
        # update; a rank-r factor is not one (B starts at zero, A is r x in), and B A's update
        # is what matters. They stand in for the hidden matrices, so they take the matrices'
        # rate, lr_matrix: an AdamW rate here (1e-4 to 1e-3 is LoRA's usual), set it so
        # when a stage tuned for Muon (lr_matrix ~1e-2) turns LoRA on
        {"params": adapters, "lr": cfg.lr_matrix, "weight_decay": cfg.weight_decay},
    ]
    # fused: one kernel over all parameters; on a CPU ~6x faster than the per-tensor loop
    # (0.07 s vs 0.41 s a step for a 135M model, one thread), on a GPU the usual choice
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    if cfg.optimizer == "adamw":
        groups.append({"params": hidden, "lr": cfg.lr_matrix, "weight_decay": cfg.weight_decay})
        groups = [g for g in groups if g["params"]]
        return [torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-10, fused=fused)]
    if cfg.optimizer != "muon":
        raise EchoError(f"optimizer '{cfg.optimizer}': expected muon or adamw")
    groups = [g for g in groups if g["params"]]
    adam = torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-10, fused=fused)
    if not hidden:  # LoRA: every hidden matrix is frozen
        return [adam]
    # Muon orthogonalises each matrix's momentum (Newton-Schulz): one well-scaled update
    # per matrix, the reason it trains small transformers faster than AdamW per step
    # (in the machine's fast dtype: train/muon.py; DTensor matrices are gathered whole)
    ns_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[cfg.muon_dtype]
    muon = Muon(hidden, lr=cfg.lr_matrix, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype)
    return [adam, muon]


def newton_schulz(grad: Tensor, coefficients: tuple[float, float, float] = (3.4445, -4.7750,
                  2.0315), steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The quintic Newton-Schulz iteration torch's Muon uses (Keller Jordan's coefficients),
    computed in `dtype`: roughly U V^T of the SVD U S V^T of `grad` (singular values end near
    1, within ~0.5-1.5: enough for a well-scaled update, cheaper than converging)."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def orthogonalise(update: Tensor, group: dict, dtype: torch.dtype) -> Tensor:
    """Newton-Schulz of the whole matrix; for a DTensor, this process's shard of the result."""
    args = (group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(update, DTensor):
        return newton_schulz(update, *args)
    full = newton_schulz(update.full_tensor(), *args)
    # every process holds the same full result: cut out the local shard, no communication
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` (same arguments, same state, same update) whose Newton-Schulz runs
    in `ns_dtype`: None picks the fast dtype of the parameters' device."""

    def __init__(self, params: Any, ns_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if ns_dtype is None:
            first = next(p for g in self.param_groups for p in g["params"])
            ns_dtype = fast_dtype(first.device)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                ortho = orthogonalise(update, group, self.ns_dtype)
                p.mul_(1 - lr * wd)
                p.add_(ortho.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
