"""`echolm serve` against a hostile web: a request whose Host header names another site (DNS
rebinding: a page of evil.example whose name now points at this machine) is refused before
it can read or write anything, and nobody but the simulated annotator may store rankings
under its name. A real uvicorn server on localhost, the real `openai` client, httpx and raw
sockets; the preference store is real SQLite, counted before and after."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path

import httpx
import openai
import pytest
import torch

from echolm.serve.gate import HostPolicy
from echolm.serve.testing import ServerThread, make_run

torch.set_num_threads(1)
MSG = [{"role": "user", "content": "What is 2 + 3?"}]
ALLOWED = "echo.example"  # the server below is started with --allow-host echo.example
HTTP = httpx.Client(timeout=30)  # one client: a new one per request costs ~0.1 s (TLS setup)


@pytest.fixture(scope="module")
def serve_run(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.getbasetemp() / "serve_run", prepared_run)


@pytest.fixture(scope="module")
def server(serve_run: Path):
    with ServerThread(serve_run, allow_hosts=(ALLOWED,)) as s:
        yield s


def rows(run: Path) -> tuple[int, int, int]:
    """(prompts, responses, rankings) in the run's preference store, read with sqlite3."""
    path = run / "prefs.sqlite"
    if not path.exists():
        return (0, 0, 0)
    with sqlite3.connect(path) as db:
        return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("prompts", "responses", "rankings"))


def sample(server: ServerThread) -> dict:
    r = HTTP.post(server.url + "/api/samples", timeout=30, json={
        "model": "echo-sft", "prompt": "Name a fruit.", "n": 2, "temperature": 1.0,
        "max_tokens": 6, "seed": 1})
    assert r.status_code == 200, r.text
    return r.json()


def ranking(s: dict, annotator: str) -> dict:
    return {"prompt_id": s["prompt_id"],
            "response_ids": [x["id"] for x in s["responses"]][::-1], "annotator": annotator}


def error_of(r: httpx.Response, status: int, code: str) -> dict:
    """The OpenAI-shaped error of `r`, checked: status, JSON body, all four fields, code."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"
    return body["error"]


def raw_request(port: int, head: bytes) -> tuple[int, bytes]:
    """Send a hand-written request (headers httpx would fix); (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# ---- the Host header ------------------------------------------------------------------------

def test_foreign_host_is_refused_and_nothing_is_written(server: ServerThread,
                                                        serve_run: Path) -> None:
    s = sample(server)
    before = rows(serve_run)
    db_bytes = (serve_run / "prefs.sqlite").read_bytes()
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", "EVIL.example.",
                 f"127.0.0.1.nip.io:{port}", f"localhost.evil.example:{port}", f"[::2]:{port}",
                 "10.0.0.5", f"{ALLOWED}.evil.example"):
        h = {"Host": host}
        err = error_of(HTTP.post(server.url + "/api/rankings", headers=h, timeout=10,
                                  json=ranking(s, "mallory")), 421, "host_not_allowed")
        assert repr(host) in err["message"] and "--allow-host" in err["message"], err
        error_of(HTTP.post(server.url + "/api/samples", headers=h, timeout=10, json={
            "model": "echo-sft", "prompt": "hi", "n": 2}), 421, "host_not_allowed")
        for path in ("/health", "/api/prefs", "/", "/openapi.json"):  # no reads either
            error_of(HTTP.get(server.url + path, headers=h, timeout=10), 421,
                     "host_not_allowed")
    # the page's own client, the openai package, pointed at the rebinding name
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=10,
                      default_headers={"Host": f"evil.example:{port}"})
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="echo-sft", messages=MSG, max_tokens=4)
    assert e.value.status_code == 421 and e.value.code == "host_not_allowed"
    assert "'evil.example:" in e.value.message and "--allow-host evil.example`" in \
        e.value.message
    c.close()
    assert rows(serve_run) == before
    assert (serve_run / "prefs.sqlite").read_bytes() == db_bytes


def test_malformed_or_missing_host_is_a_400(server: ServerThread, serve_run: Path) -> None:
    s = sample(server)
    before = rows(serve_run)
    body = json.dumps(ranking(s, "mallory")).encode()
    for host in (b"localhost@evil.example", b"evil.example/x", b"[::1", b"localhost:80:80",
                 b"local host"):
        status, out = raw_request(server.port, b"POST /api/rankings HTTP/1.1\r\nHost: " + host
                                  + b"\r\nContent-Type: application/json\r\nContent-Length: "
                                  + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                                  + body)
        assert status == 400, (host, out)
        assert json.loads(out)["error"]["code"] == "invalid_host", out
    status, out = raw_request(server.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert status == 400, out  # HTTP/1.0 may leave Host out: refused all the same
    assert json.loads(out)["error"]["message"] == \
        "the request needs exactly one Host header, got 0"
    status, out = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
                              b"Host: evil.example\r\nConnection: close\r\n\r\n")
    assert status == 400, out  # two Hosts: the HTTP parser (h11) or the Gate refuses
    assert rows(serve_run) == before


