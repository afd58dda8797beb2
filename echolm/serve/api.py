"""`echolm serve`: an OpenAI-compatible HTTP API and a web page over a run's models.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not;
temperature, top_p, top_k, max_tokens, stop, n, seed, logprobs), ``GET /v1/models`` (one model
per stage checkpoint present: echo-base, echo-sft, echo-rl, echo-rlhf, echo-dpo),
``GET /health``, the page at ``/``, and for its rank mode ``POST /api/samples`` (K answers,
stored in DIR/prefs.sqlite) and ``POST /api/rankings`` (a person's order, best first).

Every request shares one engine thread (`echolm.serve.batcher`): all active sequences decode
together, so throughput grows with concurrency. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 invalid request (bad JSON, invalid
UTF-8, wrong types, out-of-range values, a prompt longer than allowed), 401 missing/wrong API
key, 404 unknown model or path, 405 wrong method, 413 body too large, 429 too many requests in
flight, 500/503 engine failures. The OpenAPI schema at ``/openapi.json`` is generated from the
same models that validate requests, so its limits are the server's.
"""

import asyncio
import hashlib
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import anyio
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from echolm.checkpoint import MODEL_STAGES, load_model
from echolm.errors import EchoError
from echolm.serve.batcher import Engine, Event, GenRequest, RowParams
from echolm.serve.schemas import (
    ChatCompletion,
    Completion,
    ErrorResponse,
    Health,
    Limits,
    ModelInfo,
    ModelList,
    PrefCounts,
    RankingRequest,
    RankingResult,
    SampleResult,
    request_models,
)
from echolm.tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"
MODEL_PREFIX = "echo-"
API_KEY_ENV = "ECHOLM_API_KEY"
PROTECTED = ("/v1/", "/api/")


# ---- errors -------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({ctx})".replace(" ()", ""),
                        code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "the request needs a JSON body", code="missing_body")
    if first.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {msg}{more}" if param else f"{msg}{more}", param=param,
                    code="invalid_value")


ERRORS = {
    400: "invalid request: bad JSON or UTF-8, wrong types, values out of range, a prompt "
         "too long",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large",
    429: "too many requests in flight; retry",
    500: "the engine failed",
    503: "the engine is not running",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes}


# ---- the run's models ---------------------------------------------------------------------

class Models:
    """The stage checkpoints of a run, loaded on first use (and again if a file changes)."""

    def __init__(self, run_dir: Path, device: str) -> None:
        self.run_dir = run_dir
        self.device = device
        self.tok = Tokenizer.load(run_dir / "tokenizer")
        self._loaded: dict[str, tuple[tuple[float, int], Any, str]] = {}
        self._lock = threading.Lock()

    def present(self) -> list[str]:
        return [s for s in MODEL_STAGES if (self.run_dir / s / "model.safetensors").is_file()]

    def info(self) -> list[dict]:
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
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            ckpt = f"{stage}@{digest.hexdigest()[:12]}"
            self._loaded[stage] = (key, model, ckpt)
            return model, ckpt


# ---- middleware: body size, UTF-8, API key ------------------------------------------------

