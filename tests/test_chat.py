"""`echolm chat`: the one-shot --prompt answer is exactly the engine's greedy answer; a real
pseudo-terminal session (streaming, /tokens, /temp, /reset, /stage, Ctrl-C during an answer
and at the prompt, /quit); piped stdin (and its end); truncation of a long conversation; bad
input."""

from __future__ import annotations

import fcntl
import io
import os
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from echolm.chat import fit_prompt, sampling_probs, token_probs
from echolm.checkpoint import load_model
from echolm.cli import main
from echolm.engine import SamplingParams, generate, sample_next
from echolm.errors import EchoError
from echolm.tokenizer import Tokenizer

# a context far longer than the training rows, so that a greedy base-model answer (which rarely
# stops) runs long enough to be interrupted
OVERRIDES = ["pretrain.max_steps=5", "pretrain.eval_every=5", "pretrain.ckpt_every=5",
             "sft.max_steps=3", "sft.eval_every=3", "sft.ckpt_every=3",
             "data.eval_problems=4", "model.max_seq_len=1024"]


def trained_run(prepared_run: Path, base_temp: Path) -> Path:
    """A run with base/ and sft/ models (tiny), built once per session and shared with
    test_explain.py through the file system."""
    run = base_temp / "chat_run" / "run"
    if (run / "sft" / "done.json").exists():
        return run
    from echolm.pipeline import run_config
    from echolm.train.pretrain import run_pretrain
    from echolm.train.sft import run_sft

    shutil.rmtree(run.parent, ignore_errors=True)
    shutil.copytree(prepared_run, run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with run_config(run, None, OVERRIDES, reconfigure=True) as cfg:
            run_pretrain(cfg, run, log=lambda *a: None)
            run_sft(cfg, run, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="session")
def chat_run(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(prepared_run, tmp_path_factory.getbasetemp())


def _cli(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "echolm", *map(str, args)], input=stdin,
                          capture_output=True, env=subprocess_env(), timeout=120)


def _engine_answer(run: Path, stage: str, message: str, max_tokens: int) -> str:
    tok = Tokenizer.load(run / "tokenizer")
    model = load_model(run / stage).eval()
    prompt = tok.render_prompt([{"role": "user", "content": message}])
    p = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                       stop_ids=(tok.assistant_end, tok.bos))
    return tok.decode(generate(model, tok, [prompt], p)[0])


def test_prompt_prints_only_the_engines_greedy_answer(chat_run):
    torch.set_num_threads(1)
    r = _cli("chat", "--run", chat_run, "--stage", "base", "--prompt", "What is 2+3?",
             "--temperature", "0", "--max-tokens", "40")
    assert r.returncode == 0, r.stderr.decode()
    expected = _engine_answer(chat_run, "base", "What is 2+3?", 40)
    assert expected.strip()
    assert r.stdout == (expected + "\n").encode(), (r.stdout, expected)
    assert r.stderr == b""  # no note about the base model, no banner: the answer only