def test_local_names_and_allowed_names_are_served(server: ServerThread, serve_run: Path
                                                  ) -> None:
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost",
                 "127.0.0.1", "[::1]", f"LocalHost:{port}", "localhost.", "localhost:9000",
                 f"{ALLOWED}:{port}", "Echo.Example"):  # any port: ssh -L changes it
        r = HTTP.get(server.url + "/health", headers={"Host": host}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok", (host, r.text)
    for host in (f"localhost:{port}", f"{ALLOWED}:{port}"):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30,
                          default_headers={"Host": host})
        r = c.chat.completions.create(model="echo-sft", messages=MSG, max_tokens=4, seed=1)
        assert r.choices[0].finish_reason in ("stop", "length")
        c.close()
    s = sample(server)
    before = rows(serve_run)
    r = HTTP.post(server.url + "/api/rankings", headers={"Host": ALLOWED}, timeout=10,
                   json=ranking(s, "ada"))
    assert r.status_code == 200, r.text
    assert rows(serve_run) == (before[0], before[1], before[2] + 1)


def test_host_policy_on_every_interface_and_with_star() -> None:
    """Bound to 0.0.0.0 the server cannot know every name that reaches it: it answers the
    loopback names, any IP address (a rebinding request carries a name, never an address)
    and this machine's own names; other names need --allow-host."""
    wild = HostPolicy("0.0.0.0")
    for name in ("10.1.2.3", "192.168.0.7", "localhost", "::1", "fe80::1",
                 socket.gethostname().lower()):
        assert wild.allows(name), name
    for name in ("evil.example", "10.1.2.3.nip.io", "localhost.evil.example"):
        assert not wild.allows(name), name
    assert "any IP address" in wild.describe()
    local = HostPolicy("127.0.0.1")
    assert not local.allows("10.1.2.3") and not local.allows("evil.example")
    assert local.describe() == "Host 127.0.0.1, [::1], localhost"
    assert HostPolicy("10.0.0.9").allows("10.0.0.9") and HostPolicy("::1").allows("::1")
    star = HostPolicy("127.0.0.1", ["*"])
    assert star.allows("anything.example") and star.refusal([]) is None


def test_allow_host_option_errors(serve_run: Path, capsys: pytest.CaptureFixture) -> None:
    from echolm.cli import main

    for bad, words in (("evil.example:80", "'evil.example:80': not a host name or address "
                        "without a port"), ("a/b c", "'a/b c'")):
        assert main(["serve", "--run", str(serve_run), "--allow-host", "ok.example",
                     "--allow-host", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("echolm: error: --allow-host ") and words in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_openapi_states_the_421(server: ServerThread) -> None:
    paths = HTTP.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    assert "421" in paths["/api/rankings"]["post"]["responses"]
    assert "421" in paths["/v1/chat/completions"]["post"]["responses"]


# ---- the simulated annotator's name -----------------------------------------------------------

def test_people_cannot_rank_as_the_simulated_annotator(server: ServerThread, serve_run: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    s = sample(server)
    before = rows(serve_run)
    for who in ("simulated", "simulated:gold-v1:t0.1", "simulated-x:gold-v1:t0", "Simulated",
                "  SIMULATED:gold-v1:t0.1 ", "simulatedly"):
        err = error_of(HTTP.post(server.url + "/api/rankings", timeout=10,
                                  json=ranking(s, who)), 400, "reserved_annotator")
        assert err["param"] == "annotator" and repr(who.strip()) in err["message"], err
        assert "simulated annotator" in err["message"]
    assert rows(serve_run) == before
    r = HTTP.post(server.url + "/api/rankings", timeout=10, json=ranking(s, "sim ada"))
    assert r.status_code == 200, r.text  # other names are fine
    assert rows(serve_run) == (before[0], before[1], before[2] + 1)
    # and at the terminal: only --simulated writes under that name
    from echolm.cli import main

    for who in ("simulated:gold-v1:t0.1", "Simulated-me"):
        assert main(["rank", "--run", str(serve_run), "--annotator", who]) == 2
        err = capsys.readouterr().err
        assert err == (f"echolm: error: --annotator '{who}': names starting with 'simulated' "
                       "are reserved for the simulated annotator (--simulated); choose "
                       "another name\n"), err
    assert rows(serve_run) == (before[0], before[1], before[2] + 1)
