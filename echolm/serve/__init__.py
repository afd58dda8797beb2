"""`echolm serve`: an OpenAI-compatible HTTP API and a web page over a run's models.

- `api`: the app put together (`create_app`) and the `serve` command;
- `gate`: the middleware in front of it (Host header against DNS rebinding, API key, body
  size, UTF-8);
- `errors`: errors in OpenAI's shape and the handlers that make every failure one;
- `models`: the run's stage checkpoints, loaded on first use;
- `jobs`: the server's state (admission, the engine thread) and each request's rows in it;
- `openai_routes`, `ranking_routes`: the /v1 endpoints; the page's rank mode (/api);
- `stream`: one server-sent-events streamer for chat and text completions;
- `batcher`: continuous batching, with the engine's sampler and UTF-8 streamer;
- `schemas`: request/response models; `limits`: `Limits` (no pydantic: the CLI reads it);
- `testing`: helpers for tests and benchmarks;
- `static/`: the page (chat, compare, rank, tokens; hand-written, no build step, no CDN).
"""
