"""--force never destroys work (issue #15): `export hf` / `import hf` refuse an --out that is,
holds or lies inside the run, the source or a run directory, and replace only an earlier
export / import; a forced stage reads its inputs before it writes anything and builds its new
output beside the old one, which stays (files, done.json, summary.json entry, metrics) until
the new one is complete and swapped in; a forced run killed and started again resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import data_overrides, subprocess_env
from test_reward_model import pref_run, pref_template  # noqa: F401  (fixtures)

from echolm.cli import main
from echolm.settings import load_config
from echolm.staging import ForcePass, StageOutput


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, byte for byte."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def quiet(*_a: object) -> None:
    pass


@pytest.fixture(scope="module")
def finished_run(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory,
                 corpus: Path) -> Path:
    """A micro run with finished tokenizer, base and sft stages (a few steps each)."""
    from echolm.pipeline import run_config
    from echolm.train.pretrain import run_pretrain
    from echolm.train.sft import run_sft

    run = tmp_path_factory.mktemp("finished") / "run1"
    shutil.copytree(prepared_run, run)
    with run_config(run, "micro", [
            *data_overrides(corpus), "pretrain.max_steps=4", "pretrain.eval_every=0",
            "pretrain.eval_tokens=512", "sft.max_steps=2", "sft.eval_every=0",
            'data.tasks=["identity"]', "data.eval_problems=2", "data.task_examples=20",
            "data.open_examples=0"], reconfigure=True) as cfg:
        run_pretrain(cfg, run, log=quiet)
        run_sft(cfg, run, log=quiet)
    return run


@pytest.fixture
def run1(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, in a folder of its own (runs/run1)."""
    dst = tmp_path / "runs" / "run1"
    shutil.copytree(finished_run, dst)
    return dst


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.startswith("echolm: error: ") and err.count("\n") == 1, err
    return err


# ---- export / import ------------------------------------------------------------------------

def test_export_force_into_the_run_or_what_holds_it_is_refused(run1, capsys):
    runs = run1.parent
    assert main(["export", "hf", "--run", str(run1), "--out", str(runs / "hf")]) == 0
    capsys.readouterr()
    before = snapshot(runs)
    for out, words in [(run1, f"--out {run1}: is the run directory being exported"),
                       (runs, f"--out {runs}: holds the run directory being exported"),
                       (run1 / "hf", f"--out {run1 / 'hf'}: lies inside the run directory "
                                     "being exported"),
                       (run1 / "sft", "lies inside the run directory being exported")]:
        assert main(["export", "hf", "--run", str(run1), "--out", str(out), "--force"]) == 2
        assert words in _one_line(capsys)
    assert snapshot(runs) == before  # the run, and the earlier export beside it, untouched


def test_export_force_replaces_an_earlier_export_and_nothing_else(run1, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "hf", "--run", str(run1), "--stage", "base", "--out", str(out)]) == 0
    assert json.loads((out / "echolm.json").read_text())["stage"] == "base"
    assert main(["export", "hf", "--run", str(run1), "--stage", "sft", "--out", str(out)]) == 2
    assert "already exists and is not empty (use --force" in _one_line(capsys)
    assert main(["export", "hf", "--run", str(run1), "--stage", "sft", "--out", str(out),
                 "--force"]) == 0
    assert json.loads((out / "echolm.json").read_text())["stage"] == "sft"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "runs"]  # nothing left aside

    # an export someone added a file to is no longer only an export: refused, kept as it is
    (out / "README.md").write_text("my notes")
    before = snapshot(out)
    assert main(["export", "hf", "--run", str(run1), "--out", str(out), "--force"]) == 2
    err = _one_line(capsys)
    assert f"--out {out}: not an earlier export as written (it holds README.md)" in err
    assert snapshot(out) == before

    # another run directory, a plain folder, a file: refused with or without --force
    other = tmp_path / "run2"
    shutil.copytree(run1, other)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    for target, words in [(other, "is a run directory"), (folder, "(it holds cat.jpg)"),
                          (tmp_path / "file", "is a file, not a folder")]:
        before = snapshot(tmp_path)
        assert main(["export", "hf", "--run", str(run1), "--out", str(target), "--force"]) == 2
        assert words in _one_line(capsys)
        assert snapshot(tmp_path) == before


