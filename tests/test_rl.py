"""RL pieces that are not pure objectives: answer-only log-probs and batch assembly."""

import math

import pytest
import torch
import torch.nn.functional as F

from echolm.config import ModelConfig
from echolm.model import Transformer
from echolm.rollout import pad_batch, token_logprobs


def test_pad_batch_masks_exactly_the_response_targets():
    x, y, mask = pad_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad=0)
    # row 0: tokens 1 2 3 5 6 -> inputs 1 2 3 5, targets 2 3 5 6; responses 5, 6 are targets 2, 3
    assert x[0].tolist() == [1, 2, 3, 5] and y[0].tolist() == [2, 3, 5, 6]
    assert mask[0].tolist() == [0, 0, 1, 1]
    # row 1: tokens 4 7 8 9 -> every target is a response token
    assert y[1].tolist() == [7, 8, 9, 0] and mask[1].tolist() == [1, 1, 1, 0]


def test_response_only_logprobs_equal_the_full_computation():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, n_kv_head=2))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    x, y = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    full_all = F.log_softmax(m(x), -1)
    full = full_all.gather(-1, y[..., None]).squeeze(-1)
    mask = torch.zeros(3, 12, dtype=torch.long)
    mask[0, 5:], mask[1, 2:9], mask[2, 11] = 1, 1, 1  # answers of different lengths
    logp, entropy = token_logprobs(m, x, y, mask, entropy=True)
    sel = mask.bool()
    assert torch.allclose(logp[sel], full[sel], atol=1e-5)
    assert torch.all(logp[~sel] == 0) and torch.all(entropy[~sel] == 0)
    ent = -(full_all.exp() * full_all).sum(-1)
    assert torch.allclose(entropy[sel], ent[sel], atol=1e-5)
    # gradients reach the model only through the selected positions' log-probs
    logp.sum().backward()
    assert m.lm_head.weight.grad is not None and m.lm_head.weight.grad.abs().sum() > 0


