"""Nothing a user types destroys their work: a run's config.json changes only when asked
(--reconfigure), and only by a command that succeeded; every setting and every CLI number is
checked when the command starts, before anything runs, with one line naming the field."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env
from test_chat import trained_run

from echolm.cli import main
from echolm.settings import load_config


@pytest.fixture(scope="session")
def finished_run(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared micro run with finished base and sft models (test_chat's)."""
    return trained_run(prepared_run, tmp_path_factory.getbasetemp())


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "finished"
    shutil.copytree(finished_run, dst)
    return dst


def cli(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str]:
    """`echolm ARGS` in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


# ---- every section's settings, checked before anything runs --------------------------------
BAD = [
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size=100 is too small: must be >= 269"),
    ("tokenizer.train_bytes=0", "tokenizer.train_bytes=0 must be >= 1"),
    ("model.rope_theta=nan", "model.rope_theta=nan must be a finite number > 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0 must be a finite number > 0"),
    ("model.init_std=inf", "model.init_std=inf must be a finite number > 0"),
    ("model.mlp_hidden=-64", "model.mlp_hidden=-64 must be >= 0"),
    ("model.head_dim=7", r"model.head_dim=7 \(0: n_embd // n_head\) must be even"),
    ("data.pretrain=[]", "data.pretrain is empty"),
    ('data.sft=["hf:"]', "data.sft: source 'hf:': expected"),
    ('data.tasks=["nosuch"]', "data.tasks: 'nosuch': unknown task"),
    ('data.tasks=["spelling:examples=x"]', "data.tasks: 'spelling:examples=x': examples must"),
    ("data.val_fraction=1", r"data.val_fraction=1.0 must be in \[0, 1\)"),
    ("data.gold_prompts=-1", "data.gold_prompts=-1 must be >= 0"),
    ("pretrain.lr_matrix=-1", "pretrain.lr_matrix=-1.0 must be a finite number > 0"),
    ("pretrain.lr_matrix=nan", "pretrain.lr_matrix=nan must be a finite number > 0"),
    ("pretrain.seed=-1", r"pretrain.seed=-1 must be a whole number in \[0, 2\^32\)"),
    ("pretrain.seq_len=4096", "pretrain.seq_len=4096 exceeds model.max_seq_len=256"),
    ("pretrain.max_steps=99999999999999999999", "pretrain.max_steps=99999999999999999999 is out"),
    ("sft.final_lr_frac=2", r"sft.final_lr_frac=2.0 must be in \[0, 1\]"),
    ("sft.parallel=fsdp", "sft.parallel='fsdp': FSDP is implemented for pretraining only"),
    ("rl.group_size=0", "rl.group_size=0 must be >= 1"),
    ("rl.prompts_per_step=0", "rl.prompts_per_step=0 must be >= 1"),
    ("rl.eval_samples=0", "rl.eval_samples=0 must be >= 1"),
    ("rl.tasks=[]", "rl.tasks is empty"),
    ("rl.temperature=-1", "rl.temperature=-1.0 must be a finite number > 0"),
    ("rl.clip_low=1", r"rl.clip_low=1.0 must be in \[0, 1\)"),
    ("rl.max_tokens=256", "rl.max_tokens=256 leaves no room for the prompt"),
    ("rank.k=1", "rank.k=1 must be between 2 and 16"),
    ("rank.temperatures=[1.0, nan]", r"rank.temperatures=\[1.0, nan\] must be finite"),
    ("rm.loss=foo", "rm.loss='foo': expected bt or pl"),
    ("rm.epochs=nan", "rm.epochs=nan must be a finite number >= 0"),
    ("rlhf.algorithm=foo", "rlhf.algorithm must be ppo, rloo, grpo or best, got 'foo'"),
    ("rlhf.max_tokens=-1", "rlhf.max_tokens=-1 must be >= 1"),
    ("rlhf.temperature=-1", "rlhf.temperature=-1.0 must be a finite number > 0"),
    ("rlhf.clip=1.5", r"rlhf.clip=1.5 must be in \[0, 1\)"),
    ("dpo.temperatures=[-1.0]", r"dpo.temperatures=\[-1.0\] must be positive"),
    ("dpo.beta=0", "dpo.beta=0.0 must be a finite number > 0"),
    ("dpo.trackers=mlflow", "dpo.trackers: unknown tracker 'mlflow'"),
    ('data.pretrain=["/no/such/corpus"]', "data.pretrain: source '/no/such/corpus': no such"),
    # the fields of earlier layouts are told where they went
    ("grpo.group_size=0", "grpo.group_size is now rl.group_size"),
    ("ppo.algorithm=foo", "ppo.algorithm is now rlhf.algorithm"),
]


@pytest.mark.parametrize("bad, words", BAD, ids=[b for b, _ in BAD])
def test_a_bad_setting_is_one_line_before_anything_runs(bad, words, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = cli(capsys, "run", "--out", run, "--preset", "micro", "--set", bad)
    assert code == 2
    assert err.startswith("echolm: error: ") and err.count("\n") == 1, err
    assert re.search(words, err), err
    assert not run.exists()  # nothing was created, no stage ran


def test_every_field_of_every_section_has_a_check():
    """A wrong value of each kind (below range, nan, inf, unknown name) is refused for every
    field the probe can reach: nothing slips through to a stage."""
    import dataclasses
    import typing

    from echolm.errors import EchoError

    cfg = load_config("micro")
    bad = {int: ["-1", "99999999999999999999"], float: ["-1", "nan", "inf"], str: ["foo"]}
    # any name; derived from the tokenizer; paths (run.source: checked when a run starts,
    # test_run_from.py; run.beside: read by the report, which says when nothing is there)
    fine = {"data.rankings_annotator", "model.vocab_size", "run.source", "run.beside"}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        hints = typing.get_type_hints(type(section))
        for g in dataclasses.fields(section):
            name = f"{f.name}.{g.name}"
            for value in bad.get(hints[g.name], []):
                if name in fine:
                    continue
                with pytest.raises(EchoError, match=name.replace(".", r"\.")):
                    load_config("micro", [f"{name}={value}"])


def test_a_saved_config_of_an_earlier_layout_is_checked_under_the_new_names(run_copy, capsys):
    """[grpo] / [ppo] of an earlier config.json land in rl / rlhf, and their checks."""
    for old, new, words in [("grpo", "rl", "rl.group_size=0 must be >= 1"),
                            ("ppo", "rlhf", "rlhf.max_tokens=-1 must be >= 1")]:
        d = load_config("micro").to_dict()
        key = words.split("=")[0].split(".")[1]
        d[old] = {key: int(words.split("=")[1].split()[0])}
        del d[new][key]
        (run_copy / "config.json").write_text(json.dumps(d))
        before = (run_copy / "config.json").read_bytes()
        code, err = cli(capsys, "rl", "--run", run_copy)
        assert code == 2 and words in err and "config.json" in err and "--reconfigure" in err
        assert err.count("\n") == 1
        assert (run_copy / "config.json").read_bytes() == before


def test_a_bad_algorithm_fails_at_once_with_no_stage_run(tmp_path):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["run", "--out", str(run), "--preset", "micro", "--set",
                 "rlhf.algorithm=foo"]) == 2
    assert time.perf_counter() - t0 < 0.5  # the check itself; no stage, no model, no data
    r = subprocess.run([sys.executable, "-m", "echolm", "run", "--out", str(run), "--preset",
                        "micro", "--set", "rlhf.algorithm=foo"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "echolm: error: rlhf.algorithm must be ppo, rloo, grpo or best, got " \
                       "'foo'\n"
    assert not run.exists()


# ---- config.json changes only when asked, and only by a command that succeeded -------------
def test_eval_with_another_preset_leaves_config_json_byte_identical(run_copy, capsys):
    before = (run_copy / "config.json").read_bytes()
    code, err = cli(capsys, "eval", "--run", run_copy, "--preset", "cpu", "--stage", "base",
                    "--json", "--set", "data.humaneval=0", "--set", "data.gold_prompts=0",
                    "--set", "data.eval_problems=2", "--set", 'data.tasks=["identity"]',
                    "--set", "pretrain.eval_tokens=512", "--force")
    assert code == 0, err
    assert "for this command only" in err and 'preset: "micro" -> "cpu"' in err
    assert (run_copy / "config.json").read_bytes() == before
    assert json.loads((run_copy / "eval" / "base.json").read_text())["tasks"]["identity"]["n"] == 2


def test_a_set_that_changes_a_saved_value_is_refused_with_the_diff(run_copy, capsys):
    before = (run_copy / "config.json").read_bytes()
    code, err = cli(capsys, "sft", "--run", run_copy, "--set", "sft.max_steps=7",
                    "--set", "rl.group_size=3", "--set", "sft.eval_every=3")  # the last: same
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == (f"echolm: error: {run_copy / 'config.json'}: --set would change 2 saved "
                        "settings of this run; add --reconfigure to change them, or leave them "
                        "out to go on as saved:")
    assert lines[1:] == ["  sft.max_steps: 3 -> 7", "  rl.group_size: 4 -> 3"]
    assert (run_copy / "config.json").read_bytes() == before
    code, err = cli(capsys, "run", "--out", run_copy, "--preset", "cpu")
    assert code == 2 and '  preset: "micro" -> "cpu"' in err and "  model.n_layer: 2 -> " in err
    assert (run_copy / "config.json").read_bytes() == before
    code, err = cli(capsys, "sft", "--run", run_copy, "--set", "sft.max_steps=3")  # no change
    assert code == 0, err
    assert (run_copy / "config.json").read_bytes() == before


def test_reconfigure_saves_once_the_command_succeeded(run_copy, capsys):
    before = json.loads((run_copy / "config.json").read_text())
    code, err = cli(capsys, "sft", "--run", run_copy, "--reconfigure", "--set",
                    "sft.max_steps=7", "--set", "rl.group_size=3")
    assert code == 0, err  # sft: already finished
    after = json.loads((run_copy / "config.json").read_text())
    assert (after["sft"]["max_steps"], after["rl"]["group_size"]) == (7, 3)
    after["sft"]["max_steps"], after["rl"]["group_size"] = 3, 4
    assert after == before  # nothing else changed


def test_a_reconfigure_whose_command_fails_saves_nothing(run_copy, run_dir, capsys):
    before = (run_dir / "config.json").read_bytes()
    code, err = cli(capsys, "sft", "--run", run_dir, "--reconfigure", "--set", "sft.max_steps=7")
    assert code == 2 and "base" in err  # no base model to fine-tune
    assert (run_dir / "config.json").read_bytes() == before
    # a shape the finished base model does not have: refused before the stage, naming the field
    before = (run_copy / "config.json").read_bytes()
    code, err = cli(capsys, "sft", "--run", run_copy, "--reconfigure", "--set", "model.n_layer=3")
    assert code == 2
    assert err == (f"echolm: error: model.n_layer=3 does not match the base model in "
                   f"{run_copy / 'base'} (n_layer=2); a different shape needs a new run "
                   "directory\n")
    assert (run_copy / "config.json").read_bytes() == before


# ---- every CLI number: finite and in range, argparse's one-line usage error -----------------
@pytest.mark.parametrize("args, words", [
    (["serve", "--run", "x", "--port", "-1"], "argument --port: expected a whole number >= 1 "
                                              "and <= 65535, got -1"),
    (["sandbox", "f.py", "--timeout", "nan"], "argument --timeout: expected a finite number "
                                              ">= 0.01 and <= 86400, got nan"),
    (["chat", "--run", "x", "--temperature", "nan"], "argument --temperature: expected a finite "
                                                     "number >= 0, got nan"),
])
def test_a_bad_cli_number_exits_2_with_one_line(args, words):
    r = subprocess.run([sys.executable, "-m", "echolm", *args], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == f"echolm {args[0]}: error: {words}"


@pytest.mark.parametrize("args", [
    ["serve", "--run", "x", "--port", "70000"], ["serve", "--run", "x", "--threads", "0"],
    ["serve", "--run", "x", "--max-n", "0"], ["serve", "--run", "x", "--max-tokens", "-5"],
    ["sandbox", "f.py", "--timeout", "inf"], ["sandbox", "f.py", "--memory-mb", "-1"],
    ["chat", "--run", "x", "--temperature", "-1"], ["chat", "--run", "x", "--top-k", "-1"],
    ["chat", "--run", "x", "--top-p", "0"],
    ["chat", "--run", "x", "--top-p", "1.5"], ["chat", "--run", "x", "--max-tokens", "0"],
    ["chat", "--run", "x", "--seed", "-3"], ["explain", "--run", "x", "--generate", "-1"],
    ["explain", "--run", "x", "--top-k", "0"], ["explain", "--run", "x", "--temperature", "inf"],
    ["rank", "--run", "x", "--k", "1"], ["rank", "--run", "x", "--k", "17"],
    ["rank", "--run", "x", "--n", "0"], ["rank", "--run", "x", "--noise", "nan"],
    ["rank", "--run", "x", "--temperature", "0"], ["rank", "--run", "x", "--seed", "1.5"],
])
def test_every_cli_number_is_checked_by_argparse(args, capsys):
    code, err = cli(capsys, *args)
    assert code == 2
    assert err.splitlines()[-1].startswith(f"echolm {args[0]}: error: argument {args[-2]}: "
                                           "expected a ")
