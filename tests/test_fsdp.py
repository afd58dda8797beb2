"""FSDP2 (`pretrain.parallel=fsdp`) on CPU with 2 gloo processes under real torchrun: the same
loss curve as DDP, and sharded checkpoints (torch.distributed.checkpoint) that resume on a
different number of processes exactly where an uninterrupted run would be."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import losses, pretrain_args, subprocess_env, tmp_leftovers
from safetensors.torch import load_file

from echolm.checkpoint import load_model
from echolm.config import PretrainConfig
from echolm.errors import EchoError
from echolm.metrics import read_metrics
from echolm.model import Transformer
from echolm.runtime import Dist
from echolm.settings import load_config
from echolm.trainer import Trainer

STEPS = 10
COMMON = (f"pretrain.max_steps={STEPS}", "pretrain.ckpt_every=5", "pretrain.eval_every=5",
          "pretrain.micro_batch=4", "pretrain.seed=7")
# 16 rows per step either way: 2 processes x 2 accumulated micro-batches, or 1 x 4
TWO = ("pretrain.grad_accum=2",)
ONE = ("pretrain.grad_accum=4",)
FSDP = ("pretrain.parallel=fsdp",)


def _echolm(run: Path, corpus: Path, procs: int, *overrides: str) -> None:
    launcher = [sys.executable, "-m", "echolm"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={procs}", "-m", "echolm"]
    proc = subprocess.run([*launcher, *pretrain_args(run, corpus, *COMMON, *overrides)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _rewind(src: Path, dst: Path, step: int) -> None:
    """A copy of finished run `src` as a run killed right after checkpoint `step`."""
    shutil.copytree(src, dst)
    ckpt = dst / "base" / "ckpt"
    for old in ckpt.glob("step_*"):
        if old.name != f"step_{step:06d}":
            shutil.rmtree(old)
    (ckpt / "latest").write_text(f"step_{step:06d}")
    for name in ("done.json", "model.safetensors", "config.json", "samples.json"):
        (dst / "base" / name).unlink(missing_ok=True)


def _assert_same_curve(a: Path, b: Path, rel: float = 2e-4) -> None:
    """Same per-step losses and held-out bits per byte. (With gradient accumulation the
    runs add the same gradients in a different order: fp32 rounding, ~1e-6 in the loss.)"""
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == list(range(1, STEPS + 1))
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (step, x), (_, y) in zip(la, lb, strict=True):
        assert x == pytest.approx(y, rel=rel), f"step {step}: {x} vs {y}"
    assert la[-1][1] < la[0][1] - 0.3  # training moved: not two flat lines
    va = [r["val_bpb"] for r in read_metrics(a / "metrics.jsonl", "base") if "val_bpb" in r]
    vb = [r["val_bpb"] for r in read_metrics(b / "metrics.jsonl", "base") if "val_bpb" in r]
    assert len(va) == 2 and va == pytest.approx(vb, rel=rel)


@pytest.fixture(scope="module")
def fsdp_two(prepared_run: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 steps of FSDP2 pretraining in 2 processes (checkpoints at 5 and 10)."""
    run = tmp_path_factory.mktemp("fsdp") / "two"
    shutil.copytree(prepared_run, run)
    _echolm(run, corpus, 2, *TWO, *FSDP)
    return run


@pytest.mark.slow
def test_fsdp_gives_the_ddp_loss_curve(fsdp_two: Path, prepared_run: Path, corpus: Path,
                                       tmp_path: Path) -> None:
    ddp = tmp_path / "ddp"
    shutil.copytree(prepared_run, ddp)
    _echolm(ddp, corpus, 2, *TWO)
    _assert_same_curve(fsdp_two, ddp)

    done = json.loads((fsdp_two / "base" / "done.json").read_text())
    assert done["world_size"] == 2 and done["steps"] == STEPS
    # the checkpoint: DCP shards of both processes + gathered full weights + state
    step = fsdp_two / "base" / "ckpt" / f"step_{STEPS:06d}"
    assert {p.name for p in (step / "dcp").iterdir()} >= {".metadata", "__0_0.distcp",
                                                           "__1_0.distcp"}
    assert "optimizers" not in torch.load(step / "state.pt", weights_only=False)
    whole = load_model(step)  # what eval / chat / export read
    final = load_file(str(fsdp_two / "base" / "model.safetensors"))
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0, msg=k)
    assert tmp_leftovers(fsdp_two) == []


