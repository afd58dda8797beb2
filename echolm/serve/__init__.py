"""`echolm serve`: an OpenAI-compatible HTTP API with continuous batching (`batcher`), its
request/response schemas and limits (`schemas`), the FastAPI app (`api`), and the web page
(`static/`: chat, compare, rank, tokens; hand-written, no build step, no CDN)."""