def _two_answers() -> tuple[Transformer, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """A tiny random model and two answers (5 and 4 tokens after a 3-token prompt), with the
    model's own log-probs of them."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, n_kv_head=2))
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    mask = torch.tensor([[0] * 3 + [1] * 5, [0] * 3 + [1] * 4 + [0]])
    with torch.no_grad():
        now = token_logprobs(m, x, y, mask)[0]
    return m, x, y, mask, now


def test_policy_loss_logs_clip_fraction_and_approx_kl_per_update():
    """The GRPO loss appends each update's diagnostics: with the sampling policy's log-probs
    lowered by 0.1 everywhere, every ratio is e^0.1 = 1.105 (inside the 0.2 clip) and
    approx_kl = (r - 1) - ln r = 0.105171 - 0.1 = 0.005171 per token."""
    from echolm.config import RLConfig
    from echolm.train.grpo import PolicyBatch, policy_loss

    m, x, y, mask, now = _two_answers()
    stats: dict = {}
    g = RLConfig(kl_beta=0.0)
    batch = PolicyBatch(x, y, mask, torch.tensor([1.0, -1.0]), now - 0.1, now - 0.1, None)
    policy_loss(m, (batch, torch.arange(2)), g, stats)
    policy_loss(m, (PolicyBatch(x, y, mask, torch.tensor([1.0, -1.0]), now, now, None),
                    torch.arange(2)), g, stats)
    assert stats["approx_kl"][0] == pytest.approx(0.005171, abs=1e-5)
    assert stats["approx_kl"][1] == pytest.approx(0.0, abs=1e-6)
    assert stats["clip_frac"] == [0.0, 0.0] and len(stats["entropy"]) == 2



def test_policy_loss_kl_penalty_is_aggregated_as_the_surrogate():
    """With advantages 0 the surrogate is 0 and the loss is beta * the KL term alone. The
    reference is 1 nat below the policy on every token of row 0 (5 tokens) and equal on row 1
    (4 tokens): k3 = e^-1 + 1 - 1 = 0.367879 on row 0, 0 on row 1. "token": 5 * 0.367879 / 9
    = 0.204377; "sequence" (GRPO): (0.367879 + 0) / 2 = 0.183940; "constant" with
    max_tokens 10: 5 * 0.367879 / (2 * 10) = 0.091970. The logged kl is per token (0.204377)."""
    from echolm.config import RLConfig
    from echolm.train.grpo import PolicyBatch, policy_loss

    m, x, y, mask, now = _two_answers()
    ref = now - torch.tensor([[1.0], [0.0]]) * mask
    batch = PolicyBatch(x, y, mask, torch.zeros(2), now, None, ref)
    k3 = math.exp(-1.0)
    for agg, want in (("token", 5 * k3 / 9), ("sequence", k3 / 2),
                      ("constant", 5 * k3 / 20)):
        stats: dict = {}
        g = RLConfig(kl_beta=0.5, aggregation=agg, max_tokens=10)
        loss = policy_loss(m, (batch, torch.arange(2)), g, stats)
        assert loss.item() == pytest.approx(0.5 * want, abs=1e-5), agg
        assert stats["kl"] == [pytest.approx(5 * k3 / 9, abs=1e-5)]


def test_policy_loss_weights_tokens_by_truncated_importance_sampling():
    """The sampler drew row 0's 5 tokens 1 nat less likely than the trainer sees them (ratio
    e = 2.718, capped at 2) and row 1's 4 tokens alike (ratio 1). Advantages +1, -1 and a
    ratio of 1 to the old policy: per token -A * w = -2 (row 0), +1 (row 1); "token":
    (-10 + 4) / 9 = -0.666667. Logged: sampler_kl, k3 of KL(sampler || trainer) per token,
    5 * (e - 1 - 1) / 9 = 0.399046; tis_capped 5 / 9. With tis_cap = 0 the loss is plain
    GRPO's (-5 + 4) / 9 and sampler_kl is still logged."""
    from echolm.config import RLConfig
    from echolm.train.grpo import PolicyBatch, policy_loss

    m, x, y, mask, now = _two_answers()
    sampler = now - torch.tensor([[1.0], [0.0]]) * mask
    batch = PolicyBatch(x, y, mask, torch.tensor([1.0, -1.0]), sampler, None, None)
    stats: dict = {}
    loss = policy_loss(m, (batch, torch.arange(2)), RLConfig(tis_cap=2.0), stats)
    assert loss.item() == pytest.approx(-6 / 9, abs=1e-5)
    assert stats["sampler_kl"] == [pytest.approx(5 * (math.e - 2) / 9, abs=1e-5)]
    assert stats["tis_capped"] == [pytest.approx(5 / 9)]
    stats = {}
    loss = policy_loss(m, (batch, torch.arange(2)), RLConfig(tis_cap=0.0), stats)
    assert loss.item() == pytest.approx(-1 / 9, abs=1e-5)
    assert "tis_capped" not in stats and len(stats["sampler_kl"]) == 1


def test_sampler_logprobs_are_the_trainers_in_fp32():
    """What the decoder drew each token with (`sample_responses(logprobs=True)`) is what
    `token_logprobs` computes for the same answers, with several prompts and answers that stop
    at different lengths (the decoder drops finished rows as it goes)."""
    from types import SimpleNamespace

    from echolm.rollout import pad_logprobs, sample_responses

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, n_kv_head=2))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    tok = SimpleNamespace(stop_ids=[3, 7], pad=0)
    prompts = [[5, 9, 11], [12, 4], [8, 8, 8, 8]]
    sampled = sample_responses(m, tok, prompts, 4, 12, 1.0, seed=1, logprobs=True)
    assert {len(s.ids) for s in sampled} != {12} and any(s.stopped for s in sampled)
    assert all(len(s.logprobs) == len(s.ids) for s in sampled)
    x, y, mask = pad_batch([p for p in prompts for _ in range(4)], [s.ids for s in sampled], 0)
    with torch.no_grad():
        want = token_logprobs(m, x, y, mask)[0]
    got = pad_logprobs(mask, [s.logprobs for s in sampled])
    assert torch.allclose(got, want, atol=1e-4)
    assert sample_responses(m, tok, prompts[:1], 1, 4, 1.0, seed=1)[0].logprobs is None
