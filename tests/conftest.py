"""Shared fixtures: a small deterministic text corpus, and a run directory with a trained
tokenizer and token shards (built once per session, copied per test), plus a helper that runs
the real `echolm` command in a subprocess."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# One intra-op thread for the test process and every subprocess it starts: tests run many
# tiny models side by side, and OpenMP with more threads than free cores is up to 1000x
# slower on small matmuls (measured here when another job holds a core).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

SUBJECTS = ["the farmer", "a small dog", "my old teacher", "the river", "every student",
            "the quiet engineer", "a red bird", "the city council", "our neighbour",
            "the last train", "a curious child", "the ship's captain", "this machine",
            "the baker", "an honest merchant", "the mountain wind", "her brother",
            "the library", "a tired soldier", "the young queen"]
VERBS = ["saw", "built", "carried", "remembered", "painted", "followed", "opened", "found",
         "counted", "described", "repaired", "forgot", "answered", "measured", "watched",
         "sold", "wrote about", "walked past", "listened to", "cleaned"]
OBJECTS = ["the wooden bridge", "a letter from home", "seven green apples", "the broken clock",
           "an empty basket", "the northern road", "a song about winter", "the tall tower",
           "twelve silver coins", "the garden gate", "a map of the island", "the morning paper",
           "three heavy stones", "the blue door", "a pot of soup", "the evening lamp"]
ADVERBS = ["slowly", "at dawn", "without a word", "twice", "in the rain", "before supper",
           "with great care", "for no reason", "quite happily", "near the market"]
CONNECT = ["and then", "but later", "because", "so", "while", "after that", "although"]
OPENERS = ["Once upon a time,", "In the beginning,", "Last year,", "On a cold morning,",
           "Long ago,", "Yesterday,", "Every summer,"]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.5:
        s += f" {rng.choice(ADVERBS)}"
    if rng.random() < 0.4:
        s += f", {rng.choice(CONNECT)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} " \
             f"{rng.choice(OBJECTS)}"
    if rng.random() < 0.2:
        s = f"{rng.choice(OPENERS)} {s}"
    if rng.random() < 0.15:
        s += f" ({rng.randint(1, 2000)} of them)"
    s = s[0].upper() + s[1:]
    return s + rng.choice([".", ".", ".", "!", "?"])


def _document(rng: random.Random, sentences: int) -> str:
    paras, cur = [], []
    for _ in range(sentences):
        cur.append(_sentence(rng))
        if len(cur) >= rng.randint(3, 8):
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def make_corpus(folder: Path, seed: int = 0, n_short: int = 1500, n_long: int = 24) -> Path:
    """~400 KB of English-like text: many short JSONL documents (most shorter than one
    training row) and some long .txt documents (many rows each). Deterministic in `seed`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        with open(folder / f"short_{part}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n_short // 2):
                f.write(json.dumps({"text": _document(rng, rng.randint(1, 6)),
                                    "source": "generated"}) + "\n")
    for k in range(n_long):
        (folder / f"long_{k:02d}.txt").write_text(_document(rng, rng.randint(40, 120)),
                                                  encoding="utf-8")
    return folder


def data_overrides(corpus: Path) -> list[str]:
    return [f'data.pretrain=["{corpus}"]', "data.val_fraction=0.1"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A run directory (micro preset) with tokenizer/ and tokens/ ready: build once."""
    from echolm.pipeline import resolve_run_config
    from echolm.tokenizer import Tokenizer
    from echolm.train.pretrain import prepare_tokens
    from echolm.train.tokenize import run_tokenizer

    run = tmp_path_factory.mktemp("prepared") / "run"
    cfg = resolve_run_config(run, "micro", data_overrides(corpus))

    def quiet(*_a: object) -> None:
        pass

    run_tokenizer(cfg, run, log=quiet)
    prepare_tokens(cfg, run, Tokenizer.load(run / "tokenizer"), log=quiet)
    return run


@pytest.fixture
def run_dir(prepared_run: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared run directory."""
    dst = tmp_path / "run"
    shutil.copytree(prepared_run, dst)
    return dst


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def echolm_cli() -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m echolm ARGS...` to completion; returns the CompletedProcess (text)."""

    def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "echolm", *map(str, args)],
                              capture_output=True, text=True, env=subprocess_env(),
                              timeout=timeout)

    return run


def pretrain_args(run: Path, corpus: Path, *overrides: str) -> list[str]:
    """`pretrain` arguments for the micro preset on the test corpus (--reconfigure: the test's
    settings replace those a copied run directory saved)."""
    args = ["pretrain", "--out", str(run), "--preset", "micro", "--reconfigure"]
    for o in [*data_overrides(corpus), "pretrain.dtype=fp32", *overrides]:
        args += ["--set", o]
    return args


def losses(run: Path, stage: str = "base") -> list[tuple[int, float]]:
    """(step, loss) of every metrics.jsonl record of `stage`, in file order."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == stage:
            out.append((rec["step"], rec["loss"]))
    return out


def tmp_leftovers(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if p.name.endswith(".tmp"))