def test_import_force_into_its_source_is_refused(run1, tmp_path, capsys):
    src = tmp_path / "hub" / "model"
    assert main(["export", "hf", "--run", str(run1), "--out", str(src)]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path / "hub")
    for out, words in [(src, "is the checkpoint being imported"),
                       (src.parent, "holds the checkpoint being imported"),
                       (src / "run", "lies inside the checkpoint being imported"),
                       (run1 / "imported", "lies inside the run directory")]:
        assert main(["import", "hf", str(src), "--out", str(out), "--force"]) == 2
        assert words in _one_line(capsys)
    assert snapshot(tmp_path / "hub") == before

    # an earlier import is replaced; one that later stages were trained into is not
    run = tmp_path / "imported"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 0
    assert main(["import", "hf", str(src), "--out", str(run), "--force"]) == 0
    assert (run / "base" / "model.safetensors").exists()
    shutil.copytree(run1 / "sft", run / "sft")
    before = snapshot(run)
    capsys.readouterr()
    assert main(["import", "hf", str(src), "--out", str(run), "--force"]) == 2
    assert "(it holds sft/)" in _one_line(capsys)
    assert snapshot(run) == before


# ---- a stage's --force ----------------------------------------------------------------------

@pytest.mark.parametrize("stage, folder, damaged", [
    ("sft", "sft", "base/model.safetensors"),
    ("sft", "sft", "tokenizer/tokenizer.json"),
    ("pretrain", "base", "tokenizer/tokenizer.json"),
])
def test_forced_stage_with_unreadable_input_keeps_its_old_output(run1, capsys, stage, folder,
                                                                 damaged):
    old, summary = snapshot(run1 / folder), (run1 / "summary.json").read_bytes()
    path = run1 / damaged
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert main([stage, "--out", str(run1), "--force"]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"echolm: error: {path}: "), err
    assert snapshot(run1 / folder) == old and (run1 / "summary.json").read_bytes() == summary
    assert not (run1 / f".{folder}.force").exists()  # nothing written: the inputs come first


def test_forced_stage_that_completes_replaces_output_summary_and_metrics(run1, capsys):
    old_model = (run1 / "sft" / "model.safetensors").read_bytes()
    old = json.loads((run1 / "summary.json").read_text())
    assert old["sft"]["steps"] == 2
    assert main(["sft", "--out", str(run1), "--force", "--reconfigure",
                 "--set", "sft.max_steps=3"]) == 0
    new = json.loads((run1 / "summary.json").read_text())
    assert new["sft"]["steps"] == 3 and new["base"] == old["base"]
    assert json.loads((run1 / "sft" / "done.json").read_text())["steps"] == 3
    assert (run1 / "sft" / "model.safetensors").read_bytes() != old_model
    records = [json.loads(ln) for ln in (run1 / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["stage"] == "sft" and "loss" in r]
    assert steps == [1, 2, 3]  # the redo's records, the old run's gone
    assert not (run1 / ".sft.force").exists() and not (run1 / ".sft.old").exists()
    # not forced: already finished, nothing redone
    assert main(["sft", "--out", str(run1)]) == 0
    assert "sft: already finished" in capsys.readouterr().out


def _records(run: Path, stage: str) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(ln)["step"] for ln in lines
            if ln.endswith("}") and json.loads(ln).get("stage") == stage
            and "loss" in json.loads(ln)]


