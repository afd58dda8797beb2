"""One writer per run directory, Ctrl-C that saves, and a status.json that tells the truth:
real `echolm` processes started, refused, killed with SIGKILL and interrupted with SIGINT."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import losses, pretrain_args, subprocess_env
from safetensors.torch import load_file

from echolm.cli import main
from echolm.report import status_banner
from echolm.runlock import LOCK_NAME, in_use
from echolm.tokenizer import Tokenizer

STEPS = 20
OVERRIDES = (f"pretrain.max_steps={STEPS}", "pretrain.ckpt_every=1000", "pretrain.eval_every=0",
             "pretrain.eval_tokens=1024")


def _start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "echolm", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env())


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stdout.read()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _lock_pid(run: Path) -> int | None:
    try:
        return json.loads((run / LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _base_steps(run: Path) -> list[int]:
    try:
        return [s for s, _ in losses(run)]
    except (FileNotFoundError, json.JSONDecodeError):  # a line being written
        return []


def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(
        run_dir: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    holder = _start(*pretrain_args(run_dir, corpus, "pretrain.max_steps=100000",
                                   "pretrain.eval_every=0"))
    try:
        _wait_for(lambda: _lock_pid(run_dir) == holder.pid and len(_base_steps(run_dir)) >= 2,
                  holder)
        started = time.strftime("%H:%M", time.localtime(
            json.loads((run_dir / LOCK_NAME).read_text())["started"]))
        want = (f"echolm: error: {run_dir} is in use by pid {holder.pid} (echolm pretrain, "
                f"started {started}); wait for it or stop it\n")
        for args in (["sft", "--run", run_dir], ["pretrain", "--out", run_dir],
                     ["tokenizer", "train", "--out", run_dir], ["run", "--out", run_dir],
                     ["eval", "--run", run_dir], ["rank", "--run", run_dir, "--simulated"]):
            capsys.readouterr()
            assert main([str(a) for a in args]) == 2, args
            assert capsys.readouterr().err == want, args
        assert not (run_dir / "sft").exists() and not (run_dir / "prefs.sqlite").exists()
        # reading is not writing: a read-only command runs beside the writer
        assert main(["tokenizer", "encode", "--run", str(run_dir), "Hello"]) == 0
        assert json.loads(capsys.readouterr().out) == \
            Tokenizer.load(run_dir / "tokenizer").encode("Hello")
        assert _status(run_dir)["state"] == "running"
        assert status_banner(run_dir, _status(run_dir))[0].startswith(
            "> **Still running:** `echolm pretrain` is in stage `pretrain`")
    finally:
        holder.kill()  # SIGKILL: no handler runs, the lock file stays behind
        holder.communicate(timeout=30)
    steps = _base_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # one writer: every row once

    assert _lock_pid(run_dir) == holder.pid and in_use(run_dir) is None  # the kernel let go
    assert status_banner(run_dir, _status(run_dir)) == [
        "> **`echolm pretrain` stopped in stage `pretrain` without saying why** (killed?): "
        "run it again to resume.", ""]
    capsys.readouterr()
    assert main(["tokenizer", "train", "--out", str(run_dir)]) == 0  # takes the dead one's
    assert "tokenizer: already finished" in capsys.readouterr().out
    assert not (run_dir / LOCK_NAME).exists()  # released: removed


def test_ctrl_c_saves_the_step_and_the_same_command_resumes_exactly(
        run_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(run_dir, ref)
    args = pretrain_args(run_dir, corpus, *OVERRIDES)

    proc = _start(*args)
    _wait_for(lambda: len(_base_steps(run_dir)) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    m = re.search(r"echolm: interrupted base: saved a checkpoint at step (\d+); run the same "
                  r"command again to resume\n$", out)
    assert m, out
    step = int(m.group(1))
    assert 3 <= step < STEPS and "Traceback" not in out
    ckpt = run_dir / "base" / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"step_{step:06d}"
    assert torch.load(ckpt / f"step_{step:06d}" / "state.pt", weights_only=False)["step"] == step
    assert _base_steps(run_dir) == list(range(1, step + 1))
    status = _status(run_dir)
    assert (status["state"], status["stage"], status["command"]) == \
        ("interrupted", "pretrain", "echolm pretrain")
    assert f"saved a checkpoint at step {step}" in status["error"]
    assert not (run_dir / LOCK_NAME).exists()

    # the same command again resumes from that step; SIGTERM (a scheduler's stop) saves too
    proc = _start(*args)
    _wait_for(lambda: len(_base_steps(run_dir)) >= step + 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert f"pretrain: resuming from step {step}\n" in out
    step = int(re.search(r"interrupted base: saved a checkpoint at step (\d+);", out).group(1))
    assert (ckpt / "latest").read_text().strip() == f"step_{step:06d}"

    # and once more, to the end: the same losses and weights as a run never interrupted
    capsys.readouterr()
    assert main(args) == 0
    assert f"pretrain: resuming from step {step}" in capsys.readouterr().out
    assert _status(run_dir)["state"] == "succeeded"
    assert main(pretrain_args(ref, corpus, *OVERRIDES)) == 0
    assert losses(run_dir) == losses(ref)
    assert [s for s, _ in losses(ref)] == list(range(1, STEPS + 1))
    want = load_file(str(ref / "base" / "model.safetensors"))
    have = load_file(str(run_dir / "base" / "model.safetensors"))
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)


def test_status_json_says_which_stage_failed_and_keeps_saying_it(
        run_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    new = tmp_path / "new"
    empty = tmp_path / "empty-book.txt"  # it exists (checked at start), the tokenizer fails
    empty.write_text("")
    book = f'data.pretrain=["{empty}"]'
    assert main(["run", "--preset", "micro", "--out", str(new), "--set", book]) == 2
    status = _status(new)
    assert (status["state"], status["stage"], status["command"]) == \
        ("failed", "tokenizer", "echolm run")
    assert status["error"] == f"EchoError: {empty}: file is empty" and status["ended"]
    assert status_banner(new, status) == [
        f"> **Stage `tokenizer` failed:** {status['error']}. Earlier stages' results are "
        "intact.", ""]
    # the failed stage succeeding on its own clears it ...
    assert main(["tokenizer", "train", "--out", str(new), "--reconfigure", "--set",
                 f'data.pretrain=["{corpus}"]']) == 0
    status = _status(new)
    assert (status["state"], status["stage"], status["error"]) == \
        ("succeeded", "tokenizer", None)
    assert status_banner(new, status) == []
    # ... another stage succeeding does not hide it
    assert main(["eval", "--run", str(run_dir), "--stage", "sft"]) == 2
    failed = _status(run_dir)
    assert (failed["state"], failed["stage"], failed["command"]) == \
        ("failed", "eval", "echolm eval")
    capsys.readouterr()
    assert main(["tokenizer", "train", "--out", str(run_dir)]) == 0
    assert _status(run_dir) == failed


def test_tokenizer_text_may_come_before_or_after_the_options(
        prepared_run: Path, capsys: pytest.CaptureFixture) -> None:
    tok = Tokenizer.load(prepared_run / "tokenizer")
    text = "Hello, world!"
    run = ["--run", str(prepared_run)]
    for action, extra in (("encode", []), ("show", ["--json"])):
        for argv in (["tokenizer", action, text, *run, *extra],
                     ["tokenizer", action, *run, *extra, text]):
            capsys.readouterr()
            assert main(argv) == 0, argv
            got = json.loads(capsys.readouterr().out)
            assert ([p["id"] for p in got] if action == "show" else got) == tok.encode(text)
    assert main(["tokenizer", "show", *run, text]) == 0  # the hint `make demo` prints
    assert "ids: " + " ".join(map(str, tok.encode(text))) in capsys.readouterr().out
    # reading writes nothing: no lock, no status
    assert not {LOCK_NAME, "status.json"} & set(os.listdir(prepared_run))
