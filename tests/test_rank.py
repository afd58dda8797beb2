"""`echolm rank`: RLHF prompts, prompt files, order parsing, a person ranking at a real
pseudo-terminal (bad input re-prompts, rankings land in SQLite, quitting and re-running resumes
at the next prompt with the stored answers), and the simulated annotator end to end."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from echolm.annotator import SimulatedAnnotator
from echolm.cli import main
from echolm.data.prompts import TASK_SPECS, open_prompts, rlhf_prompts
from echolm.errors import EchoError
from echolm.rank import collect_rankings, read_prompt_file
from echolm.rank_terminal import parse_order
from echolm.tasks import get_task

FAST = ["--max-tokens", "24"]  # short answers: the micro model rarely stops by itself


# ---- prompts --------------------------------------------------------------------------------
def test_rlhf_prompts_mix_kinds_and_keep_splits_apart():
    train = rlhf_prompts("train", 40, seed=0)
    assert [p.text for p in train] == [p.text for p in rlhf_prompts("train", 40, seed=0)]
    assert len({p.text for p in train}) == 40
    assert all(p.kind.startswith("open:") for p in train[0::2])  # alternating, open first
    assert all(p.kind.startswith("task:") for p in train[1::2])
    assert {p.kind for p in train[1::2]} == {f"task:{s.split(':')[0]}" for s in TASK_SPECS}
    for p in train[1::2]:  # each task prompt carries a problem its verifier can check
        assert p.problem is not None and p.problem.prompt == p.text
        assert get_task(p.problem.task).score(p.problem, p.problem.solution) == 1
    for p in train[0::2]:
        assert p.problem is None and p.topic and len(p.text) < 60
    opens = {p.text for p in open_prompts("train")} | {p.text for p in open_prompts("val")}
    assert len(opens) >= 1000  # about a thousand open-ended prompts
    # the extra everyday things are asked about in training only: val is the held-out share
    # of the core (template, topic) pairs, the same whatever is added to train
    assert len(open_prompts("val")) == 68
    assert not {w for p in open_prompts("val") for w in p.topic} & {"ant", "lamb", "wagon"}
    assert "Describe a wagon in one sentence." in {p.text for p in open_prompts("train")}
    val = rlhf_prompts("val", 120, seed=5)
    assert not {p.text for p in val} & {p.text for p in rlhf_prompts("train", 200, seed=5)}
    assert not {p.text for p in open_prompts("val")} & {p.text for p in open_prompts("train")}
    with pytest.raises(EchoError, match="split must be one of"):
        rlhf_prompts("test", 3)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("Say hi.\n\n  Name a fruit.  \nSay hi.\n")
    items = read_prompt_file(txt)
    assert [i.text for i in items] == ["Say hi.", "Name a fruit."]
    assert items[1].source == f"{txt}:3"
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "What is 2 + 2?", "task": "arithmetic", "answer": "4"}\n'
                  '{"prompt": "Say hi."}\n')
    checkable, plain = read_prompt_file(jl)
    assert checkable.problem is not None and checkable.problem.answer == "4"
    assert plain.problem is None
    for bad, words in (('{"text": "x"}', "p.jsonl:2: field 'prompt' is missing"),
                       ('{"prompt": "x", "task": "nope", "answer": "1"}', "unknown task"),
                       ('{"prompt": "x", "task": "arithmetic"}', "p.jsonl:2: a checkable"),
                       ('{"prompt": ', "p.jsonl:2: invalid JSON")):
        jl.write_text('{"prompt": "ok"}\n' + bad + "\n")
        with pytest.raises(EchoError, match=re.escape(words)):
            read_prompt_file(jl)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(EchoError, match="no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    # saved by an editor that starts files with a byte-order mark: the mark is not text
    txt.write_text("\ufeffSay hi.\nName a fruit.\n", encoding="utf-8")
    jl.write_text('\ufeff{"prompt": "Say hi."}\n', encoding="utf-8")
    assert [i.text for i in read_prompt_file(txt)] == ["Say hi.", "Name a fruit."]
    assert [i.text for i in read_prompt_file(jl)] == ["Say hi."]


def test_parse_order():
    assert parse_order("3142", 4) == [2, 0, 3, 1]
    assert parse_order(" 3 1 4 2\n", 4) == [2, 0, 3, 1]
    assert parse_order("3,1,2", 3) == [2, 0, 1]
    assert parse_order("10 1 2 3 4 5 6 7 8 9", 10)[0] == 9
    assert parse_order("s", 4) == "skip" and parse_order("Q", 4) == "quit"
    for text, words in (("31", "2, 4 are missing"), ("3152", "no answer 5"),
                        ("3312", "appears more than once"), ("3x12", "not an order"),
                        ("", "best first"), ("1234567891", "separate the numbers")):
        with pytest.raises(ValueError, match=words):
            parse_order(text, 10 if len(text) == 10 else 4)


# ---- a run with a (barely) fine-tuned model -------------------------------------------------
@pytest.fixture(scope="session")
def sft_run(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared micro run with base and sft models (a few steps each), built in-process."""
    from echolm.pipeline import run_config
    from echolm.train.pretrain import run_pretrain
    from echolm.train.sft import run_sft

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("rank") / "run"
    shutil.copytree(prepared_run, run)
    overrides = ["pretrain.max_steps=5", "sft.max_steps=2", "data.eval_problems=2",
                 "data.task_examples=20"]

    def quiet(*_a: object) -> None:
        pass

    with run_config(run, None, overrides, reconfigure=True) as cfg:
        run_pretrain(cfg, run, log=quiet)
        run_sft(cfg, run, log=quiet)
    return run


