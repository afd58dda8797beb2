"""Load on `echolm serve`: 1, 8, 32 and 64 concurrent streaming chat clients against a real
server process; aggregate generated tokens per second and time to first token.

The server is `python -m echolm serve` in its own process on a free localhost port (by default
with one torch thread, `--threads`). The model: `--run DIR` (its `--stage`, default the latest),
or else a fresh "cpu"-shaped one (4 layers, 256 wide, 4 heads / 2 KV heads, 512 context, the
shape of the cpu preset) with random weights and a BPE tokenizer trained on generated text, so
the benchmark needs no training run. Random weights rarely emit an end token, so answers run
to `--max-tokens` and every level does comparable work.

Each client sends its requests one after another (streaming, `stream_options.include_usage`)
and counts the tokens the server reports; each level runs `max(2, 32 // clients)` rounds so
every level makes at least 32 requests. A request counts as completed when it returned 200 and
ended with `data: [DONE]`; anything else is dropped (the benchmark fails if any is). Time to
first token (TTFT) is from sending the request to the first chunk that carries a token (the
opening role-only chunk does not count).

    python bench/serve_load.py                    # build the cpu-shaped model, 1/8/32/64 clients
    python bench/serve_load.py --run runs/demo --clients 1,32 --max-tokens 48

The last line of stdout is one JSON object: ours = tok/s with 32 clients, peer = tok/s with 1
client (the same server without concurrency), ratio = ours / peer (goal: >= 4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit_json

SUBJECTS = ["the farmer", "a small dog", "the river", "the engineer", "a red bird", "the baker",
            "the city council", "our neighbour", "the last train", "a curious child"]
VERBS = ["saw", "built", "carried", "painted", "followed", "opened", "found", "repaired"]
OBJECTS = ["the wooden bridge", "a letter", "seven green apples", "the broken clock",
           "an empty basket", "the northern road", "a song about winter", "the blue door"]


def sentences(rng: random.Random, n: int) -> str:
    return " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} "
                    f"{rng.choice(OBJECTS)}." for _ in range(n))


def build_run(folder: Path, seed: int = 0) -> Path:
    """A run directory with a 4096-token BPE tokenizer and a cpu-shaped random model."""
    import torch

    from echolm.serve.testing import add_stage_models
    from echolm.tokenizer import train_tokenizer

    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in ["a", "e", "i", "o", "u", "ai",
                                                             "ou", "ea"]]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
             for _ in range(20000)]  # enough distinct words for 4096 merges
    texts = [sentences(rng, 3) + " " + " ".join(rng.choices(words, k=200)) + "."
             for _ in range(3000)]
    tok = train_tokenizer(texts, vocab_size=4096)
    tok.save(folder / "tokenizer")
    torch.manual_seed(seed)
    add_stage_models(folder, ("sft",), seed=seed, n_layer=4, n_embd=256, n_head=4,
                     n_kv_head=2, max_seq_len=512)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, threads: int, max_batch: int, device: str | None
                 ) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("ECHOLM_API_KEY", None)
    cmd = [sys.executable, "-m", "echolm", "serve", "--run", str(run), "--port", str(port),
           "--threads", str(threads), "--max-concurrent", "256", "--max-batch",
           str(max_batch), "--max-tokens", "4096"]
    if device:
        cmd += ["--device", device]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


async def wait_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read()}")
            try:
                r = await c.get(url + "/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            await asyncio.sleep(0.2)


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int,
                      seed: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, done, status = None, 0, False, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 timeout=600) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for ch in chunk.get("choices", []):
                    if ttft is None and "role" not in ch.get("delta", {}):
                        ttft = time.perf_counter() - t0
    except Exception as e:  # counted as dropped below
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "tokens": 0, "ttft": None}
    return {"ok": status == 200 and done, "error": None if done else f"status {status}",
            "tokens": tokens, "ttft": ttft}


async def level(url: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    rng = random.Random(clients)
    async with httpx.AsyncClient(limits=limits) as c:
        async def client(k: int) -> list[dict]:
            out = []
            for r in range(rounds):
                prompt = f"Request {k}.{r}: " + sentences(rng, 2)
                out.append(await one_request(c, url, model, prompt, max_tokens,
                                             seed=k * 1000 + r))
            return out

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(client(k) for k in range(clients)))
                   for x in xs]
        seconds = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in ok)

    def pct(q: float) -> float:
        if not ttfts:
            return float("nan")
        return ttfts[min(len(ttfts) - 1, round(q * (len(ttfts) - 1)))] * 1000

    return {"clients": clients, "requests": len(results), "completed": len(ok),
            "dropped": len(results) - len(ok), "tokens": tokens, "seconds": round(seconds, 3),
            "tok_s": round(tokens / seconds, 1), "ttft_p50_ms": round(pct(0.5), 1),
            "ttft_p99_ms": round(pct(0.99), 1),
            "tokens_per_request": round(statistics.mean(r["tokens"] for r in ok), 1)
            if ok else 0, "errors": sorted({r["error"] for r in results if not r["ok"]})[:3]}


async def main_async(args: argparse.Namespace, run: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(run, port, args.threads, args.max_batch, args.device)
    try:
        health = await wait_up(url, proc)
        model = f"echo-{args.stage}" if args.stage else health["models"][-1]
        if model not in health["models"]:
            raise SystemExit(f"{model} is not served (models: {health['models']})")
        await level(url, model, 1, 1, 8)  # warm up: load the model, first allocations
        levels = []
        for n in args.clients:
            rounds = max(2, 32 // n)
            res = await level(url, model, n, rounds, args.max_tokens)
            levels.append(res)
            print(f"{n:>3} clients: {res['completed']}/{res['requests']} completed, "
                  f"{res['tokens']} tokens in {res['seconds']:.1f} s = {res['tok_s']:.0f} "
                  f"tok/s; TTFT p50 {res['ttft_p50_ms']:.0f} ms, p99 "
                  f"{res['ttft_p99_ms']:.0f} ms", flush=True)
        return {"model": model, "levels": levels}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="serve this run (default: build a "
                    "cpu-shaped random model)")
    ap.add_argument("--stage", default=None, help="stage to load (default: the latest)")
    ap.add_argument("--clients", default="1,8,32,64",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    ap.add_argument("--device", default=None, help="the server's --device")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        run = args.run
        t0 = time.perf_counter()
        if run is None:
            run = build_run(Path(tmp) / "run")
            print(f"built a cpu-shaped random model in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        out = asyncio.run(main_async(args, run))
        stage = out["model"].removeprefix("echo-")
        config = json.loads((run / stage / "config.json").read_text())
    by = {lv["clients"]: lv for lv in out["levels"]}
    dropped = sum(lv["dropped"] for lv in out["levels"])
    ours = by.get(32, out["levels"][-1])["tok_s"]
    peer = by.get(1, out["levels"][0])["tok_s"]
    detail = {"model": out["model"], "run": str(args.run) if args.run else "cpu-shaped random",
              "max_tokens": args.max_tokens, "server_threads": args.threads,
              "max_batch": args.max_batch, "dropped": dropped,
              "model_config": {k: config[k] for k in ("vocab_size", "n_layer", "n_embd",
                                                      "n_head", "n_kv_head", "max_seq_len")},
              "levels": {str(lv["clients"]): {k: v for k, v in lv.items() if k != "clients"}
                         for lv in out["levels"]}}
    emit_json({"bench": "serve_load", "ours": ours, "peer": peer,
               "ratio": round(ours / peer, 2) if peer else None, "unit": "tok/s",
               "detail": detail})
    if dropped:
        sys.exit(f"{dropped} requests were dropped")


if __name__ == "__main__":
    main()
