"""The reward model: it learns a preference people could have from rankings and generalises
to prompts it never saw; Bradley-Terry and Plackett-Luce both train; save/load keeps scores."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from echolm.checkpoint import save_model
from echolm.errors import EchoError
from echolm.model import Transformer
from echolm.prefs import PreferenceStore
from echolm.settings import load_config

WORDS = ["sea", "moon", "cat", "tree", "bread", "river", "lamp", "owl", "snow", "road"]


def answers(rng: random.Random, a: int, b: int) -> list[tuple[str, bool]]:
    """Four answers to "What is a + b?", best first, as (text, ended its turn): a correct
    sentence; a correct but rambling one; one cut off mid-way; an off-topic one."""
    c = a + b
    w = rng.choice(WORDS)
    return [(f"{a} + {b} = {c}.", True),
            (f"Well, well, {c} {c} {c}, the {w} the {w}.", True),
            (f"{a} + {b} is", False),
            (f"The {w} is quiet tonight.", True)]


def make_store(run: Path, n_prompts: int = 90, seed: int = 0, noise: float = 0.05) -> Path:
    """DIR/prefs.sqlite with rankings of 2-4 of those answers per prompt (a few adjacent
    swaps as annotator noise); cut-off answers are recorded with sampling {"stopped": false}."""
    rng = random.Random(seed)
    store = PreferenceStore(run / "prefs.sqlite")
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    for a, b in pairs[:n_prompts]:
        pid = store.add_prompt(f"What is {a} + {b}?")
        cands = answers(rng, a, b)
        keep = sorted(rng.sample(range(4), rng.choice([2, 3, 4, 4])))
        ids = []
        for k in keep:
            text, ended = cands[k]
            ids += store.add_responses(pid, [text], stage="sft",
                                       sampling={"temperature": 1.0, "stopped": ended})
        if rng.random() < noise and len(ids) > 1:
            i = rng.randrange(len(ids) - 1)
            ids[i], ids[i + 1] = ids[i + 1], ids[i]
        store.add_ranking(pid, ids, annotator="synthetic")
    store.close()
    return run / "prefs.sqlite"


def random_backbone(run: Path, seed: int = 0) -> Transformer:
    """DIR/sft as a micro model with every matrix random (a freshly initialised Echo model
    zeroes its residual outputs, so every answer would look the same to a score head)."""
    cfg = load_config("micro")
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "embed_tokens.weight":
                bound = math.sqrt(3.0 / p.shape[1])
                p.uniform_(-bound, bound)
    save_model(model, run / "sft")
    return model


def make_tokenizer(folder: Path, corpus: Path) -> None:
    from echolm.tokenizer import train_tokenizer

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    texts += [f"What is {a} + {b}? {a} + {b} = {a + b}." for a in range(10) for b in range(10)]
    train_tokenizer(texts, 512).save(folder / "tokenizer")


@pytest.fixture(scope="module")
def pref_template(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A run directory with a tokenizer, a (random) SFT model and a preference store."""
    run = tmp_path_factory.mktemp("prefs") / "run"
    run.mkdir()
    make_tokenizer(run, corpus)
    random_backbone(run)
    make_store(run)
    return run