@pytest.fixture
def rank_run(sft_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(sft_run, dst)
    return dst


class Terminal:
    """`python -m echolm ARGS` on a real pseudo-terminal: read what it prints, type input."""

    def __init__(self, *args: str | Path) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "echolm", *map(str, args)],
                                     stdin=slave, stdout=slave, stderr=slave,
                                     env=subprocess_env(), start_new_session=True)
        os.close(slave)
        self.buffer = ""  # everything read so far, \r\n made \n
        self.mark = 0  # expect() searches from here

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child has gone and the terminal is closed
            data = b""
        if not data:
            return False
        self.buffer += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return True

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.buffer, self.mark)
            if m:
                self.mark = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 1.0)):
                raise AssertionError(f"did not see {pattern!r}; the terminal showed:\n"
                                     f"{self.buffer[-3000:]}")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def finish(self, timeout: float = 60) -> int:
        """Wait for the command to exit (reading what it still prints); its exit code."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # a failed test: do not leave it waiting for input
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


ASK = r"order, best first \(e\.g\. 312\), s = skip, q = quit: "


def _answers(block: str) -> str:
    """The numbered answers of one shown prompt (without its header line)."""
    return block.split("\n", 1)[1].rsplit("order, best first", 1)[0].strip()


def test_ranking_at_a_real_terminal_resumes_where_it_stopped(rank_run: Path):
    args = ["rank", "--run", rank_run, "--k", "3", "--n", "2", "--annotator", "tester", *FAST]
    with Terminal(*args) as t:
        prompt1 = t.expect(r"--- prompt 1 of 2 \(sft model, 3 answers\) ---\n(.*)\n").group(1)
        t.expect(ASK)
        assert all(f"\n[{i}] " in t.buffer for i in (1, 2, 3))
        t.send("12")  # incomplete: explained, asked again
        t.expect(r"rank all 3 answers, best first: 3 is missing\n" + ASK)
        t.send("3 1 4")
        t.expect(r"there is no answer 4: the answers are numbered 1-3\n" + ASK)
        t.send("312")
        t.expect(r"--- prompt 2 of 2 \(sft model, 3 answers\) ---\n")
        t.expect(ASK)
        shown2 = _answers(t.buffer[t.buffer.index("--- prompt 2"):])
        db = sqlite3.connect(rank_run / "prefs.sqlite")  # read while it is still running
        ((pid, ids_json, who),) = db.execute(
            "SELECT prompt_id, response_ids, annotator FROM rankings").fetchall()
        ids = [r[0] for r in db.execute("SELECT id FROM responses WHERE prompt_id = ? "
                                        "ORDER BY id", (pid,))]
        assert who == "tester" and json.loads(ids_json) == [ids[2], ids[0], ids[1]]
        assert db.execute("SELECT text FROM prompts WHERE id = ?", (pid,)).fetchone()[0] == \
            prompt1
        t.send("q")
        t.expect(r"ranked 1 this time .* 1 left - run the same command to continue")
        assert t.finish() == 0
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 6

    # again: the first prompt is done, the second shows the answers sampled last time
    with Terminal(*args) as t:
        t.expect(r"--- prompt 2 of 2 \(sft model, 3 answers, sampled earlier\) ---\n")
        t.expect(ASK)
        assert "prompt 1 of 2" not in t.buffer
        assert _answers(t.buffer[t.buffer.index("--- prompt 2"):]) == shown2
        t.send("2 3 1")
        t.expect(r"ranked 1 this time \(1 done before, 0 skipped, 0 with identical answers\)"
                 r"; 0 left")
        assert t.finish() == 0
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 6  # none resampled
    assert db.execute("SELECT COUNT(*) FROM rankings WHERE annotator = 'tester'"
                      ).fetchone()[0] == 2


def test_simulated_ranking_end_to_end_and_resume(rank_run: Path, echolm_cli):
    r = echolm_cli("rank", "--run", rank_run, "--simulated", "--k", "3", "--n", "4", *FAST)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["ranked"] == 4 and out["sampled"] == 4 and out["annotator"] == \
        "simulated:gold-v1:t0.1"
    assert out["store_counts"]["rankings"] == 4 and out["seconds"] > 0
    assert 0 <= out["gold_mean"] <= out["gold_best_mean"] <= 1
    db = sqlite3.connect(rank_run / "prefs.sqlite")
    for pid, ids_json in db.execute("SELECT prompt_id, response_ids FROM rankings"):
        stored = [r[0] for r in db.execute("SELECT id FROM responses WHERE prompt_id = ?",
                                           (pid,))]
        assert sorted(json.loads(ids_json)) == sorted(stored)  # every answer ranked
    rec = json.loads(db.execute("SELECT sampling FROM responses").fetchone()[0])
    assert rec["temperature"] == 1.0 and rec["max_tokens"] == 24 and "stopped" in rec
    stage, ckpt = db.execute("SELECT stage, checkpoint FROM responses").fetchone()
    assert stage == "sft" and Path(ckpt) == (rank_run / "sft").resolve()

    torch.set_num_threads(1)
    quiet = {"max_tokens": 24, "log": lambda _m: None}
    again = collect_rankings(rank_run, 4, 3, SimulatedAnnotator(), **quiet)
    assert again["already_ranked"] == 4 and again["ranked"] == 0 and again["sampled"] == 0
    # a second (noise-free) annotator ranks the same stored answers: nothing is resampled
    other = collect_rankings(rank_run, 4, 3, SimulatedAnnotator(temperature=0), **quiet)
    assert other["ranked"] == 4 and other["reused"] == 4 and other["sampled"] == 0
    assert other["gold_agreement"] in (None, 1.0)
    assert other["store_counts"] == {"prompts": 4, "responses": 12, "rankings": 8}


def test_user_errors_are_one_line(rank_run: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    cases = [
        (["--run", tmp_path / "nope"], "no such run directory"),
        (["--run", rank_run, "--prompts", bad], "bad.jsonl:2: field 'prompt' is missing"),
        (["--run", rank_run, "--annotator", "simulated"], "reserved for the simulated"),
        (["--run", rank_run, "--stage", "rlhf"], "no finished 'rlhf' model"),
    ]
    for args, words in cases:
        assert main(["rank", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    for args in (["--simulated", "--annotator", "x"], ["--k", "1"]):  # argparse's usage error
        with pytest.raises(SystemExit) as e:
            main(["rank", "--run", str(rank_run), *args])
        assert e.value.code == 2
    assert "argument --k: expected a whole number >= 2 and <= 16, got 1" in capsys.readouterr().err


def test_answers_can_be_sampled_at_a_mix_of_temperatures(rank_run: Path):
    run = rank_run  # a fresh copy per test
    torch.set_num_threads(1)
    got = collect_rankings(run, 3, 4, SimulatedAnnotator(), temperature=[0.5, 2.0],
                           max_tokens=16, log=lambda _m: None)
    assert got["ranked"] + got["identical"] == 3
    db = sqlite3.connect(run / "prefs.sqlite")
    for (pid,) in db.execute("SELECT id FROM prompts"):
        temps = sorted(json.loads(s)["temperature"] for (s,) in db.execute(
            "SELECT sampling FROM responses WHERE prompt_id = ?", (pid,)))
        assert set(temps) <= {0.5, 2.0} and temps.count(2.0) <= 2 and temps.count(0.5) <= 2
        assert 2.0 in temps  # a temperature of 2 always gives distinct answers here


def test_a_ranking_budget_fits_the_number_of_prompts_and_is_resumable(rank_run: Path):
    """With a budget, as many whole batches as fit are ranked; the result says what was
    planned and what ran, and the same batches resume exactly."""
    torch.set_num_threads(1)
    kw = {"max_tokens": 8, "log": lambda _m: None, "batch": 4}
    # 2000 prompts (each a few ms here) never fit 2 s, on a fast CPU either
    got = collect_rankings(rank_run, 2000, 2, SimulatedAnnotator(), budget_s=2.0, **kw)
    assert got["fitted"] and got["planned_prompts"] == 2000 and not got["cut_short"]
    assert 8 <= got["prompts"] < 2000 and got["prompts"] % 4 == 0
    assert got["ranked"] + got["identical"] == got["prompts"]
    assert got["schedule"].startswith(f"planned 2000 prompts; this machine fits "
                                      f"{got['prompts']} in 0.0 min (")
    assert got["schedule"].endswith(f" s each): ran {got['prompts']}")
    again = collect_rankings(rank_run, got["prompts"], 2, SimulatedAnnotator(), **kw)
    assert again["already_ranked"] == got["ranked"] and again["sampled"] == 0


class StopsAt(SimulatedAnnotator):
    """The simulated annotator, stopped by Ctrl-C as it is about to rank prompt `n`."""

    def __init__(self, n: int, temperature: float, seed: int) -> None:
        super().__init__(temperature, seed)
        self.left = n - 1

    def rank(self, *args):  # noqa: ANN002, ANN201
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return super().rank(*args)


def test_the_rank_stage_counts_the_rankings_made_before_an_interruption(rank_run: Path):
    from echolm.pipeline import resolve_run_config, run_rank_stage
    from echolm.summary import read_summary

    torch.set_num_threads(1)
    cfg = resolve_run_config(rank_run, None, ["rank.prompts=4", "rank.k=2"],
                             reconfigure=True)
    stopping = StopsAt(3, cfg.rank.annotator_noise, cfg.sft.seed)
    with pytest.raises(KeyboardInterrupt):
        collect_rankings(rank_run, 4, 2, stopping, temperature=cfg.rank.temperatures,
                         log=lambda _m: None)
    db = sqlite3.connect(rank_run / "prefs.sqlite")
    assert db.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == 2
    assert not (rank_run / "rank_done.json").exists()

    result = run_rank_stage(cfg, rank_run, log=lambda _m: None)  # the same command again
    assert result["already_ranked"] == 2 and result["ranked"] + result["identical"] == 2
    rankings = db.execute("SELECT response_ids FROM rankings WHERE annotator = ?",
                          (stopping.label,)).fetchall()
    summary = read_summary(rank_run)["rank"]
    assert summary["ranked"] == result["ranked_total"] == len(rankings) == 2 + result["ranked"]
    assert summary["responses"] == sum(len(json.loads(r[0])) for r in rankings)
