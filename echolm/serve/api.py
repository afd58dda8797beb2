"""`echolm serve`: an OpenAI-compatible HTTP API and a web page over a run's models.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not;
temperature, top_p, top_k, max_tokens, stop, n, seed, logprobs), ``GET /v1/models`` (one model
per stage checkpoint present: echo-base, echo-sft, echo-rl, echo-rlhf, echo-dpo),
``GET /health``, the page at ``/``, and for its rank mode ``POST /api/samples`` (K answers,
stored in DIR/prefs.sqlite) and ``POST /api/rankings`` (a person's order, best first; names
starting with "simulated" are the simulated annotator's and refused).

Every request shares one engine thread (`echolm.serve.batcher`): all active sequences decode
together, so throughput grows with concurrency. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 invalid request (bad JSON, invalid
UTF-8, wrong types, out-of-range values, a prompt longer than allowed), 401 missing/wrong API
key, 404 unknown model or path, 405 wrong method, 413 body too large, 421 a Host header this
server does not answer (against DNS rebinding; see `HostPolicy`, ``--allow-host``), 429 too
many requests in flight, 500/503 engine failures. The OpenAPI schema at ``/openapi.json`` is
generated from the same models that validate requests, so its limits are the server's.
"""

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from echolm.serve.errors import add_error_handlers, error_responses
from echolm.serve.gate import Gate, HostPolicy
from echolm.serve.jobs import Server
from echolm.serve.models import MODEL_PREFIX
from echolm.serve.openai_routes import openai_routes
from echolm.serve.ranking_routes import ranking_routes
from echolm.serve.schemas import Health, Limits, request_models

STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "ECHOLM_API_KEY"


def create_app(run_dir: Path, limits: Limits | None = None, api_key: str | None = None,
               device: str | None = None, hosts: HostPolicy | None = None) -> Gate:
    """The ASGI app: FastAPI behind the `Gate` middleware (its FastAPI app is `.app`),
    answering the Host names `hosts` allows (default: localhost, 127.0.0.1, ::1).

    Here: /health, the page and the schema; the /v1 routes come from `openai_routes`, the
    /api routes from `ranking_routes`, both built for this server's limits and API key."""
    limits = limits or Limits()
    srv = Server(run_dir, limits, api_key, device)
    R = request_models(limits)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        srv.start()
        try:
            yield
        finally:
            srv.stop()

    app = FastAPI(title="Echo", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=__doc__, responses=error_responses(421))  # the Gate, any path
    app.state.server = srv
    bearer = HTTPBearer(auto_error=False, description="the server's API key")

    async def auth(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                   ) -> None:
        # the Gate middleware has already checked the key; this declares it in the schema
        return None

    guard = [Depends(auth)] if api_key else []
    auth_errors = (401,) if api_key else ()
    add_error_handlers(app)

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> dict:
        return {"status": "ok", "models": [MODEL_PREFIX + s for s in srv.models.present()],
                "auth": bool(api_key), "engine": srv.engine.stats() if srv.engine else {},
                "limits": asdict(limits)}

    app.include_router(openai_routes(srv, R.ChatCompletionRequest, R.CompletionRequest,
                                     guard, auth_errors))
    app.include_router(ranking_routes(srv, R.SampleRequest, guard, auth_errors))

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
    return Gate(app, limits.max_body_bytes, api_key, hosts)


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, device: str | None = None,
          threads: int | None = None, log_level: str = "info",
          allow_hosts: Sequence[str] = ()) -> None:
    """Run the server until interrupted (the `echolm serve` command). `allow_hosts`: Host
    names answered besides the default ones (`HostPolicy`); "*" = any."""
    import uvicorn

    hosts = HostPolicy(host, allow_hosts)  # first: a bad name fails before the models load
    if threads:
        torch.set_num_threads(threads)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(run_dir, limits, api_key, device, hosts)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"echolm serve: {run_dir} on {where}  (page: {where}/, API: {where}/v1, schema: "
          f"{where}/openapi.json{', API key required' if api_key else ''}; answers "
          f"{hosts.describe()})", flush=True)
    if hosts.any:  # loopback too: a server on 127.0.0.1 is what rebinding aims at
        print("echolm serve: warning: --allow-host '*' answers every Host name; use it only "
              "behind a reverse proxy that checks Host (else any web page can reach this API "
              "by DNS rebinding)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)
