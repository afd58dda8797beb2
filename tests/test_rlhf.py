"""RLHF pieces: the reward-hacking guard and the held-out gold evaluation."""

from __future__ import annotations

import pytest
import torch
from test_reward_model import pref_run, pref_template  # noqa: F401  (fixtures)

from echolm.annotator import gold_score
from echolm.config import ModelConfig, RLHFConfig
from echolm.data.prompts import rlhf_prompts
from echolm.gold import evaluate_policy
from echolm.model import Transformer
from echolm.reward import _empty_reward_model
from echolm.tokenizer import Tokenizer
from echolm.train.rlhf import guard_should_stop


@pytest.mark.parametrize("gold, proxy, patience, stop", [
    # gold 0.5 best, then falls three times in a row while proxy rises: stop
    ([0.4, 0.5, 0.45, 0.44, 0.43], [0.0, 0.1, 0.2, 0.3, 0.4], 3, True),
    # the same fall, but proxy fell too: the policy is just getting worse, not hacking
    ([0.4, 0.5, 0.45, 0.44, 0.43], [0.0, 0.5, 0.4, 0.3, 0.2], 3, False),
    # one rise inside the stretch: not a steady fall
    ([0.4, 0.5, 0.45, 0.46, 0.43], [0.0, 0.1, 0.2, 0.3, 0.4], 3, False),
    # patience 4 needs four falls in a row
    ([0.4, 0.5, 0.45, 0.44, 0.43], [0.0, 0.1, 0.2, 0.3, 0.4], 4, False),
    # too short a history to judge
    ([0.5, 0.4, 0.3], [0, 1, 2], 3, False),
])
def test_guard_by_hand(gold, proxy, patience, stop):
    assert guard_should_stop(gold, proxy, patience) is stop


@pytest.fixture
def tiny(prepared_run):
    torch.manual_seed(0)
    tok = Tokenizer.load(prepared_run / "tokenizer")
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                      max_seq_len=128)
    model = Transformer(cfg).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # not all-zero logits: varied answers
    return tok, model, _empty_reward_model(cfg, "cpu").eval()


def test_gold_is_averaged_per_prompt_over_its_samples(tiny):
    tok, model, rm = tiny
    items = rlhf_prompts("val", 6, 0)
    p = RLHFConfig(max_tokens=12)
    ev, gold, texts = evaluate_policy(model, model, rm, tok, items, p, seed=3, samples=3)
    assert len(gold) == 6 and len(texts) == 18
    assert len(set(texts)) > 6  # the 3 answers to a prompt differ
    # recompute gold of every answer from the texts (finished flags: none end in 12 tokens
    # unless the end token came; gold_score treats both; check the mean bounds instead)
    for i, it in enumerate(items):
        mine = texts[3 * i:3 * i + 3]
        lo = min(gold_score(it, t, False) for t in mine)
        hi = max(gold_score(it, t, True) for t in mine)
        assert lo - 1e-9 <= gold[i] <= hi + 1e-9
    assert ev.gold == pytest.approx(sum(gold) / 6)
    assert ev.kl == pytest.approx(0.0, abs=1e-5)  # the policy is its own reference
    # no reference given: the same answers and gold, KL 0 without computing it
    ev_none, gold_none, texts_none = evaluate_policy(model, None, rm, tok, items, p, seed=3,
                                                     samples=3)
    assert ev_none.kl == 0.0 and gold_none == gold and texts_none == texts
    # win rate against per-prompt baselines: all worse -> 1, itself -> ties -> 0.5
    ev_win, _, _ = evaluate_policy(model, model, rm, tok, items, p, seed=3, samples=3,
                                   baseline=[-1.0] * 6)
    ev_tie, _, _ = evaluate_policy(model, model, rm, tok, items, p, seed=3, samples=3,
                                   baseline=gold)
    assert ev_win.win_rate == 1.0 and ev_tie.win_rate == 0.5


def test_ptx_adds_the_sft_loss_to_the_policy_loss(tiny):
    from echolm.rollout import response_logprobs
    from echolm.train.rlhf import _policy_loss

    tok, model, _ = tiny
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, tok.vocab_size, (2, 6), generator=g) for _ in range(2))
    mask = torch.ones(2, 6)
    with torch.no_grad():
        logp_old = response_logprobs(model(x), y)
    batch = {"x": x, "y": y, "mask": mask, "logp_old": logp_old, "adv": torch.tensor([1., -1.])}
    rows = tuple(torch.randint(0, tok.vocab_size, (3, 8), generator=g) for _ in range(2))
    rows = (*rows, torch.tensor([[0] * 4 + [1] * 4] * 3))  # loss on the last 4 tokens only
    p = RLHFConfig(algorithm="rloo", ptx_coef=0.5)
    stats: dict = {}
    without = _policy_loss(model, (batch, torch.arange(2), None), p, {})
    with_ptx = _policy_loss(model, (batch, torch.arange(2), rows), p, stats)
    sft = model(rows[0], targets=rows[1], loss_mask=rows[2])
    sft = float(sft.detach())
    assert float((with_ptx - without).detach()) == pytest.approx(0.5 * sft, rel=1e-5)
    assert stats["ptx_loss"] == pytest.approx([sft], rel=1e-5)  # one update: one value
    assert stats["approx_kl"] == [0.0] and stats["clip_frac"] == [0.0]  # old == new policy


@pytest.mark.parametrize("algorithm", ["rloo", "best"])
def test_critic_free_rlhf_with_ptx_trains_and_evaluates(pref_run, corpus,  # noqa: F811
                                                         algorithm):
    import json
    import time

    from conftest import data_overrides
    from test_reward_model import quiet

    from echolm.checkpoint import save_model
    from echolm.reward import reward_model_from_backbone
    from echolm.settings import load_config
    from echolm.train.rlhf import optimise

    save_model(reward_model_from_backbone(pref_run / "sft"), pref_run / "rm")
    cfg = load_config("micro", [*data_overrides(corpus), f"rlhf.algorithm={algorithm}",
                                "rlhf.samples_per_prompt=2", "rlhf.ptx_coef=1.0",
                                "rlhf.ptx_rows=2", "rlhf.max_steps=2", "rlhf.eval_every=1",
                                "rlhf.eval_prompts=4", "data.task_examples=20"])
    ex, _, facts = optimise(cfg, pref_run, pref_run / "rlhf", cfg.rlhf, "rlhf",
                            time.perf_counter(), budget_s=0.0, log=quiet)
    assert facts["steps"] == 2 and not facts["cut_short"] and not facts["fitted"]
    assert [h["step"] for h in ex["history"]] == [0, 1, 2]
    recs = [json.loads(ln) for ln in (pref_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("stage") == "rlhf" and "proxy_train" in r]
    assert len(steps) == 2 and all(r["ptx_loss"] > 0 for r in steps)
    assert all(r["approx_kl"] >= 0 and 0 <= r["clip_frac"] <= 1 for r in steps)  # diagnostics
