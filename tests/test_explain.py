"""`echolm explain`: the JSON's numbers are the softmax of the model's logits at every position
(top-k sorted, the actual next token's probability and rank right); --generate greedy picks the
argmax at each step and continues exactly as the engine does; the table shows whitespace; bad
input is a one-line error (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_chat import trained_run

from echolm.checkpoint import load_model
from echolm.cli import main
from echolm.engine import SamplingParams, generate
from echolm.explain import explain, visible
from echolm.tokenizer import Tokenizer

TEXT = "Once upon a time, the farmer counted\n twelve silver coins."


@pytest.fixture(scope="session")
def run(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(prepared_run, tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli_json(capsys: pytest.CaptureFixture, *args: str | Path) -> dict:
    capsys.readouterr()
    assert main(["explain", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_numbers_are_the_softmax_of_the_logits(run, capsys):
    r = cli_json(capsys, "--run", run, "--stage", "base", TEXT, "--top-k", "7")
    assert set(r) >= {"stage", "tokens", "positions", "generated"}
    assert r["stage"] == "base" and r["generated"] == []
    tok = Tokenizer.load(run / "tokenizer")
    ids = [tok.bos, *tok.encode(TEXT)]
    assert [t["id"] for t in r["tokens"]] == ids
    assert "".join(t["piece"] for t in r["tokens"][1:]) == TEXT
    with torch.no_grad():
        probs = load_model(run / "base")(torch.tensor([ids]))[0].float().softmax(-1)
    assert [p["index"] for p in r["positions"]] == list(range(len(ids)))
    for pos, row in zip(r["positions"], probs, strict=True):
        i = pos["index"]
        assert pos["token"] == r["tokens"][i]
        top = pos["top"]
        assert len(top) == 7
        assert all(set(c) == {"id", "piece", "prob"} for c in top)
        ps = [c["prob"] for c in top]
        assert ps == sorted(ps, reverse=True) and sum(ps) <= 1 + 1e-6
        for c in top:
            assert c["prob"] == pytest.approx(float(row[c["id"]]), abs=1e-5)
        assert ps == pytest.approx(row.topk(7).values.tolist(), abs=1e-5)  # the 7 best
        nxt = pos["next_actual"]
        if i == len(ids) - 1:
            assert nxt is None
            continue
        assert nxt["id"] == ids[i + 1] and nxt["piece"] == r["tokens"][i + 1]["piece"]
        assert nxt["prob"] == pytest.approx(float(row[ids[i + 1]]), abs=1e-5)
        assert nxt["rank"] == 1 + int((row > row[ids[i + 1]]).sum())
        in_top = [c for c in top if c["id"] == nxt["id"]]
        assert bool(in_top) == (nxt["rank"] <= 7)


def test_generate_greedy_is_the_argmax_and_the_engines_continuation(run, capsys):
    tok = Tokenizer.load(run / "tokenizer")
    for stage, chat in (("base", False), ("sft", True)):
        args = ["--run", run, "--stage", stage, TEXT, "--generate", "12", "--top-k", "3"]
        r = cli_json(capsys, *args, *(["--chat"] if chat else []))
        assert r["chat"] is chat
        ids = [t["id"] for t in r["tokens"]]
        if chat:
            assert ids == tok.render_prompt([{"role": "user", "content": TEXT}])
        assert 1 <= len(r["generated"]) <= 12
        chosen = []
        for k, g in enumerate(r["generated"], 1):
            assert g["step"] == k
            assert g["chosen"]["id"] == g["top"][0]["id"] and g["chosen"]["rank"] == 1
            assert g["chosen"]["prob"] == g["top"][0]["prob"]
            chosen.append(g["chosen"]["id"])
        # the first step's candidates are the last position's predictions (the engine's
        # prompt pass computes only that position's head: the same ids, float-close)
        first, last = r["generated"][0]["top"], r["positions"][-1]["top"]
        assert [t["id"] for t in first] == [t["id"] for t in last]
        assert [t["prob"] for t in first] == pytest.approx([t["prob"] for t in last],
                                                           abs=1e-6)
        model = load_model(run / stage).eval()
        stops = tok.stop_ids
        engine = generate(model, tok, [ids], SamplingParams(max_tokens=12, temperature=0.0,
                                                            stop_ids=stops))[0]
        assert [t for t in chosen if t not in stops] == engine
        assert len(chosen) == 12 or chosen[-1] in stops
        assert r["generated_text"] == tok.decode(engine)
        # and each step's probabilities are the softmax of a forward pass over what came before
        with torch.no_grad():
            row = model(torch.tensor([ids + chosen[:-1]]))[0, -1].softmax(-1)
        assert r["generated"][-1]["chosen"]["prob"] == pytest.approx(
            float(row[chosen[-1]]), abs=1e-5)


def test_sampled_generation_is_reproducible_with_a_seed(run):
    a = explain(run, TEXT, generate=10, temperature=1.5, seed=3)
    b = explain(run, TEXT, generate=10, temperature=1.5, seed=3)
    assert [g["chosen"]["id"] for g in a["generated"]] == \
        [g["chosen"]["id"] for g in b["generated"]]
    ranks = [g["chosen"]["rank"] for g in a["generated"]]
    assert all(r >= 1 for r in ranks)


def test_table_shows_pieces_with_visible_whitespace(run, capsys):
    capsys.readouterr()
    assert main(["explain", "--run", str(run), TEXT, "--generate", "3"]) == 0
    out = capsys.readouterr().out
    assert "stage sft" in out  # the default: the latest stage present
    assert "␣the" in out and "⏎" in out and " the " not in out.split("\n")[2]
    assert "top 5 predictions" in out and "generated, one token at a time (greedy" in out
    assert "continuation: " in out
    assert visible(" a\tb\n\x00") == "␣a⇥b⏎\\x00"


@pytest.mark.parametrize("args, needle", [
    (["--run", "{missing}", "hello"], "no such run directory"),
    (["--run", "{run}", "--stage", "nope", "hello"], "unknown stage 'nope'"),
    (["--run", "{run}", "--stage", "rlhf", "hello"], "no finished 'rlhf' model"),
    (["--run", "{run}", ""], "the text to explain is empty"),
    (["--run", "{run}", "word " * 1100], "the model reads at most 1024"),
])
def test_bad_input_is_one_line(run, tmp_path, capsys, args, needle):
    args = [a.format(run=run, missing=tmp_path / "nothing") for a in args]
    capsys.readouterr()
    rc = main(["explain", *args])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("echolm: error: "), err
    assert needle in err[0] and captured.out == ""
