"""The models a server offers: one per stage checkpoint present in the run directory
(echo-base, echo-sft, ...), loaded on first use and again when its file changes."""

import json
import threading
from pathlib import Path
from typing import Any

from echolm.checkpoint import MODEL_STAGES, file_fingerprint, load_model
from echolm.errors import EchoError
from echolm.serve.errors import APIError
from echolm.tokenizer import Tokenizer

MODEL_PREFIX = "echo-"


class Models:
    """The stage checkpoints of a run, loaded on first use (and again if a file changes)."""

    def __init__(self, run_dir: Path, device: str) -> None:
        self.run_dir = run_dir
        self.device = device
        self.tok = Tokenizer.load(run_dir / "tokenizer")
        self._loaded: dict[str, tuple[tuple[float, int], Any, str]] = {}
        self._lock = threading.Lock()

    def present(self) -> list[str]:
        """The stages with a model file, in pipeline order."""
        return [s for s in MODEL_STAGES if (self.run_dir / s / "model.safetensors").is_file()]

    def info(self) -> list[dict]:
        """One entry per model present: id, created, stage, checkpoint, context_length."""
        out = []
        for stage in self.present():
            file = self.run_dir / stage / "model.safetensors"
            try:
                cfg = json.loads((file.parent / "config.json").read_text())
                st = file.stat()
            except (OSError, ValueError):
                continue
            loaded = self._loaded.get(stage)
            ckpt = loaded[2] if loaded and loaded[0] == (st.st_mtime, st.st_size) else \
                f"{stage}@{int(st.st_mtime)}"
            out.append({"id": MODEL_PREFIX + stage, "created": int(st.st_mtime),
                        "stage": stage, "checkpoint": ckpt,
                        "context_length": int(cfg.get("max_seq_len", 0))})
        return out

    def cached(self, stage: str) -> tuple[Any, str] | None:
        """The loaded model of a stage if its file has not changed since (no loading)."""
        loaded = self._loaded.get(stage)
        if loaded is None:
            return None
        try:
            st = (self.run_dir / stage / "model.safetensors").stat()
        except OSError:
            return None
        return (loaded[1], loaded[2]) if loaded[0] == (st.st_mtime, st.st_size) else None

    def get(self, stage: str) -> tuple[Any, str]:
        """(model, checkpoint id) for a stage; the checkpoint id names its weights' hash."""
        file = self.run_dir / stage / "model.safetensors"
        with self._lock:
            try:
                st = file.stat()
            except OSError:
                raise APIError(404, f"the model `{MODEL_PREFIX}{stage}` does not exist",
                               code="model_not_found", param="model") from None
            key = (st.st_mtime, st.st_size)
            cached = self._loaded.get(stage)
            if cached and cached[0] == key:
                return cached[1], cached[2]
            try:
                model = load_model(file.parent, self.device).eval()
            except EchoError as e:
                raise APIError(500, f"cannot load {stage}: {e}", type="server_error") from None
            if model.cfg.vocab_size < self.tok.vocab_size:
                raise APIError(500, f"{stage}: model vocabulary is smaller than the "
                               "tokenizer's", type="server_error")
            ckpt = f"{stage}@{file_fingerprint(file)[:12]}"  # sha256 of the weights
            self._loaded[stage] = (key, model, ckpt)
            return model, ckpt
