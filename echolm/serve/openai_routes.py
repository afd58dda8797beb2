"""OpenAI's endpoints: ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not), and the two
chunk formats their streams differ by."""

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from echolm.errors import EchoError
from echolm.serve.batcher import RowParams
from echolm.serve.errors import APIError, error_responses
from echolm.serve.jobs import Server, row_seed
from echolm.serve.schemas import ChatCompletion, Completion, ModelInfo, ModelList
from echolm.serve.stream import EventStream, stream_job, usage

STREAM_DOC = {"text/event-stream": {"schema": {
    "type": "string", "description": "with stream=true: 'data: {chunk}' events "
    "(OpenAI's *.chunk objects), then 'data: [DONE]'"}}}


def openai_routes(srv: Server, chat_request: type, completion_request: type,
                  guard: list, auth_errors: tuple[int, ...]) -> APIRouter:
    """The routes, for server `srv`: its request models (`echolm.serve.schemas.
    request_models`, built for its limits), and `guard`, the API-key dependency if any."""
    router = APIRouter()
    limits = srv.limits
    generating = {200: {"content": STREAM_DOC},
                  **error_responses(400, *auth_errors, 404, 413, 429, 500, 503)}

    @router.get("/v1/models", response_model=ModelList, dependencies=guard, tags=["openai"],
                responses=error_responses(*auth_errors))
    async def list_models() -> dict:
        return {"object": "list", "data": [{"object": "model", "owned_by": "echolm", **m}
                                           for m in srv.models.info()]}

    @router.get("/v1/models/{model}", response_model=ModelInfo, dependencies=guard,
                tags=["openai"], responses=error_responses(*auth_errors, 404))
    async def get_model(model: str) -> dict:
        for m in srv.models.info():
            if m["id"] == model:
                return {"object": "model", "owned_by": "echolm", **m}
        raise APIError(404, f"the model `{model}` does not exist", param="model",
                       code="model_not_found")

    @router.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=guard,
                 tags=["openai"], responses=generating)
    async def chat_completions(body: chat_request, request: Request) -> Response:
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
        params = [row_params(body, max_new, i, bool(body.logprobs), body.top_logprobs or 0)
                  for i in range(n)]
        job = srv.submit(model, [prompt] * n, params)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.model, "system_fingerprint": ckpt}
        if body.stream:
            opening = [{"index": i, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None} for i in range(n)]
            return EventStream(stream_job(job, {**meta, "object": "chat.completion.chunk"},
                                          len(prompt), _include_usage(body), chat_choice,
                                          opening), job)
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
                             "usage": usage(len(prompt), done)})

    @router.post("/v1/completions", response_model=Completion, dependencies=guard,
                 tags=["openai"], responses=generating)
    async def completions(body: completion_request, request: Request) -> Response:
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
                params.append(row_params(body, max_new, j, want, body.logprobs or 0))
        job = srv.submit(model, rows, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.model, "system_fingerprint": ckpt}
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            def choice(index: int, text: str, lps: list[dict], finish: str | None
                       ) -> dict | None:
                return completion_choice(index, text, lps, finish, want)

            return EventStream(stream_job(job, {**meta, "object": "text_completion"},
                                          prompt_tokens, _include_usage(body), choice), job)
        try:
            out = await job.collect(request)
        finally:
            job.close()
        choices = [{"index": i, "text": "".join(r["text"]),
                    "logprobs": legacy_logprobs(r["logprobs"]) if want else None,
                    "finish_reason": r["finish"]} for i, r in sorted(out.items())]
        done = sum(r["tokens"] for r in out.values())
        return JSONResponse({**meta, "object": "text_completion", "choices": choices,
                             "usage": usage(prompt_tokens, done)})

    return router


# ---- the two chunk formats ------------------------------------------------------------------

def chat_choice(index: int, text: str, lps: list[dict], finish: str | None) -> dict | None:
    """A chat.completion.chunk choice: the new text as a delta (sent when there is text, a
    logprob or a finish reason)."""
    if not text and not finish and not lps:
        return None
    return {"index": index, "delta": {"content": text} if text else {},
            "logprobs": {"content": lps} if lps else None, "finish_reason": finish}


def completion_choice(index: int, text: str, lps: list[dict], finish: str | None,
                      want_logprobs: bool) -> dict | None:
    """A text_completion chunk choice (sent when there is text, a wanted logprob or a finish
    reason: a token that ends inside a UTF-8 character has no text yet, but its logprob is
    due now)."""
    if not text and not finish and not (want_logprobs and lps):
        return None
    return {"index": index, "text": text,
            "logprobs": legacy_logprobs(lps) if want_logprobs else None,
            "finish_reason": finish}


# ---- requests into engine rows, logprobs into the legacy shape ------------------------------

def row_params(body: Any, max_new: int, i: int, logprobs: bool, top: int) -> RowParams:
    """How choice `i` of a request samples."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return RowParams(max_new=max_new,
                     temperature=1.0 if body.temperature is None else body.temperature,
                     top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                     seed=row_seed(body.seed, i), logprobs=logprobs, top_logprobs=top,
                     stop=stop)


def legacy_logprobs(entries: list[dict]) -> dict:
    """Chat-style logprob entries in /v1/completions' shape (parallel lists and offsets)."""
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _content(content: Any) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)

