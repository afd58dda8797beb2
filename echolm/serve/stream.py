"""Streaming answers: server-sent events of a job's rows as the engine makes them.

One streamer (`stream_job`) for chat and text completions alike; what differs between them is
how one row's new text, logprobs and finish reason become a choice of a chunk, which the
caller passes in (`echolm.serve.openai_routes` has the two formats).
"""

import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from echolm.serve.batcher import Event
from echolm.serve.errors import APIError
from echolm.serve.jobs import Job, counts

# (row index, new text, new logprob entries, finish reason or None) -> a chunk's choice, or
# None when there is nothing to send for that row this step
ChunkChoice = Callable[[int, str, list[dict], str | None], dict | None]


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def usage(prompt: int, completion: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def stream_job(job: Job, base: dict, prompt_tokens: int, with_usage: bool,
                     choice: ChunkChoice, opening: Iterable[dict] = ()
                     ) -> AsyncIterator[bytes]:
    """The events of a streamed answer: a chunk for each of the `opening` choices, then at
    every engine step one chunk per row that has something to send (`choice` makes it), a
    usage chunk if asked for, then ``data: [DONE]``. A failed generation sends an error event
    instead and ends the answer. `base` is every chunk's fields but its choices (id, created,
    model, system_fingerprint, object). Closes the job however the stream ends."""
    done = 0
    try:
        first = b"".join(sse({**base, "choices": [c]}) for c in opening)
        if first:
            yield first
        while job.open:
            parts = []
            for index, evs in _by_row(await job.next()).items():
                err = next((e for e in evs if e.finish == "error"), None)
                if err is not None:
                    parts.append(sse(APIError(500, f"generation failed: {err.error}",
                                              type="server_error").body()))
                    job.open.clear()
                    break
                done += sum(1 for e in evs if counts(e))
                c = choice(index, "".join(e.text for e in evs),
                           [e.logprob for e in evs if e.logprob is not None],
                           next((e.finish for e in evs if e.finish), None))
                if c is not None:
                    parts.append(sse({**base, "choices": [c]}))
            if parts:
                yield b"".join(parts)
        if with_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, done)})
        yield b"data: [DONE]\n\n"
    finally:
        job.close()


def _by_row(events: list[Event]) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {}
    for e in events:
        out.setdefault(e.index, []).append(e)
    return out


class EventStream(Response):
    """Server-sent events from an async iterator, cancelled the moment the client leaves
    (whatever the ASGI server's spec version), so its generation stops at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], job: Job) -> None:
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
