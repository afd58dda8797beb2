"""Schema fuzzing of `echolm serve`: schemathesis generates requests from the server's own
OpenAPI schema (valid ones, and ones that break it: wrong types, missing fields, out-of-range
values, unknown fields) against a real server, and every answer must be documented, never a
5xx, a 4xx for every invalid request, with an OpenAI-shaped error message. Then hand-made bad
requests (malformed JSON, invalid UTF-8, unknown model, oversized prompt and body, negative
max_tokens), and the server must still be up and idle. Bounded: a few dozen examples per
operation and mode, well under a minute."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from echolm.serve.schemas import Limits
from echolm.serve.testing import ServerThread, make_run

torch.set_num_threads(1)
EXAMPLES = 20
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance,
          st_checks.content_type_conformance, st_checks.response_schema_conformance,
          st_checks.negative_data_rejection]
MODELS = st.sampled_from([None, "echo-base", "echo-sft", "echo-rl"])
OPERATIONS = [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"),
              ("/v1/models", "GET"), ("/v1/models/{model}", "GET"), ("/health", "GET"),
              ("/api/samples", "POST"), ("/api/rankings", "POST"), ("/api/prefs", "GET")]


@pytest.fixture(scope="module")
def server(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory):
    run = make_run(tmp_path_factory.getbasetemp() / "serve_run", prepared_run)
    limits = Limits(max_tokens=6, max_n=2, max_batch=8, max_messages=4, max_prompt_tokens=120,
                    max_body_bytes=20_000, max_concurrent=32)
    with ServerThread(run, limits) as s:
        yield s


def assert_up_and_idle(server: ServerThread) -> None:
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert server.state.engine.alive
    deadline = time.monotonic() + 5
    while server.state.inflight or server.state.engine.stats()["active_rows"]:
        assert time.monotonic() < deadline, "requests left in flight"
        time.sleep(0.02)


def _error_shaped(response) -> None:
    if 400 <= response.status_code < 500:
        err = response.json()["error"]
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_schema_fuzz(server: ServerThread, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen: dict[str, set[int]] = {}

    def fuzz(label: str, strategy) -> None:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy, model=MODELS)
        def run(case, model: str | None) -> None:
            if model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model  # valid requests should mostly name a real model
            response = case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)
            _error_shaped(response)
            seen.setdefault(label, set()).add(response.status_code)

        run()

    for path, method in OPERATIONS:
        if mode is GenerationMode.NEGATIVE and method != "POST":
            continue  # no parameters to break
        fuzz(f"{method} {path}", schema[path][method].as_strategy(generation_mode=mode))
    assert_up_and_idle(server)
    print(mode.value, {k: sorted(v) for k, v in seen.items()})
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):
        if mode is GenerationMode.NEGATIVE:  # broken requests were really sent and refused
            assert seen[op] and all(400 <= c < 500 for c in seen[op]), seen
        else:  # and valid ones were answered
            assert 200 in seen[op], seen


BAD = {
    "malformed JSON": (b'{"model": "echo-sft", "messages": [{"role": "user"', 400,
                       "invalid_json"),
    "not an object": (b'[1, 2, 3]', 400, None),
    "empty body": (b"", 400, None),
    "invalid UTF-8": (b'{"model": "echo-sft", "messages": [{"role": "user", "content": "\xc3'
                      b'\x28"}]}', 400, "invalid_encoding"),
    "wrong type": (b'{"model": "echo-sft", "messages": "hello"}', 400, "invalid_value"),
    "number as string": (b'{"model": "echo-sft", "messages": [{"role": "user", "content": '
                         b'"hi"}], "max_tokens": "5"}', 400, "invalid_value"),
    "negative max_tokens": (b'{"model": "echo-sft", "messages": [{"role": "user", "content":'
                            b' "hi"}], "max_tokens": -3}', 400, "invalid_value"),
    "NaN temperature": (b'{"model": "echo-sft", "messages": [{"role": "user", "content": '
                        b'"hi"}], "temperature": NaN}', 400, None),
    "unknown model": (b'{"model": "echo-gpt", "messages": [{"role": "user", "content": '
                      b'"hi"}]}', 404, "model_not_found"),
    "unknown role": (b'{"model": "echo-sft", "messages": [{"role": "robot", "content": '
                     b'"hi"}]}', 400, "invalid_value"),
    "unknown field": (b'{"model": "echo-sft", "messages": [{"role": "user", "content": '
                      b'"hi"}], "logit_bias": {}}', 400, "unknown_parameter"),
    "oversized prompt": (b'{"model": "echo-sft", "messages": [{"role": "user", "content": "'
                         + b"many words " * 600 + b'"}]}', 400, "context_length_exceeded"),
    "oversized body": (b'{"model": "echo-sft", "messages": [{"role": "user", "content": "'
                       + b"x" * 30_000 + b'"}]}', 413, "request_too_large"),
    "too many stops": (b'{"model": "echo-sft", "messages": [{"role": "user", "content": '
                       b'"hi"}], "stop": ["a", "b", "c", "d", "e"]}', 400, "invalid_value"),
    "assistant last": (b'{"model": "echo-sft", "messages": [{"role": "assistant", "content": '
                       b'"hi"}]}', 400, "invalid_messages"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_a_4xx_with_a_message(server: ServerThread, name: str) -> None:
    body, status, code = BAD[name]
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code, err
    assert_up_and_idle(server)


def test_completions_and_rank_reject_bad_input(server: ServerThread) -> None:
    for path, body in [("/v1/completions", {"model": "echo-base", "prompt": 5}),
                       ("/v1/completions", {"model": "echo-base", "prompt": ["a"] * 3, "n": 1}),
                       ("/v1/completions", {"model": "echo-base", "prompt": "x", "logprobs": 9}),
                       ("/api/samples", {"model": "echo-sft", "prompt": "  ", "n": 2}),
                       ("/api/samples", {"model": "echo-sft", "prompt": "hi", "n": 1}),
                       ("/api/rankings", {"prompt_id": 1, "response_ids": [1],
                                          "annotator": "a"}),
                       ("/api/rankings", {"prompt_id": 1, "response_ids": [1, 2],
                                          "annotator": " "})]:
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"]["message"]
    assert_up_and_idle(server)