@pytest.mark.slow
def test_forced_run_killed_keeps_the_old_output_and_resumes(run1):
    args = [sys.executable, "-m", "echolm", "pretrain", "--out", str(run1), "--force",
            "--reconfigure",
            "--set", "pretrain.max_steps=12", "--set", "pretrain.ckpt_every=2",
            "--set", "pretrain.eval_every=0"]
    base, summary = snapshot(run1 / "base"), (run1 / "summary.json").read_bytes()
    old_records = _records(run1, "base")
    assert old_records == [1, 2, 3, 4]
    latest = run1 / ".base.force" / "base" / "ckpt" / "latest"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env())
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(2e-4)  # yield the CPU: the training process needs it
    proc.kill()  # SIGKILL: no handler runs
    out, _ = proc.communicate(timeout=30)
    assert latest.exists(), out
    assert snapshot(run1 / "base") == base and (run1 / "summary.json").read_bytes() == summary
    assert _records(run1, "base") == old_records  # the old curve is still the run's

    r = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=180)
    assert r.returncode == 0, r.stderr
    assert "pretrain: resuming the --force redo" in r.stdout
    assert "pretrain: resuming from step" in r.stdout
    assert json.loads((run1 / "summary.json").read_text())["base"]["steps"] == 12
    assert _records(run1, "base") == list(range(1, 13))
    assert not (run1 / ".base.force").exists() and not (run1 / ".base.old").exists()


def test_a_swap_cut_short_is_completed_by_the_next_command(run1, capsys):
    """Killed after the redo was complete (commit.json written) and after the old folder was
    moved aside, before the new one was moved in: the next `echolm sft` (not forced)
    finishes the swap, and the run has the redo's sft and summary entry."""

    class KilledDuringSwap(StageOutput):
        def _swap(self) -> None:  # the kill: after commit.json and the first rename
            self.trash.mkdir()
            os.replace(self.final, self.trash / self.name)
            raise KeyboardInterrupt

    stage = KilledDuringSwap(run1, "sft", force=True)
    out = stage.start(quiet)
    (out / "model.safetensors").write_bytes(b"new weights")
    with pytest.raises(KeyboardInterrupt):
        stage.commit({"steps": 99}, {"steps": 99, "new": True})
    assert not (run1 / "sft").exists() and (run1 / ".sft.old" / "sft" / "done.json").exists()
    assert json.loads((run1 / "summary.json").read_text())["sft"]["steps"] == 2

    assert main(["sft", "--out", str(run1)]) == 0
    assert "completed the swap of the finished --force redo" in capsys.readouterr().out
    assert (run1 / "sft" / "model.safetensors").read_bytes() == b"new weights"
    assert json.loads((run1 / "sft" / "done.json").read_text()) == {"steps": 99}
    assert json.loads((run1 / "summary.json").read_text())["sft"] == {"steps": 99, "new": True}
    assert not (run1 / ".sft.force").exists() and not (run1 / ".sft.old").exists()


def test_forced_rlhf_replaces_both_of_its_folders(tmp_path):
    """RLHF writes rlhf/ and rlhf_unguarded/: a redo without the unguarded run removes the
    old one, but only at the swap; metrics.jsonl keeps the other stages' records."""
    run = tmp_path / "run"
    for name in ("rlhf", "rlhf_unguarded"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"old " + name.encode())
    (run / "rlhf" / "done.json").write_text('{"old": true}')
    (run / "summary.json").write_text('{"sft": {"steps": 1}, "rlhf": {"old": true}}')
    old_lines = ['{"stage": "sft", "step": 1}', '{"stage": "rlhf", "step": 1}',
                 '{"stage": "rlhf_unguarded", "step": 1}', '{"stage": "rlhf", "st']
    (run / "metrics.jsonl").write_text("\n".join(old_lines) + "\n")
    stage = StageOutput(run, "rlhf", force=True, also=("rlhf_unguarded",))
    assert stage.finished(quiet) is None
    out = stage.start(quiet)
    (out / "model.safetensors").write_bytes(b"new")
    (stage.log_dir / "metrics.jsonl").write_text('{"stage": "rlhf", "step": 7}\n')
    assert (run / "rlhf_unguarded").is_dir()  # until the swap
    stage.commit({"new": True})
    assert snapshot(run / "rlhf") == {"model.safetensors": b"new",
                                      "done.json": b'{\n  "new": true\n}\n'}
    assert not (run / "rlhf_unguarded").exists()
    assert json.loads((run / "summary.json").read_text()) == {"sft": {"steps": 1},
                                                               "rlhf": {"new": True}}
    assert (run / "metrics.jsonl").read_text().splitlines() == [
        '{"stage": "sft", "step": 1}', '{"stage": "rlhf", "st', '{"stage": "rlhf", "step": 7}']
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "report", "rlhf",
                                                     "summary.json"]


