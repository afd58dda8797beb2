"""`echolm serve` with real clients: the official `openai` package and httpx against a real
uvicorn server on a free localhost port (chat, streaming, n > 1, logprobs, stop strings,
errors, API key, limits, disconnects), plus the continuous batcher checked token for token
against `echolm.engine.generate_ids`."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from echolm.serve.schemas import Limits
from echolm.serve.testing import ServerThread, free_port, make_run, slow_down

torch.set_num_threads(1)
MSG = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def serve_run(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.getbasetemp() / "serve_run", prepared_run)


@pytest.fixture(scope="module")
def server(serve_run: Path):
    limits = Limits(max_tokens=48, max_n=4, max_concurrent=12, max_batch=16, max_messages=8,
                    max_body_bytes=200_000)
    with ServerThread(serve_run, limits) as s:
        yield s


@pytest.fixture
def client(server: ServerThread):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


def wait_idle(server: ServerThread, timeout: float = 5.0) -> dict:
    """Wait until no request is in flight and no row is decoding; returns the engine stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.state.engine.stats()
        if server.state.inflight == 0 and stats["active_rows"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: inflight={server.state.inflight}, {stats}")
        time.sleep(0.02)


# ---- the openai client ---------------------------------------------------------------------

def test_models_lists_each_stage_present(client, serve_run: Path) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["echo-base", "echo-sft", "echo-rl"]
    m = client.models.retrieve("echo-sft")
    assert m.id == "echo-sft" and m.owned_by == "echolm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("echo-rlhf")  # no rlhf checkpoint in this run


def test_chat_completion(client) -> None:
    r = client.chat.completions.create(model="echo-sft", messages=MSG, max_tokens=12, seed=3)
    assert r.object == "chat.completion" and r.model == "echo-sft"
    assert r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12
    assert (choice.finish_reason == "length") == (r.usage.completion_tokens == 12)
    assert r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint.startswith("sft@")


def test_streaming_matches_non_streaming_with_a_seed(client) -> None:
    kw = dict(model="echo-base", messages=MSG, max_tokens=20, seed=11, temperature=0.9)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_n_choices(client) -> None:
    r = client.chat.completions.create(model="echo-rl", messages=MSG, n=3, max_tokens=16,
                                       seed=5, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1, "different choices should differ"
    one = client.chat.completions.create(model="echo-rl", messages=MSG, n=1, max_tokens=16,
                                         seed=5, temperature=1.0)
    assert one.choices[0].message.content == texts[0]  # choice 0 uses the seed itself
    # streaming with n > 1: every choice streams and finishes
    parts: dict[int, str] = {0: "", 1: "", 2: ""}
    done = set()
    for c in client.chat.completions.create(model="echo-rl", messages=MSG, n=3, max_tokens=16,
                                            seed=5, temperature=1.0, stream=True):
        for ch in c.choices:
            parts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                done.add(ch.index)
    assert done == {0, 1, 2}
    assert [parts[i] for i in range(3)] == texts


def test_logprobs(client) -> None:
    r = client.chat.completions.create(model="echo-sft", messages=MSG, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert e.token == e.top_logprobs[0].token  # greedy: the chosen token is the likeliest
        assert math.isclose(e.logprob, tops[0], rel_tol=1e-5)
        assert bytes(e.bytes).decode("utf-8", errors="backslashreplace") == e.token
        assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-5


def test_stop_strings_cut_the_answer(client) -> None:
    kw = dict(model="echo-sft", messages=MSG, max_tokens=40, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 6, full
    stop = full[3:6]
    cut = client.chat.completions.create(**kw, stop=[stop, "\u2603never"])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **kw, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]


def test_completions_endpoint(client) -> None:
    r = client.completions.create(model="echo-base", prompt="Once upon a time", max_tokens=6,
                                  logprobs=2, seed=1)
    assert r.object == "text_completion"
    (c,) = r.choices
    assert len(c.logprobs.tokens) == r.usage.completion_tokens <= 6
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    # The tokens spell the text. (This seed's answer changed when the batcher took the
    # engine's sampler: it now starts with a token that is half a UTF-8 character, spelled
    # "\\xf5" in logprobs and U+FFFD in the text, so compare bytes, not first characters.)
    spelled = b"".join(_token_bytes(t) for t in c.logprobs.tokens)
    assert spelled.decode("utf-8", errors="replace") == c.text
    assert c.logprobs.text_offset == [sum(map(len, c.logprobs.tokens[:i]))
                                      for i in range(len(c.logprobs.tokens))]
    # Streamed, the same tokens and logprobs: the first token (half a character) has no text
    # yet, but its logprob entry still comes (it was dropped when chunks needed text).
    streamed = list(client.completions.create(model="echo-base", prompt="Once upon a time",
                                              max_tokens=6, logprobs=2, seed=1, stream=True))
    tokens = [t for ch in streamed if ch.choices and ch.choices[0].logprobs
              for t in ch.choices[0].logprobs.tokens]
    assert tokens == c.logprobs.tokens
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.text
    many = client.completions.create(model="echo-base", prompt=["A", "B"], n=2, max_tokens=3)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    chunks = list(client.completions.create(model="echo-base", prompt="The", max_tokens=5,
                                            stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def _token_bytes(token: str) -> bytes:
    """A logprobs token back to its bytes (bytes that are not whole UTF-8 characters are
    spelled as \\xNN escapes)."""
    return b"".join(bytes([int(part[2:], 16)]) if re.fullmatch(r"\\x[0-9a-f]{2}", part)
                    else part.encode() for part in re.split(r"(\\x[0-9a-f]{2})", token))


def test_errors_have_openai_shape(client, server: ServerThread) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MSG)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo-sft", messages=MSG, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="echo-sft", messages=MSG, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="echo-sft", messages=MSG, n=99)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="echo-sft", messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo-sft", messages=MSG, temperature="hot")
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # system message not first
        client.chat.completions.create(model="echo-sft", messages=[
            {"role": "user", "content": "hi"}, {"role": "system", "content": "x"}])
    assert "system" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo-sft", messages=[
            {"role": "user", "content": "word " * 400}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo-sft", messages=MSG, frequency_penalty=1.0)
    assert e.value.code == "unknown_parameter"
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "echo-sft", "messages": [', timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b'{"model": "echo-\xff\xfe"}', timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * 300_000, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(url, timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_api_key(serve_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ServerThread(serve_run, Limits(max_tokens=8), api_key="s3cret") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model="echo-sft", messages=MSG)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        r = httpx.get(s.url + "/v1/models", timeout=10)  # no key at all
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/chat/completions", content=b"{not json", timeout=10)
        assert r.status_code == 401  # the key is checked before anything else
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="echo-sft", messages=MSG, max_tokens=2).choices
        health = httpx.get(s.url + "/health", timeout=10).json()  # open: the page needs it
        assert health["auth"] is True
        schema = httpx.get(s.url + "/openapi.json", timeout=10).json()
        assert "HTTPBearer" in schema["components"]["securitySchemes"]
    monkeypatch.setenv("ECHOLM_API_KEY", "from-env")
    from echolm.serve import api

    captured = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: captured.update(app=app, **kw))
    api.serve(serve_run, port=1234)
    assert captured["app"].api_key == "from-env" and captured["port"] == 1234


# ---- concurrency ---------------------------------------------------------------------------

def _stream(url: str, max_tokens: int, out: list, i: int) -> None:
    body = {"model": "echo-sft", "messages": MSG, "max_tokens": max_tokens, "stream": True,
            "temperature": 1.0, "seed": i}
    n = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n += 1
            elif line == "data: [DONE]":
                out.append((i, r.status_code, n))


def test_concurrent_requests_are_batched(server: ServerThread) -> None:
    wait_idle(server)
    before = server.state.engine.stats()
    out: list = []
    threads = [threading.Thread(target=_stream, args=(server.url, 40, out, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(i for i, _, _ in out) == list(range(8))
    assert all(code == 200 for _, code, _ in out)
    after = wait_idle(server)
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens / steps > 2.0, f"{tokens} tokens in {steps} steps: not batched"


@pytest.fixture(scope="module")
def slow_server(serve_run: Path):
    """A server whose sft model takes 30 ms a step, with room for 3 requests at once."""
    with ServerThread(serve_run, Limits(max_tokens=200, max_concurrent=3, max_batch=8)) as s:
        slow_down(s, "sft", 0.03)
        yield s


# Requests that must still be running seconds later are greedy: the sft model's greedy answer
# to MSG runs all 200 tokens, while a sampled one may end at once, depending on where the
# global generator stands (when the batcher took the engine's sampler, which draws
# differently, the sampled request of the disconnect test began to end after 8 tokens).
LONG = {"model": "echo-sft", "messages": MSG, "max_tokens": 200, "temperature": 0}


def test_too_many_requests_is_429(slow_server: ServerThread) -> None:
    s = slow_server
    holders = []
    try:
        for _ in range(3):
            cm = httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30,
                              json={**LONG, "stream": True})
            assert cm.__enter__().status_code == 200
            holders.append(cm)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="echo-sft", messages=MSG, max_tokens=2)
        assert e.value.code == "rate_limit_exceeded"
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        for cm in holders:
            cm.__exit__(None, None, None)
    wait_idle(s)


def test_disconnect_frees_the_slot_at_once(slow_server: ServerThread) -> None:
    s = slow_server
    before = s.state.engine.stats()["tokens"]
    with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30,
                      json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        deadline = time.monotonic() + 5
        while s.state.engine.stats()["active_rows"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.state.inflight == 1 and s.state.engine.stats()["active_rows"] == 1
    wait_idle(s, timeout=2.0)  # 200 tokens would take 6 s; leaving frees the slot at once
    assert s.state.engine.stats()["tokens"] - before < 60
    # a non-streaming client that gives up is dropped too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(s.url + "/v1/chat/completions", timeout=0.5, json=LONG)
    wait_idle(s, timeout=2.0)


def test_a_slow_client_does_not_block_others(server: ServerThread) -> None:
    wait_idle(server)
    body = {"model": "echo-sft", "messages": MSG, "max_tokens": 48, "stream": True, "n": 4,
            "logprobs": True, "top_logprobs": 20}
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json=body) as stuck:
        assert stuck.status_code == 200  # and never read: its data piles up, not the engine
        t0 = time.monotonic()
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for _ in range(3):
            assert c.chat.completions.create(model="echo-base", messages=MSG, max_tokens=16)
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 10
        while server.state.engine.stats()["active_rows"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.state.engine.stats()["active_rows"] == 0  # it finished generating
    wait_idle(server)


# ---- the preference store, the schema, the command -----------------------------------------

def test_rank_endpoints_fill_the_store(server: ServerThread, serve_run: Path) -> None:
    r = httpx.post(server.url + "/api/samples", timeout=30, json={
        "model": "echo-sft", "prompt": "Name a colour.", "n": 3, "temperature": 1.0,
        "max_tokens": 8, "seed": 4})
    assert r.status_code == 200, r.text
    s = r.json()
    ids = [x["id"] for x in s["responses"]]
    assert len(ids) == 3 and s["stage"] == "sft" and s["checkpoint"].startswith("sft@")
    bad = httpx.post(server.url + "/api/rankings", timeout=10, json={
        "prompt_id": s["prompt_id"], "response_ids": [ids[0], 999_999], "annotator": "t"})
    assert bad.status_code == 400
    order = [ids[2], ids[0], ids[1]]
    r = httpx.post(server.url + "/api/rankings", timeout=10, json={
        "prompt_id": s["prompt_id"], "response_ids": order, "annotator": "api-test"})
    assert r.status_code == 200, r.text
    from echolm.prefs import PreferenceStore

    with PreferenceStore(serve_run / "prefs.sqlite") as db:
        (rk,) = db.rankings("api-test")
        assert rk.response_ids == order and rk.prompt == "Name a colour."
        rows = {x["id"]: x for x in db.responses(s["prompt_id"])}
        assert rows[ids[0]]["stage"] == "sft" and rows[ids[0]]["checkpoint"] == s["checkpoint"]
        assert rows[ids[0]]["sampling"]["temperature"] == 1.0


def test_openapi_schema_states_the_limits(server: ServerThread) -> None:
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    paths = schema["paths"]
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
              "/api/samples", "/api/rankings"):
        assert p in paths
    chat = paths["/v1/chat/completions"]["post"]
    assert "422" not in chat["responses"] and {"400", "404", "413", "429"} <= set(
        chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    body = schema["components"]["schemas"][ref]
    assert body["additionalProperties"] is False
    assert body["properties"]["messages"]["maxItems"] == 8
    n = body["properties"]["n"]["anyOf"][0]
    assert n["maximum"] == 4


def test_cli_serve_subprocess(serve_run: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ECHOLM_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "echolm", "serve", "--run", str(serve_run),
                             "--port", str(port), "--max-tokens", "4", "--threads", "1",
                             "--allow-host", "echo.example", "--allow-host", "Box.Example."],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=20,
                       headers={"Authorization": "Bearer k"},
                       json={"model": "echo-sft", "messages": MSG, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text.startswith("<!doctype")
        for host, status in (("echo.example", 200), (f"box.example:{port}", 200),
                             (f"localhost:{port}", 200), ("other.example", 421)):
            r = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": host}, timeout=5)
            assert r.status_code == status, (host, r.text)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=15)[0]
    assert "answers Host 127.0.0.1, [::1], box.example, echo.example, localhost)" in out, out


def test_cli_serve_errors(serve_run: Path, capsys: pytest.CaptureFixture) -> None:
    from echolm.cli import main

    assert main(["serve", "--run", str(serve_run / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["serve", "--run", str(serve_run), "--max-n", "9", "--max-batch", "4"]) == 2
    assert "max_n" in capsys.readouterr().err


# ---- the batcher itself ----------------------------------------------------------------------

def _token_sinks(n: int):
    """Sinks for the batcher that collect each request's tokens into `got[k]`; `done` is set
    once `n` requests have finished."""
    got: dict[int, list[int]] = {}
    done = threading.Event()

    def sink_for(k: int):
        toks: list[int] = []

        def sink(events) -> None:
            for e in events:
                toks.append(e.token)
                if e.finish:
                    got[k] = toks
                    if len(got) == n:
                        done.set()
        return sink

    return got, done, sink_for


def test_continuous_batching_matches_one_at_a_time(serve_run: Path) -> None:
    """Requests joining a running batch at different moments, with prompts of different
    lengths, get exactly the tokens they would get alone (greedy)."""
    from echolm.checkpoint import load_model
    from echolm.engine import SamplingParams, generate_ids
    from echolm.serve.batcher import Engine, GenRequest, RowParams
    from echolm.tokenizer import Tokenizer

    tok = Tokenizer.load(serve_run / "tokenizer")
    model = load_model(serve_run / "sft").eval()
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(2, 40, (10,), generator=g).tolist()
    prompts = [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in lens]
    maxes = torch.randint(3, 50, (10,), generator=g).tolist()
    want = []
    for p, m in zip(prompts, maxes, strict=True):
        ids = [int(s[0]) for s in generate_ids(model, [p], SamplingParams(max_tokens=m,
                                                                          temperature=0))]
        want.append(ids)
    got, done, sink_for = _token_sinks(len(prompts))

    engine = Engine(tok, max_batch=4)  # fewer rows than requests: some wait for a free row
    try:
        for k, (p, m) in enumerate(zip(prompts, maxes, strict=True)):
            engine.submit(GenRequest(model, [p], [RowParams(max_new=m, temperature=0)],
                                     sink_for(k)))
            time.sleep(0.002 * k)
        assert done.wait(60)
    finally:
        engine.close()
    assert [got[k] for k in range(len(prompts))] == want


def test_seeded_rows_draw_what_the_engine_draws(serve_run: Path) -> None:
    """One sampler: a seeded sampled row in the batcher, decoding beside other rows, draws
    the tokens `echolm.engine.generate_ids` draws alone for the same seed and settings."""
    from echolm.checkpoint import load_model
    from echolm.engine import SamplingParams, generate_ids
    from echolm.serve.batcher import Engine, GenRequest, RowParams
    from echolm.tokenizer import Tokenizer

    tok = Tokenizer.load(serve_run / "tokenizer")
    model = load_model(serve_run / "sft").eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9)]
    settings = [dict(temperature=0.9, top_p=0.9, top_k=0, seed=11),
                dict(temperature=1.0, top_p=1.0, top_k=5, seed=12),
                dict(temperature=0.7, top_p=0.8, top_k=20, seed=13)]
    want = [[int(t[0]) for t in generate_ids(model, [p], SamplingParams(max_tokens=20, **kw))]
            for p, kw in zip(prompts, settings, strict=True)]
    got, done, sink_for = _token_sinks(len(prompts) + 1)

    engine = Engine(tok, max_batch=8)
    try:  # an unseeded row shares the batch: it must not change the seeded rows' draws
        engine.submit(GenRequest(model, [prompts[0]], [RowParams(max_new=20)], sink_for(-1)))
        for k, (p, kw) in enumerate(zip(prompts, settings, strict=True)):
            engine.submit(GenRequest(model, [p], [RowParams(max_new=20, **kw)], sink_for(k)))
        assert done.wait(60)
    finally:
        engine.close()
    assert [got[k] for k in range(len(prompts))] == want
    assert len(set(map(tuple, want))) == len(want)


def test_utf8_stream_holds_back_possible_stop_strings() -> None:
    from echolm.engine import Utf8Stream  # the batcher's streamer is the engine's

    pieces = [b"ab", b"c", b"d", b"\xe2\x82", b"\xac", b"END", b"x"]
    t = Utf8Stream(pieces, ["cd!", "EN"])
    out = [(t.push(i), t.stopped) for i in (0, 1, 2, 3, 4)]
    # "c", then "cd" could begin "cd!": held back until the euro sign rules that out
    assert out == [("ab", False), ("", False), ("", False), ("", False), ("cd\u20ac", False)]
    assert (t.push(5), t.stopped) == ("", True)  # "EN" inside "END" stops; none of it is sent
    assert t.text == "abcd\u20ac"
    plain = Utf8Stream(pieces)
    assert "".join(plain.push(i) for i in (3, 4, 6)) + plain.flush() == "\u20acx"


def test_token_pieces_spell_special_tokens_by_name(serve_run: Path) -> None:
    from echolm.engine import TokenPieces
    from echolm.tokenizer import Tokenizer

    tok = Tokenizer.load(serve_run / "tokenizer")
    named, silent = TokenPieces(tok, tok.vocab_size + 2), TokenPieces(tok, specials="silent")
    assert named.bytes[tok.bos] == b"<|bos|>" and silent.bytes[tok.bos] == b""
    assert named.bytes[tok.vocab_size + 1] == f"<|unused_{tok.vocab_size + 1}|>".encode()
    word = tok.encode("hello")[0]
    assert named.bytes[word] == silent.bytes[word] == tok.token_bytes[word]
    assert named.strings[word] == tok.token_bytes[word].decode("utf-8", "backslashreplace")


def test_sample_rows_respects_each_rows_settings() -> None:
    from echolm.engine import sample_rows

    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 4)
    gens = [None, None, torch.Generator().manual_seed(1), None]
    temps = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 1e-9, 1.0, 1.0])
    top_k = torch.tensor([0, 0, 0, 1])
    for _ in range(20):
        t = sample_rows(logits, temps, top_p, top_k, gens).tolist()
        assert t[0] == 1 and t[1] == 1 and t[3] == 1  # greedy, top_p ~0, top_k 1
    a = [sample_rows(logits, temps, top_p, top_k,
                     [None, None, torch.Generator().manual_seed(7), None])[2].item()
         for _ in range(3)]
    assert len(set(a)) == 1  # a seeded row draws the same every time


def test_health_reports_engine_and_limits(server: ServerThread) -> None:
    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["models"] == ["echo-base", "echo-sft", "echo-rl"]
    assert h["limits"]["max_tokens"] == 48 and "steps" in h["engine"]
    assert json.loads(json.dumps(h)) == h
