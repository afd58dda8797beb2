"""Bad input through the real CLI: every user mistake exits 2 with one line on stderr,
`echolm: error: ...`, that names the file, line or field at fault; no traceback, and nothing
half-written left behind (no *.tmp files, no done.json)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pretrain_args, subprocess_env, tmp_leftovers

from echolm.checkpoint import load_model
from echolm.cli import main
from echolm.errors import EchoError


def assert_user_error(rc: int, err: str, *needles: str) -> str:
    """rc 2 and a single `echolm: error:` line on stderr containing every needle."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("echolm: error: "), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_half_written(run: Path, finished: tuple[str, ...] = ()) -> None:
    """No *.tmp anywhere and no stage marked done, except the `finished` stages."""
    if run.exists():
        assert tmp_leftovers(run) == []
        done = sorted(p.parent.name for p in run.rglob("done.json"))
        assert done == sorted(finished)


def run_main(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def run_on_data(capsys: pytest.CaptureFixture, run: Path, source: Path, *extra: str
                ) -> tuple[int, str]:
    return run_main(capsys, "run", "--preset", "micro", "--out", run,
                    "--set", f'data.pretrain=["{source}"]', *extra)


# ---- bad text files --------------------------------------------------------------------------

BAD_FILES = {  # name: (bytes, what the message must say after the file name)
    "empty.txt": (b"", ": file is empty"),
    "blank.txt": (b"  \n\n \t\n", ": file is empty"),
    "binary.txt": (b"some text\x00\x01\x02\x00more", ": looks binary"),
    "latin1.txt": ("first line is fine\nsecond line: caf\xe9 cr\xe8me\n".encode("latin-1"),
                   ":2: not valid UTF-8"),
    "malformed.jsonl": (b'{"text": "one"}\n{"text": "two"}\n{"text": "three\n{"text": "4"}\n',
                        ":3: invalid JSON"),
    "no_text.jsonl": (b'{"text": "one"}\n\n{"body": "two"}\n', ":3: field 'text' is missing"),
    "text_not_str.jsonl": (b'{"text": "one"}\n{"text": 5}\n', ":2: field 'text' must be"),
    "not_object.jsonl": (b'{"text": "one"}\n["a", "b"]\n', ":2: expected a JSON object"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_text_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    run = tmp_path / "run"
    rc, err = run_on_data(capsys, run, path)
    assert_user_error(rc, err, f"{path}{message}")
    assert_nothing_half_written(run)
    assert not (run / "tokenizer" / "tokenizer.json").exists()


def test_bad_file_inside_a_folder_real_process(corpus: Path, tmp_path: Path) -> None:
    """A malformed line in one file of a folder, found after good files were read, in a real
    process (the documents stream through the Rust BPE trainer, which must pass the error on)."""
    folder = tmp_path / "data"
    shutil.copytree(corpus, folder)
    bad = folder / "zz_bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "cut off\n')
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "echolm", "run", "--preset", "micro",
                           "--out", str(run), "--set", f'data.pretrain=["{folder}"]'],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert_user_error(proc.returncode, proc.stderr, f"{bad}:3: invalid JSON")
    assert_nothing_half_written(run)


def test_missing_data_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, err = run_on_data(capsys, tmp_path / "run", tmp_path / "nope")
    assert_user_error(rc, err, str(tmp_path / "nope"), "no such file")


def test_folder_without_text_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("not a supported type")
    rc, err = run_on_data(capsys, tmp_path / "run", tmp_path / "d")
    assert_user_error(rc, err, str(tmp_path / "d"))


# ---- configuration -----------------------------------------------------------------------


def test_vocab_smaller_than_bytes_plus_specials(corpus: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    rc, err = run_on_data(capsys, run, corpus, "--set", "tokenizer.vocab_size=100")
    assert_user_error(rc, err, "tokenizer.vocab_size=100", "too small")
    assert_nothing_half_written(run)
    assert not (run / "tokenizer").exists()


@pytest.mark.parametrize("args, needles", [
    (["--preset", "no-such-preset"], ["unknown preset 'no-such-preset'", "micro"]),
    (["--preset", "micro", "--set", "pretrain.bogus=1"], ["unknown field 'pretrain.bogus'"]),
    (["--preset", "micro", "--set", "nosection.lr=1"], ["unknown section 'nosection'"]),
    (["--preset", "micro", "--set", "pretrain.max_steps=abc"],
     ["pretrain.max_steps", "expected int", "'abc'"]),
    (["--preset", "micro", "--set", "pretrain.max_steps=1.5"], ["pretrain.max_steps", "int"]),
    (["--preset", "micro", "--set", "model.qk_norm=3"], ["model.qk_norm", "expected bool"]),
    (["--preset", "micro", "--set", "pretrain.lr_matrix=fast"], ["pretrain.lr_matrix", "float"]),
    (["--preset", "micro", "--set", "pretrain.max_steps"], ["pretrain.max_steps",
                                                           "section.field=value"]),
    (["--preset", "micro", "--set", "model.n_head=3"], ["model.n_head=3", "n_kv_head"]),
])
def test_bad_config(args: list[str], needles: list[str], tmp_path: Path,
                    capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    rc, err = run_main(capsys, "run", "--out", run, *args)
    assert_user_error(rc, err, *needles)
    assert not run.exists()  # nothing at all is written before the config is known good


# ---- checkpoints -------------------------------------------------------------------------


def test_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    rc, err = run_main(capsys, "pretrain", "--resume", "--out", run)
    assert_user_error(rc, err, str(run / "base"), "no checkpoint")
    assert list(run.iterdir()) == []


def test_resume_without_checkpoint_in_prepared_run(run_dir: Path, corpus: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    rc, err = run_main(capsys, *pretrain_args(run_dir, corpus), "--resume")
    assert_user_error(rc, err, str(run_dir / "base"), "no checkpoint")
    assert not (run_dir / "base").exists()


@pytest.fixture(scope="module")
def trained_run_once(prepared_run: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (trained once per module)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(prepared_run, run)
    args = pretrain_args(run, corpus, "pretrain.max_steps=4", "pretrain.ckpt_every=2",
                         "pretrain.eval_every=0", "pretrain.eval_tokens=1024")
    assert main(args) == 0
    assert (run / "base" / "ckpt" / "step_000004" / "state.pt").exists()
    return run


@pytest.fixture
def trained_run(trained_run_once: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run_once, run)
    return run


def _as_if_killed_after_last_checkpoint(run: Path) -> Path:
    (run / "base" / "done.json").unlink()
    (run / "base" / "model.safetensors").unlink()
    return run / "base" / "ckpt" / "step_000004"


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_resume_from_truncated_weights_real_process(trained_run: Path, corpus: Path) -> None:
    ckpt = _as_if_killed_after_last_checkpoint(trained_run)
    _truncate(ckpt / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "echolm",
                           *pretrain_args(trained_run, corpus, "pretrain.max_steps=4",
                                          "pretrain.ckpt_every=2", "pretrain.eval_every=0"),
                           "--resume"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert_user_error(proc.returncode, proc.stderr, str(ckpt / "model.safetensors"),
                      "truncated")
    assert_nothing_half_written(trained_run, finished=("tokenizer",))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_resume_from_damaged_training_state(damage: str, trained_run: Path, corpus: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    ckpt = _as_if_killed_after_last_checkpoint(trained_run)
    if damage == "truncate":
        _truncate(ckpt / "state.pt")
    else:
        (ckpt / "state.pt").write_text("garbage\n")
    rc, err = run_main(capsys, *pretrain_args(trained_run, corpus, "pretrain.max_steps=4",
                                              "pretrain.ckpt_every=2"), "--resume")
    assert_user_error(rc, err, str(ckpt / "state.pt"), "unreadable or truncated")
    assert_nothing_half_written(trained_run, finished=("tokenizer",))


def test_resume_with_a_different_model(trained_run: Path, corpus: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    ckpt = _as_if_killed_after_last_checkpoint(trained_run)
    before = (trained_run / "config.json").read_bytes()
    rc, err = run_main(capsys, *pretrain_args(trained_run, corpus, "pretrain.max_steps=4",
                                              "pretrain.ckpt_every=2", "model.n_embd=32"))
    # refused before the stage: the checkpoints in base/ were made with n_embd=64
    assert_user_error(rc, err, f"model.n_embd=32 does not match the base model in "
                      f"{trained_run / 'base'} (n_embd=64)")
    assert (trained_run / "config.json").read_bytes() == before
    assert ckpt.exists()
    assert_nothing_half_written(trained_run, finished=("tokenizer",))


def test_latest_points_to_missing_checkpoint(trained_run: Path, corpus: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    ckpt = _as_if_killed_after_last_checkpoint(trained_run)
    shutil.rmtree(ckpt)
    rc, err = run_main(capsys, *pretrain_args(trained_run, corpus, "pretrain.max_steps=4",
                                              "pretrain.ckpt_every=2"))
    assert_user_error(rc, err, str(trained_run / "base" / "ckpt" / "latest"), ckpt.name)


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.999])
def test_load_truncated_model(trained_run: Path, keep: float) -> None:
    path = trained_run / "base" / "model.safetensors"
    _truncate(path, keep)
    with pytest.raises(EchoError, match="truncated") as e:
        load_model(trained_run / "base")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_model_missing_or_bad_config(trained_run: Path) -> None:
    base = trained_run / "base"
    (base / "model.safetensors").unlink()
    with pytest.raises(EchoError, match="model.safetensors: missing"):
        load_model(base)
    (base / "config.json").write_text(json.dumps({"n_layer": 2, "wings": 3}))
    with pytest.raises(EchoError, match="config.json: not a valid model config"):
        load_model(base)
    (base / "config.json").unlink()
    with pytest.raises(EchoError, match="config.json: missing"):
        load_model(base)