@pytest.mark.slow
def test_fsdp_equals_ddp_bit_for_bit_without_accumulation(prepared_run: Path, corpus: Path,
                                                          tmp_path: Path) -> None:
    """One micro-batch per step: FSDP's reduce-scatter adds the same two gradients as DDP's
    all-reduce, Muon orthogonalises the same whole matrices: identical weights."""
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    for run, extra in ((fsdp, FSDP), (ddp, ())):
        shutil.copytree(prepared_run, run)
        _echolm(run, corpus, 2, "pretrain.grad_accum=1", "pretrain.micro_batch=8",
                "pretrain.eval_every=0", *extra)
    assert losses(fsdp) == losses(ddp)
    wa = load_file(str(fsdp / "base" / "model.safetensors"))
    wb = load_file(str(ddp / "base" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_processes_resumes_in_one(fsdp_two: Path, corpus: Path,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    _rewind(fsdp_two, run, 5)
    _echolm(run, corpus, 1, *ONE, *FSDP)
    assert json.loads((run / "base" / "done.json").read_text())["world_size"] == 1
    _assert_same_curve(run, fsdp_two)


@pytest.mark.slow
def test_fsdp_checkpoint_of_one_process_resumes_in_two(prepared_run: Path, corpus: Path,
                                                       tmp_path: Path) -> None:
    """Tied embeddings here: the head shares the embedding's parameter in the root unit."""
    one, run = tmp_path / "one", tmp_path / "resumed"
    shutil.copytree(prepared_run, one)
    _echolm(one, corpus, 1, *ONE, *FSDP, "model.tie_embeddings=true")
    _rewind(one, run, 5)
    _echolm(run, corpus, 2, *TWO, *FSDP, "model.tie_embeddings=true")
    assert json.loads((run / "base" / "done.json").read_text())["world_size"] == 2
    # clipped steps (grad norm ~5 > 1) amplify the rounding differences: 5e-5 measured
    _assert_same_curve(run, one, rel=5e-4)
    assert "lm_head.weight" not in load_file(str(run / "base" / "model.safetensors"))


def test_sharded_checkpoint_in_one_process_and_a_mismatch(tmp_path: Path) -> None:
    """parallel=fsdp in one process writes the DCP layout (so more processes can resume it),
    loads it back exactly, and a changed model is a clear error, not a traceback."""
    cfg = load_config("micro")
    tcfg = PretrainConfig(parallel="fsdp", dtype="fp32", max_steps=2, warmup_steps=1)
    rows = torch.randint(cfg.model.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    batch = [(rows[:, :-1], rows[:, 1:])]

    def loss_fn(m: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return m(b[0], targets=b[1])

    def trainer(model_cfg: object) -> Trainer:
        torch.manual_seed(0)
        return Trainer(Transformer(model_cfg), tcfg, tmp_path / "out", "base", tmp_path, Dist(),
                       shardable=True)

    a = trainer(cfg.model)
    a.update(batch, loss_fn, 64)
    a.end_step()
    a.save()
    step = tmp_path / "out" / "ckpt" / "step_000001"
    assert (step / "dcp" / ".metadata").exists() and (step / "model.safetensors").exists()
    b = trainer(cfg.model)
    assert b.resume() and b.step == 1
    assert a.update(batch, loss_fn, 64) == b.update(batch, loss_fn, 64)  # optimizer state too
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                           strict=True):
        assert torch.equal(va, vb), k
    cfg.model.n_embd = 128
    with pytest.raises(EchoError, match="checkpoint does not match the current config"):
        trainer(cfg.model).resume()


def test_parallel_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(EchoError, match="pretrain.parallel='zero3': expected ddp or fsdp"):
        load_config("micro", ["pretrain.parallel=zero3"])
    with pytest.raises(EchoError, match="sft.parallel='fsdp': FSDP is implemented for "
                                        "pretraining only"):  # refused before any stage runs
        load_config("micro", ["sft.parallel=fsdp"])
    model = Transformer(load_config("micro").model)
    with pytest.raises(EchoError, match="sft: parallel='fsdp' is implemented for pretraining"):
        Trainer(model, PretrainConfig(parallel="fsdp"), tmp_path, "sft", tmp_path, Dist(world=2))