@pytest.fixture
def pref_run(pref_template: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(pref_template, dst)
    return dst


def quiet(*_a: object) -> None:
    pass


def _cfg(*overrides: str):
    return load_config("micro", ["rm.eval_every=10", "rm.epochs=0", *overrides])


def test_reward_model_learns_a_preference_that_holds_on_unseen_prompts(pref_run):
    from echolm.train.reward_model import run_rm

    logs: list[str] = []
    run_rm(_cfg("rm.max_steps=15"), pref_run, log=logs.append)
    (pref_run / "rm" / "done.json").unlink()  # pretend it was cut off: resume to 30 steps
    res = run_rm(_cfg("rm.max_steps=30"), pref_run, log=logs.append)
    assert any("resuming from step 15" in m for m in logs), logs
    assert res["heldout_accuracy"] >= 0.75 and res["n"] > 10, res
    assert res["train_accuracy"] >= 0.75
    summary = json.loads((pref_run / "summary.json").read_text())["rm"]
    for key in ("heldout_accuracy", "n", "ece", "loss"):
        assert summary[key] == res[key]
    assert 0 <= res["ece"] <= 1 and res["loss"] < math.log(2)
    scores = json.loads((pref_run / "rm" / "scores.json").read_text())
    assert len(scores["heldout"]["chosen"]) == len(scores["heldout"]["rejected"]) == res["n"]
    assert sum(b["n"] for b in scores["reliability"]) == res["n"]
    assert (pref_run / "report" / "rm_scores.png").stat().st_size > 10_000
    steps = [json.loads(ln) for ln in (pref_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in steps if r["stage"] == "rm"]
    assert steps == list(range(31))  # step 0: before training; resumed records replace
    # a finished stage is a no-op
    assert run_rm(_cfg("rm.max_steps=30"), pref_run, log=logs.append) == res


def test_plackett_luce_trains_too(pref_run):
    from echolm.train.reward_model import run_rm

    # one epoch caps the 100 steps asked for: training rankings / 8 per step
    res = run_rm(_cfg("rm.loss=pl", "rm.max_steps=100", "rm.epochs=1",
                      "rm.center_coef=0.0", "rm.margin=0.5"), pref_run, log=quiet)
    assert res["objective"] == "pl" and res["steps"] == math.ceil(res["train_rankings"] / 8)
    assert res["heldout_accuracy"] >= 0.75, res


def test_saved_reward_model_scores_identically_and_is_batch_independent(pref_run):
    from echolm.reward import load_reward_model
    from echolm.tokenizer import Tokenizer
    from echolm.train.reward_model import run_rm

    run_rm(_cfg("rm.max_steps=10"), pref_run, log=quiet)
    tok = Tokenizer.load(pref_run / "tokenizer")
    rm = load_reward_model(pref_run / "rm")
    assert not rm.training and rm.max_len == 128
    prompts = ["What is 2 + 3?", "What is 7 + 1?", "What is 4 + 4?"]
    responses = ["2 + 3 = 5.", "The sea is quiet tonight.", "4 + 4 is"]
    batched = rm.score(tok, prompts, responses, ended=[True, True, False])
    assert batched.dtype == torch.float32 and batched.shape == (3,)
    one_by_one = torch.cat([rm.score(tok, [p], [r], ended=[e]) for p, r, e in
                            zip(prompts, responses, [True, True, False], strict=True)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    again = load_reward_model(pref_run / "rm").score(tok, prompts, responses,
                                                     ended=[True, True, False])
    assert torch.equal(batched, again)
    # the saved held-out scores are what the loaded model gives
    from echolm.rankings import RankedExample, split_by_prompt
    from echolm.rankings import load_rankings as _load

    cfg = _cfg()
    held = split_by_prompt(_load(pref_run, cfg.data.rankings_annotator),
                           cfg.data.rankings_heldout_fraction)[1]
    saved = json.loads((pref_run / "rm" / "scores.json").read_text())["heldout_rankings"]
    r: RankedExample = held[0]
    got = rm.score(tok, [r.prompt] * len(r.responses), r.responses, ended=r.ended)
    assert torch.allclose(got, torch.tensor(saved[0]), atol=1e-4)


def test_split_is_by_prompt_and_keeps_a_prompts_rankings_together():
    from echolm.rankings import RankedExample, split_by_prompt

    ranks = [RankedExample(f"p{i % 20}", ["a", "b"], [True, True], f"ann{i // 20}")
             for i in range(60)]
    train, held = split_by_prompt(ranks, 0.25, seed=0)
    held_prompts = {r.prompt for r in held}
    assert len(held_prompts) == 5 and len(held) == 15  # 3 annotators ranked each prompt
    assert not held_prompts & {r.prompt for r in train}
    assert split_by_prompt(ranks, 0.25, seed=0) == (train, held)  # deterministic


def test_no_store_or_no_rankings_is_a_clear_error(pref_run):
    from echolm.train.reward_model import run_rm

    (pref_run / "prefs.sqlite").unlink()
    with pytest.raises(EchoError, match="no preference store"):
        run_rm(_cfg(), pref_run, log=quiet)
    PreferenceStore(pref_run / "prefs.sqlite").close()
    with pytest.raises(EchoError, match="no rankings"):
        run_rm(_cfg(), pref_run, log=quiet)
    with pytest.raises(EchoError, match="rm.loss='hinge': expected bt or pl"):
        _cfg("rm.loss=hinge")  # refused when the config is built, before any stage runs
