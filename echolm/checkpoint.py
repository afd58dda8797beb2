"""Checkpoints: `model.safetensors` + `config.json`, plus training state for exact resume.

Every file is written to a temporary name and renamed, and a training checkpoint is a whole
folder (`ckpt/step_NNNNNN`) that appears by one atomic rename: a run killed at any moment,
even mid-save, leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from echolm.atomic import atomic_path, atomic_write_json, atomic_write_text
from echolm.config import ModelConfig
from echolm.errors import EchoError
from echolm.model import Transformer
from echolm.runfiles import read_json

_FINGERPRINTS: dict[tuple, str] = {}


def file_fingerprint(path: Path) -> str:
    """A short hash (sha256) of a file's bytes: which weights a cached result was computed
    from. Within one process a file is hashed once while it stays the same file (inode,
    size, mtime: a checkpoint is replaced by a rename, a new inode), not once per result."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def tied_head(key: str) -> bool:
    """Whether a state-dict key is the output head (`lm_head.weight`, or a wrapper's
    `<prefix>.lm_head.weight`): with tied embeddings it is not stored."""
    return key == "lm_head.weight" or key.endswith(".lm_head.weight")


def save_model(model: Transformer, folder: Path) -> None:
    """Write model.safetensors and config.json into `folder` (each atomically)."""
    save_weights(model.state_dict(), model.cfg, folder)


def save_weights(sd: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path) -> None:
    """`save_model` from a state dict (e.g. one gathered from a sharded model)."""
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; a tied head is the embedding (also inside a wrapper
    # such as RLHF's policy-with-value, whose keys are `policy.lm_head.weight` ...)
    sd = {k: v.detach().contiguous() for k, v in sd.items()
          if not (cfg.tie_embeddings and tied_head(k))}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", asdict(cfg))


def load_model_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.exists():
        raise EchoError(f"{path}: missing (no checkpoint in {folder})")
    fix = "retrain the stage with --force"
    data = read_json(path, fix)
    types = {"int": int, "float": (int, float), "bool": bool}
    for f in fields(ModelConfig):  # the Transformer would fail on a wrong type far later
        value = data.get(f.name, f.default)
        if not isinstance(value, types[f.type]) or isinstance(value, bool) != (f.type == "bool"):
            raise EchoError(f"{path}: '{f.name}' should be {f.type}, found {value!r}; {fix}")
    try:
        cfg = ModelConfig(**data)
        cfg.validate()
    except (TypeError, ValueError, EchoError) as e:  # unknown fields, wrong types or values
        raise EchoError(f"{path}: not a valid model config ({e}); {fix}") from None
    return cfg


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a missing or truncated file is a clear error."""
    if not path.exists():
        raise EchoError(f"{path}: missing (no checkpoint in {path.parent})")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise EchoError(f"{path}: unreadable or truncated checkpoint ({e})") from None


def load_model(folder: Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the model saved in `folder`; a missing or truncated file is a clear error."""
    cfg = load_model_config(folder)
    path = folder / "model.safetensors"
    sd = read_weights(path, device)
    # built directly on the device (a meta-device build would import torch._dynamo: ~2 s
    # at every CLI start), then overwritten by the saved weights
    with torch.device(device):
        model = Transformer(cfg)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        msg = " ".join(str(e).split())[:300]
        raise EchoError(f"{path}: does not match config.json ({msg})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise EchoError(f"{path}: does not match config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def save_training_state(folder: Path, step: int, model: Transformer, state: dict) -> None:
    """Atomically publish ckpt/step_NNNNNN (model + optimizer/RNG/progress) and keep the last 2."""
    root = folder / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp)
    torch.save(state, tmp / "state.pt")
    publish_checkpoint(tmp, final)


def publish_checkpoint(tmp: Path, final: Path) -> None:
    """Make the complete folder `tmp` the checkpoint `final` (one rename), point ckpt/latest
    at it and keep the last two."""
    root = final.parent
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    for old in sorted(root.glob("step_*"))[:-2]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete training checkpoint in `folder`, or None."""
    root = folder / "ckpt"
    for tmp in root.glob("step_*.tmp"):  # leftovers of a save that was killed
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    path = root / name
    if not name.startswith("step_") or "/" in name or not path.is_dir():
        shown = name[:60] if name.isprintable() else repr(name[:60])  # one line, always
        raise EchoError(f"{pointer}: points to {shown}, which is missing; write the "
                        "name of a step_* folder beside it into it, or rerun the stage with "
                        "--force")
    return path


def load_training_state(path: Path) -> dict:
    file = path / "state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load/pickle raise many types for a cut or corrupt file
        msg = " ".join(str(e).split())[:300]
        raise EchoError(f"{file}: unreadable or truncated training state ({msg})") from None


# Model-producing stages in pipeline order; each writes DIR/<stage>/model.safetensors.
MODEL_STAGES = ("base", "sft", "rl", "rlhf", "dpo")


def imported_instruct(run_dir: Path) -> bool:
    """Whether `run_dir` was imported from an instruct (chat) model (import.json, written by
    `echolm import`): its base stage is then a chat model already."""
    path = run_dir / "import.json"
    return path.is_file() and read_json(path, "re-import the model").get("instruct") is True


def chat_model_dir(run_dir: Path) -> Path:
    """The run's SFT model, which later stages start from and compare with: DIR/sft, or, in a
    run imported from an instruct model with no sft stage of its own yet, DIR/base."""
    sft = run_dir / "sft"
    if not (sft / "model.safetensors").exists() and imported_instruct(run_dir):
        return run_dir / "base"
    return sft


def model_file(run_dir: Path, stage: str) -> Path:
    """Where `stage`'s weights are (present or not): "sft" follows `chat_model_dir`."""
    return (chat_model_dir(run_dir) if stage == "sft" else run_dir / stage) / "model.safetensors"


def stage_dir(run_dir: Path, stage: str | None = None) -> Path:
    """The folder of `stage`'s finished model in a run (default: the latest stage present;
    "sft" is `chat_model_dir`'s)."""
    if stage is not None:
        if stage not in MODEL_STAGES:
            raise EchoError(f"unknown stage '{stage}' (known: {', '.join(MODEL_STAGES)})")
        folder = model_file(run_dir, stage).parent
        if not (folder / "model.safetensors").exists():
            raise EchoError(f"{folder}: no finished '{stage}' model in this run")
        return folder
    present = [s for s in MODEL_STAGES if (run_dir / s / "model.safetensors").exists()]
    if not present:
        raise EchoError(f"{run_dir}: no trained model yet (run `echolm run --out {run_dir}`)")
    # prefer the furthest stage along the pipeline; dpo is a sibling of rlhf, not after it
    order = ("rlhf", "rl", "sft", "dpo", "base")
    return run_dir / next(s for s in order if s in present)