class Gate:
    """Pure ASGI middleware (it never buffers responses, so streaming stays streaming):
    checks the API key on /v1/ and /api/, caps the body size, rejects bodies that are not
    UTF-8, and hands the app the body it read."""

    def __init__(self, app: ASGIApp, max_body: int, api_key: str | None) -> None:
        self.app, self.max_body, self.api_key = app, max_body, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key and path.startswith(PROTECTED) and not self._authorized(scope):
            await self._drain(receive)
            await APIError(401, "incorrect or missing API key: send 'Authorization: Bearer "
                           "KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive,
                                                                              send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        too_big = APIError(413, f"the request body is larger than {self.max_body} bytes",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._drain(receive)
            await too_big.response()(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await self._drain(receive) if more else None
                await too_big.response()(scope, receive, send)
                return
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            await APIError(400, f"the request body is not valid UTF-8 (byte {e.start})",
                           code="invalid_encoding").response()(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(
                    token.strip().encode(), self.api_key.encode())
        return False

    @staticmethod
    async def _drain(receive: Receive, limit: int = 64 << 20) -> None:
        """Read (and drop) the rest of the body, so the client gets to read our answer."""
        seen = 0
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class EventStream(Response):
    """Server-sent events from an async iterator, cancelled the moment the client leaves
    (whatever the ASGI server's spec version), so its generation stops at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], job: "Job") -> None:
        self.body_iterator = content
        self.job = job
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                try:
                    await send({"type": "http.response.start", "status": 200,
                                "headers": self.raw_headers})
                    async for chunk in self.body_iterator:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    await send({"type": "http.response.body", "body": b"",
                                "more_body": False})
                except OSError:
                    pass
                finally:
                    tg.cancel_scope.cancel()

            async def listen() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            tg.start_soon(listen)
        try:
            await self.body_iterator.aclose()
        finally:
            self.job.close()  # also when the stream never started


# ---- the state of one server --------------------------------------------------------------

class Job:
    """One request's rows in the engine, seen from the event loop."""

    def __init__(self, server: "Server", model: Any, prompts: list[list[int]],
                 params: list[RowParams], stop_ids: tuple[int, ...]) -> None:
        self.server = server
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.req = GenRequest(model, prompts, params, self.queue.put_nowait, stop_ids)
        self.open = set(range(len(prompts)))
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


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _accumulate(row: dict, e: Event) -> None:
    if e.finish == "error":
        raise APIError(500, f"generation failed: {e.error}", type="server_error")
    row["text"].append(e.text)
    if e.token is not None:  # a token of the answer (the end token is not one)
        row["tokens"] += 1
    if e.logprob is not None:
        row["logprobs"].append(e.logprob)
    if e.finish:
        row["finish"] = e.finish


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
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
        self.stop_ids = (self.tok.assistant_end, self.tok.bos)
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
        stage = name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else None
        if stage not in MODEL_STAGES or stage not in self.models.present():
            known = ", ".join(MODEL_PREFIX + s for s in self.models.present())
            raise APIError(404, f"the model `{name}` does not exist (available: {known})",
                           param="model", code="model_not_found")
        hit = self.models.cached(stage)  # the usual case: no thread hop
        model, ckpt = hit or await asyncio.to_thread(self.models.get, stage)
        return stage, model, ckpt

    def check_prompt(self, ids: list[int], model: Any, param: str) -> None:
        ctx = model.cfg.max_seq_len
        limit = min(self.limits.max_prompt_tokens, ctx - 1)
        if len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server takes at most "
                           f"{limit} (the model's context is {ctx} tokens)", param=param,
                           code="context_length_exceeded")

    def max_new(self, asked: int | None, default: int, prompt_len: int, model: Any) -> int:
        room = model.cfg.max_seq_len - prompt_len
        return max(1, min(asked if asked is not None else default, room))

    def submit(self, model: Any, prompts: list[list[int]], params: list[RowParams]) -> Job:
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


def _content(content: Any) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# ---- the app ------------------------------------------------------------------------------

def create_app(run_dir: Path, limits: Limits | None = None, api_key: str | None = None,
               device: str | None = None) -> Gate:
    """The ASGI app: FastAPI behind the `Gate` middleware (its FastAPI app is `.app`)."""
    limits = limits or Limits()
    srv = Server(run_dir, limits, api_key, device)
    R = request_models(limits)
    ChatReq, ComplReq, SampleReq = R.ChatCompletionRequest, R.CompletionRequest, R.SampleRequest

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        srv.start()
        try:
            yield
        finally:
            srv.stop()

    app = FastAPI(title="Echo", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=__doc__)
    app.state.server = srv
    bearer = HTTPBearer(auto_error=False, description="the server's API key")

    async def auth(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                   ) -> None:
        # the Gate middleware has already checked the key; this declares it in the schema
        return None

    guard = [Depends(auth)] if api_key else []
    auth_errors = (401,) if api_key else ()

    # ---- error handlers -------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code,
                                                                         str(e.detail))
        return APIError(e.status_code, msg, code=code, headers=getattr(e, "headers", None)
                        ).response()

    @app.exception_handler(ClientGone)
    async def _gone(_r: Request, _e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening any more

    @app.exception_handler(Exception)
    async def _crash(_r: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}",
                        type="server_error").response()

    # ---- endpoints ------------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> dict:
        return {"status": "ok", "models": [MODEL_PREFIX + s for s in srv.models.present()],
                "auth": bool(api_key), "engine": srv.engine.stats() if srv.engine else {},
                "limits": asdict(limits)}

    @app.get("/v1/models", response_model=ModelList, dependencies=guard, tags=["openai"],
             responses=_errors(*auth_errors))
    async def list_models() -> dict:
        return {"object": "list", "data": [{"object": "model", "owned_by": "echolm", **m}
                                           for m in srv.models.info()]}

    @app.get("/v1/models/{model}", response_model=ModelInfo, dependencies=guard,
             tags=["openai"], responses=_errors(*auth_errors, 404))
    async def get_model(model: str) -> dict:
        for m in srv.models.info():
            if m["id"] == model:
                return {"object": "model", "owned_by": "echolm", **m}
        raise APIError(404, f"the model `{model}` does not exist", param="model",
                       code="model_not_found")

    stream_doc = {"text/event-stream": {"schema": {
        "type": "string", "description": "with stream=true: 'data: {chunk}' events "
        "(OpenAI's *.chunk objects), then 'data: [DONE]'"}}}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=guard,
              tags=["openai"], responses={200: {"content": stream_doc},
                                          **_errors(400, *auth_errors, 404, 413, 429, 500,
                                                    503)})
    async def chat_completions(body: ChatReq, request: Request) -> Response:
        stage, model, ckpt = await srv.resolve(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": _content(m.content)} for m in body.messages]
        try:
            prompt = srv.tok.render_prompt(messages)
        except EchoError as e:
            raise APIError(400, str(e), param="messages", code="invalid_messages") from None
        srv.check_prompt(prompt, model, "messages")
        if body.top_logprobs is not None and body.top_logprobs > 0 and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs",
                           code="invalid_value")
        asked = body.max_completion_tokens or body.max_tokens
        n = body.n or 1
        max_new = srv.max_new(asked, limits.max_tokens, len(prompt), model)
        params = [_row_params(body, max_new, i, bool(body.logprobs), body.top_logprobs or 0)
                  for i in range(n)]
        job = srv.submit(model, [prompt] * n, params)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.model, "system_fingerprint": ckpt}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(_stream_chat(job, meta, len(prompt), usage), job)
        try:
            rows = await job.collect(request)
        finally:
            job.close()
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(r["text"]),
                                            "refusal": None},
                    "logprobs": {"content": r["logprobs"]} if body.logprobs else None,
                    "finish_reason": r["finish"]} for i, r in sorted(rows.items())]
        done = sum(r["tokens"] for r in rows.values())
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                             "usage": _usage(len(prompt), done)})

    @app.post("/v1/completions", response_model=Completion, dependencies=guard,
              tags=["openai"], responses={200: {"content": stream_doc},
                                          **_errors(400, *auth_errors, 404, 413, 429, 500,
                                                    503)})
    async def completions(body: ComplReq, request: Request) -> Response:
        stage, model, ckpt = await srv.resolve(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        n = body.n or 1
        if not texts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt",
                           code="invalid_value")
        if len(texts) * n > limits.max_n:
            raise APIError(400, f"prompts x n = {len(texts) * n} exceeds {limits.max_n}",
                           param="n", code="invalid_value")
        prompts = [[srv.tok.bos, *srv.tok.encode(t)] for t in texts]
        for p in prompts:
            srv.check_prompt(p, model, "prompt")
        want = body.logprobs is not None
        rows, params = [], []
        for p in prompts:
            max_new = srv.max_new(body.max_tokens, 16, len(p), model)
            for j in range(n):
                rows.append(p)
                params.append(_row_params(body, max_new, j, want, body.logprobs or 0))
        job = srv.submit(model, rows, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.model, "system_fingerprint": ckpt}
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(_stream_completion(job, meta, prompt_tokens, usage, want), job)
        try:
            out = await job.collect(request)
        finally:
            job.close()
        choices = [{"index": i, "text": "".join(r["text"]),
                    "logprobs": _legacy_logprobs(r["logprobs"]) if want else None,
                    "finish_reason": r["finish"]} for i, r in sorted(out.items())]
        done = sum(r["tokens"] for r in out.values())
        return JSONResponse({**meta, "object": "text_completion", "choices": choices,
                             "usage": _usage(prompt_tokens, done)})

    # ---- the page's rank mode: the preference store -----------------------------------------
    @app.post("/api/samples", response_model=SampleResult, dependencies=guard, tags=["echo"],
              responses=_errors(400, *auth_errors, 404, 413, 429, 500, 503),
              summary="K answers to one prompt, stored (unranked) in DIR/prefs.sqlite")
    async def samples(body: SampleReq, request: Request) -> dict:
        stage, model, ckpt = await srv.resolve(body.model)
        prompt = srv.tok.render_prompt([{"role": "user", "content": body.prompt}])
        srv.check_prompt(prompt, model, "prompt")
        max_new = srv.max_new(body.max_tokens, limits.max_tokens, len(prompt), model)
        params = [RowParams(max_new=max_new, temperature=body.temperature, top_p=body.top_p,
                            seed=row_seed(body.seed, i)) for i in range(body.n)]
        job = srv.submit(model, [prompt] * body.n, params)
        try:
            rows = await job.collect(request)
        finally:
            job.close()
        texts = ["".join(rows[i]["text"]) for i in range(body.n)]
        sampling = {"temperature": body.temperature, "top_p": body.top_p,
                    "max_tokens": max_new, "seed": body.seed, "model": body.model}

        def store() -> tuple[int, list[int]]:
            from echolm.prefs import PreferenceStore

            db = PreferenceStore(srv.run_dir / "prefs.sqlite")
            try:
                pid = db.add_prompt(body.prompt, source="serve")
                return pid, db.add_responses(pid, texts, stage=stage, checkpoint=ckpt,
                                             sampling=sampling)
            finally:
                db.close()

        pid, ids = await asyncio.to_thread(store)
        return {"prompt_id": pid, "prompt": body.prompt, "model": body.model, "stage": stage,
                "checkpoint": ckpt, "sampling": sampling,
                "responses": [{"id": rid, "text": t, "finish_reason": rows[i]["finish"]}
                              for i, (rid, t) in enumerate(zip(ids, texts, strict=True))]}

    @app.post("/api/rankings", response_model=RankingResult, dependencies=guard,
              tags=["echo"], responses=_errors(400, *auth_errors, 413),
              summary="store a person's order over sampled answers (best first)")
    async def rankings(body: RankingRequest) -> dict:
        def store() -> tuple[int, dict]:
            from echolm.prefs import PreferenceStore

            db = PreferenceStore(srv.run_dir / "prefs.sqlite")
            try:
                rid = db.add_ranking(body.prompt_id, body.response_ids, body.annotator.strip())
                return rid, db.counts()
            finally:
                db.close()

        try:
            rid, counts = await asyncio.to_thread(store)
        except EchoError as e:
            raise APIError(400, str(e), param="response_ids", code="invalid_ranking") from None
        return {"ranking_id": rid, "counts": counts}

    @app.get("/api/prefs", response_model=PrefCounts, dependencies=guard, tags=["echo"],
             responses=_errors(*auth_errors), summary="how much the preference store holds")
    async def prefs() -> dict:
        path = srv.run_dir / "prefs.sqlite"
        if not path.exists():
            return {"path": str(path), "counts": {"prompts": 0, "responses": 0, "rankings": 0}}

        def count() -> dict:
            from echolm.prefs import PreferenceStore

            db = PreferenceStore(path)
            try:
                return db.counts()
            finally:
                db.close()

        return {"path": str(path), "counts": await asyncio.to_thread(count)}

    # ---- the page -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)  # validation errors are 400s here
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return Gate(app, limits.max_body_bytes, api_key)


