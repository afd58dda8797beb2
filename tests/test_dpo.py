"""DPO / IPO: answer log-probs computed right, the frozen reference scores each batch as the
SFT model does, the implicit reward learns the rankings, a cut-off run resumes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_reward_model import pref_run, pref_template, quiet  # noqa: F401  (fixtures)

from echolm.checkpoint import load_model, stage_dir
from echolm.rankings import load_rankings
from echolm.settings import load_config
from echolm.tokenizer import Tokenizer


def _cfg(*overrides: str):
    return load_config("micro", ["dpo.eval_every=5", *overrides])


def test_sequence_logps_equal_the_full_softmax(pref_run):  # noqa: F811
    from echolm.tokenizer import Tokenizer
    from echolm.train.dpo import PrefPair, encode_pairs, make_pair_batch, sequence_logps

    tok = Tokenizer.load(pref_run / "tokenizer")
    model = load_model(pref_run / "sft")
    pairs = [PrefPair("What is 2 + 3?", "2 + 3 = 5.", "The owl is quiet tonight."),
             PrefPair("What is 1 + 1?", "Well, well, 2 2 2, the sea the sea.", "1 + 1 is",
                      rejected_ended=False)]
    enc = encode_pairs(tok, pairs, 128)
    b = make_pair_batch(enc, [0, 1], tok.pad)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; the mask covers exactly the answer
    # tokens (and <|assistant_end|> only where the answer ended its turn)
    answer = tok.encode("2 + 3 = 5.") + [tok.assistant_end]
    assert b.y[0][b.mask[0]].tolist() == answer
    assert b.y[3][b.mask[3]].tolist() == tok.encode("1 + 1 is")
    with torch.no_grad():
        lp, n = sequence_logps(model, b.x, b.y, b.mask)
        full = F.log_softmax(model(b.x).float(), -1).gather(-1, b.y[..., None])[..., 0]
    assert torch.allclose(lp, (full * b.mask).sum(1), atol=1e-4)
    assert n.tolist() == b.mask.sum(1).tolist()


def _metrics(run) -> list[dict]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["stage"] == "dpo"]


def test_dpo_learns_the_rankings_and_resumes(pref_run):  # noqa: F811
    from echolm.train import dpo

    logs: list[str] = []
    dpo.run_dpo(_cfg("dpo.max_steps=10"), pref_run, log=logs.append)
    first = _metrics(pref_run)[0]
    assert abs(first["margin"]) < 1e-2  # policy == reference at the start

    (pref_run / "dpo" / "done.json").unlink()  # cut off: resume to 20 steps
    res = dpo.run_dpo(_cfg("dpo.max_steps=20"), pref_run, log=logs.append)
    assert any("resuming from step 10" in m for m in logs)
    recs = _metrics(pref_run)
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert res["reward_accuracy"] >= 0.8 and res["margin"] > 0.5, res
    assert res["margin"] > first["margin"] + 0.5
    assert res["heldout_reward_accuracy"] >= 0.75 and res["n_pairs"] >= 64
    # the training sample measured at the end: as many pairs as held out, at least 64
    assert res["n_pairs"] == min(res["train_pairs"], max(res["heldout_n_pairs"], 64))
    assert "val_reward_acc" in recs[4] and "reward_acc" in recs[-1]
    summary = json.loads((pref_run / "summary.json").read_text())["dpo"]
    assert summary["reward_accuracy"] == res["reward_accuracy"]
    assert summary["n_pairs"] == res["n_pairs"]
    assert stage_dir(pref_run, "dpo") == pref_run / "dpo"
    load_model(pref_run / "dpo")  # a plain model, loadable by chat / export


def test_the_reference_scores_a_batch_as_the_sft_model_scores_every_pair(pref_run):  # noqa: F811
    from echolm.train.dpo import (
        encode_pairs,
        make_pair_batch,
        pair_logps,
        ranking_pairs,
        reference_logps,
    )

    tok = Tokenizer.load(pref_run / "tokenizer")
    sft = load_model(pref_run / "sft").eval()
    pairs = encode_pairs(tok, ranking_pairs(load_rankings(pref_run))[:12],
                         128)
    batch = make_pair_batch(pairs, list(range(len(pairs))), tok.pad)
    lp, cnt = reference_logps(sft, batch)
    every = pair_logps(sft, pairs, tok.pad)  # batched differently (sorted by length)
    assert torch.allclose(lp, every["logps"], atol=1e-4) and torch.equal(cnt, every["counts"])


def test_ipo_runs_and_learns(pref_run):  # noqa: F811
    from echolm.train.dpo import run_dpo

    res = run_dpo(_cfg("dpo.loss=ipo", "dpo.beta=0.5", "dpo.max_steps=12"),
                  pref_run, log=quiet)
    assert res["objective"] == "ipo" and res["margin"] > 0 and res["reward_accuracy"] >= 0.75, res


def test_bad_dpo_settings_are_clear_errors():
    """Refused when the config is built, before any stage runs."""
    from echolm.errors import EchoError

    with pytest.raises(EchoError, match="dpo.loss='kto': expected sigmoid or ipo"):
        _cfg("dpo.loss=kto")
    with pytest.raises(EchoError, match="dpo.beta=0.0 must be a finite number > 0"):
        _cfg("dpo.beta=0")
    with pytest.raises(EchoError, match="dpo.ptx_coef=-1.0 must be a finite number >= 0"):
        _cfg("dpo.ptx_coef=-1")


def test_dpo_with_ptx_adds_the_sft_loss_and_still_learns(pref_run, corpus):  # noqa: F811
    from conftest import data_overrides

    from echolm.train.dpo import run_dpo

    res = run_dpo(_cfg(*data_overrides(corpus), "dpo.ptx_coef=0.5", "dpo.ptx_rows=2",
                       "data.task_examples=20", "dpo.max_steps=12"), pref_run, log=quiet)
    recs = _metrics(pref_run)
    assert len(recs) == 12 and all(r["ptx_loss"] > 0 for r in recs)
    # the SFT term is small next to the rankings: the implicit reward still learns them
    assert res["reward_accuracy"] >= 0.75 and res["margin"] > 0, res
