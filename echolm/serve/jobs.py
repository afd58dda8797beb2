"""The state of one server and of each request in it.

`Server` owns the run's `Models`, the engine thread (`echolm.serve.batcher.Engine`) and the
count of requests in flight: `submit` admits a request (503 if the engine is down, 429 past
`max_concurrent`) and hands its rows to the engine as a `Job`. A `Job` is those rows seen from
the event loop: the engine thread queues their events, `next` / `collect` wait for them, and
`close` cancels whatever is still running and gives the request's slot back.
"""

import asyncio
from pathlib import Path
from typing import Any

import torch
from fastapi import Request

from echolm.checkpoint import MODEL_STAGES
from echolm.errors import EchoError
from echolm.serve.batcher import Engine, Event, GenRequest, RowParams
from echolm.serve.errors import APIError, ClientGone
from echolm.serve.models import MODEL_PREFIX, Models
from echolm.serve.schemas import Limits


class Job:
    """One request's rows in the engine, seen from the event loop."""

    def __init__(self, server: "Server", model: Any, prompts: list[list[int]],
                 params: list[RowParams], stop_ids: tuple[int, ...]) -> None:
        self.server = server
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.req = GenRequest(model, prompts, params, self.queue.put_nowait, stop_ids)
        self.open = set(range(len(prompts)))  # rows not finished yet
        self.prompts = prompts
        self.closed = False

    async def next(self) -> list[Event]:
        """Events of every row since the last call (waits for at least one step)."""
        events = list(await self.queue.get())
        while not self.queue.empty():
            events += self.queue.get_nowait()
        for e in events:
            if e.finish:
                self.open.discard(e.index)
        return events

    async def collect(self, request: Request) -> dict[int, dict]:
        """Wait for every row; returns per row {text, tokens, logprobs, finish}. A client
        that leaves cancels the rows at once."""
        out = {i: {"text": [], "tokens": 0, "logprobs": [], "finish": None}
               for i in range(len(self.prompts))}
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            while self.open:
                getter = asyncio.ensure_future(self.next())
                done, _ = await asyncio.wait({getter, watcher},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    raise ClientGone
                for e in getter.result():
                    _accumulate(out[e.index], e)
        finally:
            watcher.cancel()
        return out

    def close(self) -> None:
        """Cancel what is left and give the request's slot back (once, however often)."""
        if self.closed:
            return
        self.closed = True
        if self.open:
            self.req.cancel()
            self.server.engine.wake()
        self.server.release()


def counts(e: Event) -> bool:
    """Whether an event's token is part of the answer (the end token is not)."""
    return e.token is not None


def _accumulate(row: dict, e: Event) -> None:
    if e.finish == "error":
        raise APIError(500, f"generation failed: {e.error}", type="server_error")
    row["text"].append(e.text)
    if counts(e):
        row["tokens"] += 1
    if e.logprob is not None:
        row["logprobs"].append(e.logprob)
    if e.finish:
        row["finish"] = e.finish


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    """One server's run, limits, models and engine, and its requests in flight."""

    def __init__(self, run_dir: Path, limits: Limits, api_key: str | None,
                 device: str | None) -> None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise EchoError(f"{run_dir}: no such run directory")
        limits.validate()
        self.run_dir, self.limits, self.api_key = run_dir, limits, api_key
        self.models = Models(run_dir, device or ("cuda" if torch.cuda.is_available()
                                                 else "cpu"))
        if not self.models.present():
            raise EchoError(f"{run_dir}: no trained model yet (run `echolm run --out "
                            f"{run_dir}`)")
        self.tok = self.models.tok
        self.stop_ids = self.tok.stop_ids
        self.inflight = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: Engine | None = None

    # lifecycle (inside the event loop)
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.engine = Engine(self.tok, max_batch=self.limits.max_batch, deliver=self._deliver)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def _deliver(self, outputs: list[tuple[GenRequest, list[Event]]]) -> None:
        """Called on the engine thread: hand each request its events on the event loop."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return

        def dispatch() -> None:
            for req, events in outputs:
                req.sink(events)

        try:
            loop.call_soon_threadsafe(dispatch)
        except RuntimeError:  # the loop closed while shutting down
            pass

    # admission
    def acquire(self) -> None:
        if self.engine is None or not self.engine.alive:
            raise APIError(503, "the engine is not running", type="server_error",
                           code="engine_down")
        if self.inflight >= self.limits.max_concurrent:
            raise APIError(429, f"too many requests in flight (limit "
                           f"{self.limits.max_concurrent}); retry shortly",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    async def resolve(self, name: str) -> tuple[str, Any, str]:
        """(stage, model, checkpoint id) for a model name such as echo-sft; 404 if absent."""
        stage = name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else None
        if stage not in MODEL_STAGES or stage not in self.models.present():
            known = ", ".join(MODEL_PREFIX + s for s in self.models.present())
            raise APIError(404, f"the model `{name}` does not exist (available: {known})",
                           param="model", code="model_not_found")
        hit = self.models.cached(stage)  # the usual case: no thread hop
        model, ckpt = hit or await asyncio.to_thread(self.models.get, stage)
        return stage, model, ckpt

    def check_prompt(self, ids: list[int], model: Any, param: str) -> None:
        """400 if a prompt is longer than this server takes or leaves the model no room."""
        ctx = model.cfg.max_seq_len
        limit = min(self.limits.max_prompt_tokens, ctx - 1)
        if len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server takes at most "
                           f"{limit} (the model's context is {ctx} tokens)", param=param,
                           code="context_length_exceeded")

    def max_new(self, asked: int | None, default: int, prompt_len: int, model: Any) -> int:
        """How many tokens to generate: what was asked (or `default`), within the context."""
        room = model.cfg.max_seq_len - prompt_len
        return max(1, min(asked if asked is not None else default, room))

    def submit(self, model: Any, prompts: list[list[int]], params: list[RowParams]) -> Job:
        """Admit a request and start its rows; the caller must `close()` the job."""
        self.acquire()
        try:
            job = Job(self, model, prompts, params, self.stop_ids)
            self.engine.submit(job.req)
        except BaseException:
            self.release()
            raise
        return job


def row_seed(seed: int | None, i: int) -> int | None:
    """Choice 0 uses the seed itself (so n=1 and n>1 agree on it); others derive from it."""
    if seed is None:
        return None
    return seed if i == 0 else (seed * 1_000_003 + i * 7_919) % (2**63)