def test_run_force_again_resumes_its_pass(tmp_path):
    """`echolm run --force` killed, then run again with --force: the stages its pass already
    redid are not redone; other settings, or a finished pass, start a new one."""
    run = tmp_path / "run"
    run.mkdir()
    p = ForcePass(run, {"a": 1}, force=True)
    assert p.force("tokenizer") and p.force("pretrain")
    p.done("tokenizer")
    again = ForcePass(run, {"a": 1}, force=True)
    assert not again.force("tokenizer") and again.force("pretrain")
    assert ForcePass(run, {"a": 2}, force=True).force("tokenizer")  # other settings
    assert not ForcePass(run, {"a": 1}, force=False).force("pretrain")
    again.done("pretrain")
    again.finish()
    assert not (run / ".force_pass.json").exists()
    assert ForcePass(run, {"a": 1}, force=True).force("tokenizer")


@pytest.mark.slow
def test_forced_rm_dpo_rlhf_replace_their_outputs(pref_run, corpus):  # noqa: F811
    """The stages that measure their new model before it is swapped in (DPO's and RLHF's gold
    win rate read it from the redo's folder) and RLHF's second folder: a forced redo with
    other settings is what the run has afterwards, and nothing is left beside it."""
    from echolm.train.dpo import run_dpo
    from echolm.train.reward_model import run_rm
    from echolm.train.rlhf import run_rlhf

    run = pref_run
    base = [*data_overrides(corpus), "rm.max_steps=4", "rm.eval_every=0", "rm.epochs=0",
            "dpo.max_steps=2", "dpo.eval_every=0", "rlhf.max_steps=2", "rlhf.eval_every=1",
            "rlhf.eval_prompts=4", "rlhf.final_samples=1", "rlhf.eval_samples=1",
            "data.task_examples=20", "rlhf.overopt_steps=2"]
    for fn in (run_rm, run_dpo, run_rlhf):
        fn(load_config("micro", base), run, log=quiet)
    assert (run / "rlhf_unguarded").is_dir()
    old = json.loads((run / "summary.json").read_text())
    old_rm = (run / "rm" / "model.safetensors").read_bytes()

    run_rm(load_config("micro", [*base, "rm.max_steps=5"]), run, force=True, log=quiet)
    run_dpo(load_config("micro", [*base, "dpo.max_steps=3"]), run, force=True, log=quiet)
    run_rlhf(load_config("micro", [*base, "rlhf.overopt_steps=0", "rlhf.max_steps=3"]), run,
             force=True, log=quiet)
    new = json.loads((run / "summary.json").read_text())
    assert [new[s]["steps"] for s in ("rm", "dpo", "rlhf")] == [5, 3, 3]
    assert new["dpo"]["gold_win_rate_vs_sft"] is not None and new["rlhf"]["unguarded"] is None
    assert old["dpo"]["steps"] == 2 and (run / "rm" / "model.safetensors").read_bytes() != old_rm
    assert not (run / "rlhf_unguarded").exists()  # the redo had no unguarded run
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for stage, n in (("rm", 5), ("dpo", 3), ("rlhf", 3), ("rlhf_unguarded", 0)):
        assert [r["step"] for r in recs if r["stage"] == stage and "loss" in r] == list(
            range(1, n + 1)), stage
