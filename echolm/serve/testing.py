"""Helpers for the serve tests and benchmark: a small run directory with several stage
checkpoints, and a real uvicorn server on a free localhost port in a background thread."""

from __future__ import annotations

import math
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from echolm.serve.schemas import Limits

if TYPE_CHECKING:
    from echolm.serve.jobs import Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_stage_models(run: Path, stages: tuple[str, ...] = ("base", "sft", "rl"),
                     seed: int = 0, **shape: int) -> None:
    """Write a model checkpoint per stage into a run directory that has a tokenizer: the
    micro shape (or `shape` overrides), random weights of the scale training reaches (Echo
    zero-initialises output projections, which would make every token equally likely), a
    different draw per stage so the stages answer differently."""
    from echolm.checkpoint import save_model
    from echolm.config import ModelConfig
    from echolm.model import Transformer
    from echolm.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "tokenizer")
    dims = dict(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                max_seq_len=256)
    dims.update(shape)
    for k, stage in enumerate(stages):
        torch.manual_seed(seed + k)
        model = Transformer(ModelConfig(**dims))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name == "embed_tokens.weight":
                    p.normal_(0.0, 1.0)
                elif p.dim() == 2:
                    bound = math.sqrt(3.0 / p.shape[1])
                    p.uniform_(-bound, bound)
        save_model(model, run / stage)


def make_run(dst: Path, prepared: Path, stages: tuple[str, ...] = ("base", "sft", "rl")
             ) -> Path:
    """A run directory with `prepared`'s tokenizer and a model per stage (idempotent)."""
    if (dst / ".serve-ready").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(prepared / "tokenizer", dst / "tokenizer", dirs_exist_ok=True)
    add_stage_models(dst, stages)
    (dst / ".serve-ready").write_text("ok\n")
    return dst


class ServerThread:
    """`echolm serve` on 127.0.0.1:<free port> in a thread; a context manager."""

    def __init__(self, run: Path, limits: Limits | None = None, api_key: str | None = None,
                 port: int | None = None, allow_hosts: tuple[str, ...] = ()) -> None:
        import uvicorn

        from echolm.serve.api import create_app
        from echolm.serve.gate import HostPolicy

        self.app = create_app(run, limits, api_key, device="cpu",
                              hosts=HostPolicy("127.0.0.1", allow_hosts))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self) -> Server:  # the Server object behind the app
        return self.app.app.state.server

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def slow_down(server: ServerThread, stage: str, seconds: float) -> None:
    """Make every forward pass of `server`'s `stage` model take at least `seconds` (to test
    what happens while a generation is still running)."""
    model, _ = server.state.models.get(stage)
    fast = model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return fast(*args, **kwargs)

    model.forward = slow