def test_piped_stdin_is_read_line_by_line(chat_run, capsys, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+3?\n/tokens\n/reset\n/temp 0\n"
                                                  "/nope\n\n//tokens\n"))
    capsys.readouterr()
    assert main(["chat", "--run", str(chat_run), "--temperature", "0", "--max-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    answer = _engine_answer(chat_run, "sft", "What is 2+3?", 12)
    assert out.startswith(answer + "\n")  # no prompt, no banner when stdin is not a terminal
    assert "tokens from stage sft (greedy)" in out
    assert "(conversation cleared)" in out and "(temperature 0, greedy)" in out
    assert "unknown command /nope" in out
    assert out.count("tokens from stage") == 1  # "//tokens" was a message, not the command
    assert "you>" not in out and err == ""


# ---- a real terminal -------------------------------------------------------------------------

class Pty:
    """`echolm chat` on a pseudo-terminal that is its controlling terminal (so that typing
    Ctrl-C sends it SIGINT, as in a real terminal)."""

    def __init__(self, *args: str | Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        # a new session, then the pty as its controlling terminal, then exec echolm. SIGINT
        # back to its default first: a test run started in the background of a shell without
        # job control (`make test &`) inherits SIGINT ignored, and Python then never turns
        # Ctrl-C into KeyboardInterrupt, as in no real terminal.
        ctty = ("import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "os.execv(sys.executable, [sys.executable, '-m', 'echolm', *sys.argv[1:]])")
        env = subprocess_env() | {"TERM": "dumb"}
        self.proc = subprocess.Popen([sys.executable, "-c", ctty, *map(str, args)],
                                     stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.fd, self.buf, self.seen = master, b"", b""

    def expect(self, pattern: bytes, timeout: float = 30) -> bytes:
        """Read until `pattern`; return everything up to and including it."""
        end = time.monotonic() + timeout
        while pattern not in self.buf:
            left = end - time.monotonic()
            ready = select.select([self.fd], [], [], max(left, 0))[0]
            if not ready:
                raise AssertionError(f"no {pattern!r} within {timeout}s; got {self.buf[-500:]!r}")
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"terminal closed before {pattern!r}: {self.buf[-500:]!r}")
            self.buf += data
            self.seen += data
        i = self.buf.index(pattern) + len(pattern)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def line(self, text: str) -> bytes:
        """Type a line, return the output up to the next prompt."""
        self.send(text.encode() + b"\r")
        return self.expect(b"you> ")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.fd)


@pytest.fixture
def pty_chat(chat_run):
    sessions = []

    def start(*args: str) -> Pty:
        s = Pty("chat", "--run", chat_run, *args)
        sessions.append(s)
        return s

    yield start
    for s in sessions:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_terminal_session(pty_chat):
    t = pty_chat("--max-tokens", "900", "--seed", "1")
    banner = t.expect(b"you> ")
    assert b"stage sft" in banner and b"/help" in banner

    t.send(b"What is 2+3?\r")
    answer = t.expect(b"you> ")
    assert b"echo> " in answer

    out = t.line("/tokens").decode()
    assert "tokens from stage sft (temperature 0.7, top-k 50)" in out
    n = int(out.split(" tokens from stage", 1)[0].split()[-1])
    rows = [r.split() for r in out.splitlines() if r.rstrip().endswith("%")]
    assert n >= 1 and len(rows) == n and all(r[-2].endswith("%") for r in rows)

    assert b"(temperature 0, greedy)" in t.line("/temp 0")
    assert b"(conversation cleared)" in t.line("/reset")
    out = t.line("/stage base")
    assert b"now talking to stage base" in out
    assert b"never seen the chat format" in out  # the note (stderr shares the terminal)
    assert b"unknown stage" in t.line("/stage nope")

    # Ctrl-C during a long answer stops it and returns to the prompt
    t.send(b"Tell me a long story\r")
    t.expect(b"echo> ")
    t.expect(b" ")  # the answer has started streaming
    t.send(b"\x03")
    stopped = t.expect(b"you> ")
    assert b"[stopped]" in stopped
    assert t.proc.poll() is None

    out = t.line("/tokens").decode()
    assert "tokens from stage base (greedy), stopped by Ctrl-C" in out

    # Ctrl-C on a half-typed line drops the line, not the program
    t.send(b"half a line")
    t.expect(b"half a line")
    time.sleep(0.3)  # let readline wait for the next key (a signal just before it is missed)
    t.send(b"\x03")
    t.expect(b"you> ")
    assert t.proc.poll() is None

    assert b"/tokens" in t.line("/help")
    t.send(b"/quit\r")
    assert t.close() == 0


def test_ctrl_c_at_an_empty_prompt_leaves_cleanly(pty_chat):
    t = pty_chat("--stage", "base")
    t.expect(b"you> ")
    assert b"never seen the chat format" in t.seen
    time.sleep(0.3)  # let readline wait for a key (a signal just before that is missed)
    t.send(b"\x03")
    assert t.close() == 0
    assert b"Traceback" not in t.seen + t.buf


# ---- pieces ----------------------------------------------------------------------------------

def test_fit_prompt_drops_the_oldest_turns_and_keeps_the_system_message(chat_run):
    tok = Tokenizer.load(chat_run / "tokenizer")
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for k in range(6):
        turns += [{"role": "user", "content": f"question {k} " * 5},
                  {"role": "assistant", "content": f"answer {k} " * 5}]
    messages = [system, *turns, {"role": "user", "content": "last"}]
    full = tok.render_prompt(messages)
    ids, dropped = fit_prompt(tok, messages, max_seq_len=len(full) + 1, max_tokens=1)
    assert (ids, dropped) == (full, 0)
    ids, dropped = fit_prompt(tok, messages, max_seq_len=len(full) + 10, max_tokens=40)
    assert dropped >= 1
    assert ids == tok.render_prompt([system, *turns[2 * dropped:], messages[-1]])
    assert len(ids) + 40 <= len(full) + 10
    # room for nothing but the last message: everything else goes, the system message stays
    ids, dropped = fit_prompt(tok, messages, max_seq_len=len(full), max_tokens=len(full))
    assert dropped == 6 and ids == tok.render_prompt([system, messages[-1]])
    with pytest.raises(EchoError, match="too long"):
        fit_prompt(tok, [{"role": "user", "content": "word " * 200}], 64, 8)


def test_sampling_probs_is_the_distribution_sample_next_draws_from():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for p in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.3, top_p=0.8)):
        probs = sampling_probs(logits, p)
        assert torch.allclose(probs.sum(-1), torch.ones(4))
        g = torch.Generator().manual_seed(0)
        for _ in range(50):
            picked = sample_next(logits, p, generator=g)
            assert bool((probs.gather(1, picked[:, None]) > 0).all())
        if p.top_k:
            assert ((probs > 0).sum(-1) == 5).all()
        if p.temperature == 0:
            assert torch.equal(probs.argmax(-1), logits.argmax(-1))
            assert ((probs > 0).sum(-1) == 1).all()


def test_token_probs_are_the_models_probabilities_at_each_step(chat_run):
    from echolm.chat import Answer

    torch.set_num_threads(1)
    tok = Tokenizer.load(chat_run / "tokenizer")
    model = load_model(chat_run / "sft").eval()
    prompt = tok.render_prompt([{"role": "user", "content": "Spell cat."}])
    p = SamplingParams(max_tokens=8, temperature=0.0, stop_ids=(tok.assistant_end, tok.bos))
    ids = generate(model, tok, [prompt], p)[0]
    rows = token_probs(Answer(model, "sft", prompt, ids, tok.decode(ids), p, False))
    assert len(rows) == len(ids)
    with torch.no_grad():
        for k, (t, (pm, ps)) in enumerate(zip(ids, rows, strict=True)):
            probs = model(torch.tensor([prompt + ids[:k]]))[0, -1].softmax(-1)
            assert pm == pytest.approx(float(probs[t]), abs=1e-5)
            assert pm == pytest.approx(float(probs.max()), abs=1e-5)  # greedy: the argmax
            assert ps == 1.0


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--run", "{missing}"], "no such run directory"),
    (["--run", "{run}", "--stage", "nope"], "unknown stage 'nope'"),
    (["--run", "{run}", "--stage", "dpo"], "no finished 'dpo' model"),
    (["--run", "{run}", "--prompt", " "], "--prompt is empty"),
])
def test_bad_input_is_one_line(chat_run, tmp_path, capsys, args, needle):
    args = [a.format(run=chat_run, missing=tmp_path / "nothing") for a in args]
    rc = main(["chat", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("echolm: error: "), err
    assert needle in err[0]
