"""A corrupt file in a run directory (cut, overwritten, edited by hand) is one line on stderr
naming it, what is wrong and what to do, exit code 2, no traceback; and results are never
stale: a cached evaluation belongs to the exact model file it measured."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from test_reward_model import make_store, random_backbone

from echolm.checkpoint import file_fingerprint, save_model, save_weights
from echolm.cli import main
from echolm.config import ModelConfig
from echolm.machine import describe
from echolm.metrics import read_metrics
from echolm.model import Transformer
from echolm.reward import META_FILE, reward_model_from_backbone

# what each kind of corruption writes
GARBAGE = bytes(range(256)) * 3  # not UTF-8, not JSON, not SQLite
CONTENT = {"bytes": GARBAGE, "text": b"hello, this is not JSON\n", "list": b"[1, 2, 3]\n",
           "cut": b'{"tokenizer": {"vocab_size": 51'}
EVAL = ["--set", "data.humaneval=0", "--set", "data.gold_prompts=2", "--set",
        "data.eval_problems=2"]


@pytest.fixture(scope="module")
def template(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro run directory with every kind of run file, none trained here: the prepared
    tokenizer and tokens, random base and SFT models (different weights), a reward model
    on the SFT backbone, a preference store, and the small JSON files a run keeps."""
    run = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(prepared_run, run)
    random_backbone(run, seed=0)  # -> sft/
    torch.manual_seed(1)
    base = Transformer(ModelConfig(**json.loads((run / "sft" / "config.json").read_text())))
    torch.nn.init.normal_(base.lm_head.weight, std=0.5)
    save_model(base, run / "base")
    rm = reward_model_from_backbone(run / "sft")
    save_weights(rm.state_dict(), rm.cfg, run / "rm")
    (run / "rm" / META_FILE).write_text(json.dumps({"max_len": 128}))
    make_store(run, n_prompts=12)
    # the settings the commands below use, saved as the run's own (a --set that changed them
    # would be refused, or for eval noted on stderr)
    config = json.loads((run / "config.json").read_text())
    config["data"].update(humaneval=0, gold_prompts=2, eval_problems=2)
    config["dpo"]["max_steps"] = 1
    (run / "config.json").write_text(json.dumps(config))
    for name, value in {"timings.json": {"tokenizer": {"seconds": 1.0}},
                        "machine.json": describe(measure=False),
                        "status.json": {"failed_stage": None},
                        "eval/sft.json": {"stage": "sft"}}.items():
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(json.dumps(value))
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(template, dst)
    return dst