def _row_params(body: Any, max_new: int, i: int, logprobs: bool, top: int) -> RowParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return RowParams(max_new=max_new,
                     temperature=1.0 if body.temperature is None else body.temperature,
                     top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                     seed=row_seed(body.seed, i), logprobs=logprobs, top_logprobs=top,
                     stop=stop)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _legacy_logprobs(entries: list[dict]) -> dict:
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


async def _stream_chat(job: Job, meta: dict, prompt_tokens: int, usage: bool
                       ) -> AsyncIterator[bytes]:
    base = {**meta, "object": "chat.completion.chunk"}
    done = 0
    try:
        yield b"".join(_sse({**base, "choices": [{
            "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}]}) for i in range(len(job.prompts)))
        while job.open:
            events = await job.next()
            parts = []
            for index, evs in _by_row(events).items():
                err = next((e for e in evs if e.finish == "error"), None)
                if err is not None:
                    parts.append(_sse(APIError(500, f"generation failed: {err.error}",
                                               type="server_error").body()))
                    job.open.clear()
                    break
                lps = [e.logprob for e in evs if e.logprob is not None]
                done += sum(1 for e in evs if _counts(e))
                finish = next((e.finish for e in evs if e.finish), None)
                text = "".join(e.text for e in evs)
                if not text and not finish and not lps:
                    continue
                parts.append(_sse({**base, "choices": [{
                    "index": index, "delta": {"content": text} if text else {},
                    "logprobs": {"content": lps} if lps else None,
                    "finish_reason": finish}]}))
            if parts:
                yield b"".join(parts)
        if usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, done)})
        yield b"data: [DONE]\n\n"
    finally:
        job.close()


async def _stream_completion(job: Job, meta: dict, prompt_tokens: int, usage: bool,
                             want_logprobs: bool) -> AsyncIterator[bytes]:
    base = {**meta, "object": "text_completion"}
    done = 0
    try:
        while job.open:
            events = await job.next()
            parts = []
            for index, evs in _by_row(events).items():
                err = next((e for e in evs if e.finish == "error"), None)
                if err is not None:
                    parts.append(_sse(APIError(500, f"generation failed: {err.error}",
                                               type="server_error").body()))
                    job.open.clear()
                    break
                lps = [e.logprob for e in evs if e.logprob is not None]
                done += sum(1 for e in evs if _counts(e))
                finish = next((e.finish for e in evs if e.finish), None)
                text = "".join(e.text for e in evs)
                if not text and not finish:
                    continue
                parts.append(_sse({**base, "choices": [{
                    "index": index, "text": text,
                    "logprobs": _legacy_logprobs(lps) if want_logprobs else None,
                    "finish_reason": finish}]}))
            if parts:
                yield b"".join(parts)
        if usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, done)})
        yield b"data: [DONE]\n\n"
    finally:
        job.close()


def _by_row(events: list[Event]) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {}
    for e in events:
        out.setdefault(e.index, []).append(e)
    return out


def _counts(e: Event) -> bool:
    """Whether an event's token is part of the answer (the end token is not)."""
    return e.token is not None


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, device: str | None = None,
          threads: int | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted (the `echolm serve` command)."""
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(run_dir, limits, api_key, device)
    where = f"http://{host}:{port}"
    print(f"echolm serve: {run_dir} on {where}  (page: {where}/, API: {where}/v1, schema: "
          f"{where}/openapi.json{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)
