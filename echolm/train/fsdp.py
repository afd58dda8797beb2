"""FSDP2 for the training loop: sharding the model, and sharded checkpoints through
`torch.distributed.checkpoint` (DCP) that load on any number of processes.

`pretrain.parallel = "fsdp"` under torchrun shards every transformer block and then the
root (embedding, final norm, output head; a tied head shares the embedding's parameter, so
both live in the root unit). Every parameter becomes a DTensor sharded on dim 0; each
process keeps 1/world of the weights, gradients and optimizer state (Muon gathers each
matrix for its Newton-Schulz iteration: train/muon.py).

A checkpoint of an fsdp run is the usual `ckpt/step_NNNNNN/` folder with
    dcp/           model + optimizer state, one file per process plus .metadata (DCP)
    model.safetensors, config.json   full weights, gathered (eval, chat, export read these)
    state.pt       step, tokens, time, RNG states, stage extras (no optimizer states)
written into `step_NNNNNN.tmp/` by every process, then renamed once by rank 0 after a
barrier. DCP reshards on load, so 2 processes can resume what 1 wrote and vice versa.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from echolm.checkpoint import publish_checkpoint, save_weights
from echolm.model import Transformer

DCP_FOLDER = "dcp"


def shard_model(model: Transformer, device: torch.device, world: int,
                compile_blocks: bool = False) -> None:
    """FSDP2 in place: one unit per transformer block, then the root (the rest).
    `compile_blocks`: torch.compile each block first (the FSDP2 way: the all-gathers and
    reduce-scatters stay between compiled blocks, not inside one whole-model graph)."""
    mesh = init_device_mesh(device.type, (world,))
    for block in model.layers:
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on CPU: gathered on rank 0 ({} elsewhere) when sharded.
    Collective: every process must call it."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def unsharded_copy(model: Transformer, device: torch.device, main: bool) -> Transformer | None:
    """A plain (unsharded) copy of a sharded model on rank 0, None elsewhere. Collective."""
    sd = full_state_dict(model)
    if not main:
        return None
    copy = Transformer(model.cfg)
    copy.load_state_dict(sd)  # a tied head is the embedding's tensor: loaded twice, same
    return copy.to(device)


def save_checkpoint(out: Path, step: int, model: Transformer,
                    optimizers: list[torch.optim.Optimizer], state: dict, main: bool,
                    world: int) -> None:
    """Publish ckpt/step_NNNNNN with DCP shards + gathered weights + state.pt. Collective."""
    root = out / "ckpt"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    model_sd, optim_sd = get_state_dict(model, optimizers)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_FOLDER)
    weights = full_state_dict(model)
    if main:
        save_weights(weights, model.cfg, tmp)
        torch.save(state, tmp / "state.pt")
    _barrier(world)  # every process's shard is on disk before the folder appears
    if main:
        publish_checkpoint(tmp, final)
    _barrier(world)


def load_checkpoint(path: Path, model: Transformer,
                    optimizers: list[torch.optim.Optimizer]) -> None:
    """Load a DCP checkpoint's model and optimizer state into `model` (sharded or not) and
    `optimizers`, resharding to the current number of processes. Collective."""
    model_sd, optim_sd = get_state_dict(model, optimizers)
    with _single_process_quiet():
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path / DCP_FOLDER)
    set_state_dict(model, optimizers, model_state_dict=model_sd, optim_state_dict=optim_sd)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        yield