def echolm(capsys: pytest.CaptureFixture, run: Path, *args: str) -> tuple[int, str, str]:
    """`echolm ARGS --run RUN` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([*args, "--run", str(run)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, path: Path, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("echolm: error: "), err
    assert f"{path}:" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# (file in the run, what it is overwritten with, the command that reads it, what to do)
CASES = [
    ("config.json", "bytes", ["sft"], "--preset"),
    ("config.json", "list", ["eval"], "--preset"),
    ("config.json", '{"model": {"n_layer": "two"}}', ["sft"], "--preset"),
    ("config.json", '{"model": 5}', ["rl"], "--preset"),
    ("summary.json", "bytes", ["pretrain"], "delete it"),
    ("summary.json", "list", ["report"], "delete it"),
    ("summary.json", '{"tokenizer": 5}', ["rm"], "delete it"),
    ("summary.json", "cut", ["tokenizer", "train"], "delete it"),
    ("tokenizer/done.json", "text", ["tokenizer", "train"], "--force"),
    ("base/done.json", "bytes", ["pretrain"], "echolm pretrain --force"),
    ("sft/done.json", "list", ["sft"], "echolm sft --force"),
    ("rl/done.json", "text", ["rl"], "echolm rl --force"),
    ("rm/done.json", "bytes", ["rm"], "echolm rm --force"),
    ("rlhf/done.json", "cut", ["rlhf"], "echolm rlhf --force"),
    ("dpo/done.json", "list", ["dpo"], "echolm dpo --force"),
    ("rank_done.json", "text", ["run"], "delete it"),
    ("timings.json", "text", ["report"], "delete it"),
    ("timings.json", '{"sft": 3}', ["run"], "delete it"),
    ("machine.json", "list", ["report"], "delete it"),
    ("machine.json", '{"cpu": "x"}', ["report"], "field 'cores' is missing"),
    ("timings.json", '{"sft": {"minutes": 3}}', ["report"], "'sft' has no number of seconds"),
    ("status.json", "bytes", ["report"], "delete it"),
    ("eval/sft.json", "cut", ["report"], "echolm eval"),
    ("sft/config.json", "list", ["chat", "--stage", "sft", "--prompt", "hi"], "--force"),
    ("sft/config.json", '{"n_layer": 2.5}', ["eval", "--stage", "sft"], "--force"),
    ("sft/config.json", '{"n_layer": -2}', ["explain", "hello", "--stage", "sft"], "--force"),
    ("rm/reward_model.json", "bytes", ["rlhf"], "echolm rm --force"),
    ("rm/reward_model.json", '{"max_len": "long"}', ["rlhf"], "echolm rm --force"),
    ("base/ckpt/latest", "bytes", ["pretrain"], "step_"),
    ("tokens/train_000.npy", "text", ["pretrain"], "delete"),
]


@pytest.mark.parametrize("name, content, command, fix", CASES,
                         ids=[f"{c[0]}-{c[2][0]}-{i}" for i, c in enumerate(CASES)])
def test_a_corrupt_run_file_is_one_line_naming_it(run, capsys, name, content, command, fix):
    path = run / name
    if command == ["run"]:  # the stages before rank finished (what they hold is not read)
        for stage in ("base", "sft", "rl"):
            (run / stage).mkdir(exist_ok=True)
            (run / stage / "done.json").write_text(json.dumps({"stage": stage}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(CONTENT.get(content) or content.encode())
    before = _files(run)
    code, _, err = echolm(capsys, run, *command)
    assert_one_line(code, err, path, fix)
    assert _files(run) == before  # nothing the run held was changed or lost


def _files(run: Path) -> dict[Path, bytes]:
    """Every file of the run but those `echolm run` rewrites as it goes (its machine
    description, status, the times of the stages it skipped, and its report)."""
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name not in ("machine.json", "status.json", "timings.json")
            and "report" not in p.parts}


def test_dpo_force_with_a_corrupt_summary_stops_before_training(run, capsys):
    """It used to train to the end and then fail to record its result: now the summary is
    read first, and the finished DPO folder that --force would replace is left as it was."""
    (run / "dpo").mkdir()
    (run / "dpo" / "done.json").write_text('{"finished": true}')
    (run / "summary.json").write_bytes(GARBAGE)
    code, out, err = echolm(capsys, run, "dpo", "--force")
    assert_one_line(code, err, run / "summary.json", "not a JSON file")
    assert (run / "dpo" / "done.json").read_text() == '{"finished": true}'
    assert sorted(p.name for p in (run / "dpo").iterdir()) == ["done.json"]
    assert "metrics.jsonl" not in {p.name for p in run.iterdir()}  # not one step taken


def _sql(run: Path, sql: str) -> None:
    db = sqlite3.connect(run / "prefs.sqlite")
    db.executescript(sql)
    db.commit()
    db.close()


def _foreign(run: Path) -> None:
    (run / "prefs.sqlite").unlink()
    _sql(run, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")


# a damaged preference store, and the words its one line must hold (the store is refused as
# it is opened; a bad row when it is read: `echolm rm` and `echolm dpo` read every ranking)
STORES = {
    "random bytes": (lambda run: (run / "prefs.sqlite").write_bytes(GARBAGE),
                     "not a readable preference store"),
    "a text file": (lambda run: (run / "prefs.sqlite").write_bytes(CONTENT["text"]),
                    "not a readable preference store"),
    "cut in half": (lambda run: (run / "prefs.sqlite").write_bytes(
        (run / "prefs.sqlite").read_bytes()[:12288]), "prefs.sqlite"),
    "a foreign database": (_foreign, "no table 'prompts'; it has users"),
    "a missing column": (lambda run: _sql(
        run, "ALTER TABLE rankings RENAME COLUMN annotator TO who"),
        "table 'rankings' has no column annotator"),
    "response_ids not JSON": (lambda run: _sql(
        run, "UPDATE rankings SET response_ids = '[3, 2' WHERE id = 2"),
        "rankings row 2: response_ids '[3, 2' is not a list"),
    "response_ids a number": (lambda run: _sql(
        run, "UPDATE rankings SET response_ids = '7' WHERE id = 3"), "rankings row 3"),
    "an unknown response id": (lambda run: _sql(
        run, "UPDATE rankings SET response_ids = '[1, 99999]' WHERE id = 1"),
        "rankings row 1: response_ids names response 99999"),
    "another prompt's response": (lambda run: _sql(
        run, "UPDATE rankings SET response_ids = (SELECT response_ids FROM rankings WHERE "
             "id = 2) WHERE id = 1"), "which is not an answer to its prompt"),
    "a damaged sampling record": (lambda run: _sql(
        run, "UPDATE responses SET sampling = '{{' WHERE id = 4"),
        "responses row 4: sampling '{{' is not a JSON object"),
}


@pytest.mark.parametrize("damage", list(STORES))
def test_a_damaged_preference_store_is_one_line(run, capsys, damage):
    break_it, words = STORES[damage]
    command = ["rm"] if list(STORES).index(damage) % 2 else ["dpo"]
    break_it(run)
    before = (run / "prefs.sqlite").read_bytes()
    code, _, err = echolm(capsys, run, *command)
    assert_one_line(code, err, run / "prefs.sqlite", words)
    assert (run / "prefs.sqlite").read_bytes() == before  # refused untouched
    assert not (run / command[0] / "ckpt").exists()  # before the first step


@pytest.mark.parametrize("damage", ["random bytes", "a foreign database"])
def test_rank_refuses_a_damaged_store_before_writing(run, capsys, damage):
    break_it, words = STORES[damage]
    break_it(run)
    before = (run / "prefs.sqlite").read_bytes()
    code, _, err = echolm(capsys, run, "rank", "--simulated", "--n", "1")
    assert_one_line(code, err, run / "prefs.sqlite", words)
    assert (run / "prefs.sqlite").read_bytes() == before


def test_the_one_line_says_how_to_mend_a_bad_row_and_that_works(run, capsys):
    _sql(run, "UPDATE responses SET sampling = 'oops' WHERE id = 4")
    code, _, err = echolm(capsys, run, "dpo", "--set", "dpo.max_steps=1")
    assert_one_line(code, err, run / "prefs.sqlite", "responses row 4")
    fix = err.split('"')[1]  # the SQL statement the line suggests
    assert fix == "UPDATE responses SET sampling = '{}' WHERE id = 4"
    _sql(run, fix)
    from echolm.rankings import load_rankings

    assert len(load_rankings(run)) == 12


def _eval(capsys, run: Path, *args: str) -> tuple[int, str, dict]:
    code, out, err = echolm(capsys, run, "eval", "--stage", "sft", *EVAL, *args)
    assert code == 0, err
    return code, out, json.loads((run / "eval" / "sft.json").read_text())


def test_eval_results_follow_the_model_file_they_measured(run, capsys):
    (run / "eval" / "sft.json").unlink()
    weights = run / "sft" / "model.safetensors"
    _, out, first = _eval(capsys, run)
    assert "eval: sft" in out
    assert first["measured_on"]["models"] == {"sft": file_fingerprint(weights),
                                              "base": file_fingerprint(run / "base" /
                                                                       "model.safetensors")}
    _, out, again = _eval(capsys, run)
    assert "eval: sft" not in out and again == first  # the same file: not measured twice

    # the result file cut by a kill, the cache of the model's measurements overwritten (a
    # cache: measured again, said so, exit 0, and the same numbers)
    (run / "eval" / "sft.json").write_bytes(CONTENT["cut"])
    cache = run / "eval" / "cache" / f"{file_fingerprint(weights)}.json"
    cache.write_bytes(GARBAGE)
    _, out, mended = _eval(capsys, run)
    assert f"warning: {run / 'eval' / 'sft.json'}: not valid JSON" in out and "eval: sft" in out
    assert f"warning: {cache}: not a JSON file" in out
    assert mended["val_bpb"] == first["val_bpb"] and json.loads(cache.read_text())

    # SFT retrained (other weights in the same file): measured again, never the old numbers
    shutil.copyfile(run / "base" / "model.safetensors", weights)
    _, out, second = _eval(capsys, run)
    assert "measuring sft again" in out and "eval: sft" in out
    assert second["measured_on"]["models"]["sft"] == file_fingerprint(weights)
    assert second["measured_on"]["models"]["sft"] != first["measured_on"]["models"]["sft"]
    assert second["val_bpb"] != first["val_bpb"]
    before = (run / "eval" / "sft.json").read_bytes()

    # the model file cut short: an error naming it, exit 2, not the cached numbers
    weights.write_bytes(weights.read_bytes()[:5000])
    code, out, err = echolm(capsys, run, "eval", "--stage", "sft", *EVAL)
    assert_one_line(code, err, weights, "truncated")
    assert "val_bpb" not in out and (run / "eval" / "sft.json").read_bytes() == before


def test_the_report_leaves_out_results_of_a_model_replaced_since(run, capsys):
    (run / "eval" / "sft.json").unlink()
    assert echolm(capsys, run, "eval", *EVAL)[0] == 0
    bpb = json.loads((run / "eval" / "base.json").read_text())["val_bpb"]
    base, tokens = bpb["value"], bpb["tokens"]
    shutil.copyfile(run / "base" / "model.safetensors", run / "sft" / "model.safetensors")
    code, out, err = echolm(capsys, run, "report")
    assert code == 0, err
    assert f"{run / 'eval' / 'sft.json'} measured other model files" in out
    report = (run / "report" / "report.md").read_text()
    assert f"| held-out bits/byte ({tokens:,} tokens) | {base:.3f} | – |" in report


def test_metrics_log_skips_lines_it_cannot_read(tmp_path):
    """metrics.jsonl is a log for the plots: a line cut by a kill, garbage bytes or a line
    that is not a record are left out, never an error."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"stage": "base", "step": 1, "loss": 2.0}\n' + GARBAGE + b"\n[1, 2]\n"
                     b'{"stage": "base", "step": "x"}\n{"stage": "base", "step": 2, "lo')
    assert read_metrics(path, "base") == [{"stage": "base", "step": 1, "loss": 2.0}]
