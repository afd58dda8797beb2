"""Objectives against numbers worked out by hand."""

import math

import pytest
import torch

from echolm.losses import bits_per_byte, masked_cross_entropy, token_cross_entropy


def _logits() -> torch.Tensor:
    # position 0: uniform over 3 tokens; position 1: probabilities (1/4, 1/2, 1/4)
    return torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]]])


def test_token_cross_entropy_by_hand():
    nll = token_cross_entropy(_logits(), torch.tensor([[2, 1]]))
    # -ln(1/3) = 1.098612..., -ln(1/2) = 0.693147...
    assert torch.allclose(nll, torch.tensor([[1.0986123, 0.6931472]]), atol=1e-6)


def test_masked_cross_entropy_averages_only_masked_positions():
    logits, targets = _logits(), torch.tensor([[2, 0]])
    # unmasked mean: (ln 3 + ln 4) / 2 = (1.0986123 + 1.3862944) / 2
    assert abs(masked_cross_entropy(logits, targets).item() - 1.2424533) < 1e-6
    # only position 1 counts: -ln(1/4) = 1.3862944
    mask = torch.tensor([[0, 1]])
    assert abs(masked_cross_entropy(logits, targets, mask).item() - 1.3862944) < 1e-6


def test_masked_cross_entropy_all_masked_out_is_zero_not_nan():
    loss = masked_cross_entropy(_logits(), torch.tensor([[0, 0]]), torch.zeros(1, 2))
    assert loss.item() == 0.0


def test_masked_cross_entropy_gradient_ignores_masked_positions():
    logits = _logits().requires_grad_()
    masked_cross_entropy(logits, torch.tensor([[2, 1]]), torch.tensor([[1, 0]])).backward()
    # d/dlogits of -log softmax at position 0 = softmax - onehot = (1/3, 1/3, -2/3)
    assert torch.allclose(logits.grad[0, 0], torch.tensor([1 / 3, 1 / 3, -2 / 3]), atol=1e-6)
    assert torch.all(logits.grad[0, 1] == 0)


def test_bits_per_byte_by_hand():
    # 8 bits' worth of nats spread over 4 bytes = 2 bits per byte
    assert abs(bits_per_byte(8 * math.log(2.0), 4) - 2.0) < 1e-9


# ---- GRPO family -----------------------------------------------------------------------
from echolm.losses import (  # noqa: E402
    aggregate_tokens,
    clipped_policy_loss,
    group_advantages,
    kl_k3,
    overlong_penalty,
    truncated_is_weights,
)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # group 1: mean 0.5, population std 0.5 -> (+1, -1, -1, +1); group 2: all equal -> 0
    adv = group_advantages(r)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)
    assert torch.all(adv[1] == 0)
    # Dr. GRPO: no division by the std
    assert torch.allclose(group_advantages(r, scale_by_std=False)[0],
                          torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_clipped_policy_loss_by_hand():
    # two sequences of 2 tokens; second sequence's second token is padding
    logp_old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(1.5), 0.0], [math.log(0.5), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    # seq 1 tok 1: ratio 1.5, A=+1 -> min(1.5, clip 1.2) = 1.2 -> loss -1.2 (clipped)
    # seq 1 tok 2: ratio 1.0, A=+1 -> -1.0
    # seq 2 tok 1: ratio 0.5, A=-1 -> min(-0.5, clip(0.5)=0.8 * -1 = -0.8) = -0.8 -> +0.8 (clipped)
    loss, stats = clipped_policy_loss(logp, logp_old, adv, mask, 0.2, 0.2, "token")
    assert abs(loss.item() - (-1.2 - 1.0 + 0.8) / 3) < 1e-6
    assert abs(stats["clip_frac"].item() - 2 / 3) < 1e-6
    # approx_kl = mean of (r - 1) - ln r over the 3 tokens: r = 1.5, 1.0, 0.5
    # (0.5 - 0.405465) + 0 + (-0.5 + 0.693147) = 0.287682; / 3 = 0.095894
    assert abs(stats["approx_kl"].item() - 0.095894) < 1e-5
    loss, _ = clipped_policy_loss(logp, logp_old, adv, mask, 0.2, 0.2, "sequence")
    assert abs(loss.item() - ((-1.2 - 1.0) / 2 + 0.8) / 2) < 1e-6
    loss, _ = clipped_policy_loss(logp, logp_old, adv, mask, 0.2, 0.2, "constant", max_tokens=4)
    assert abs(loss.item() - (-1.2 - 1.0 + 0.8) / (2 * 4)) < 1e-6
    # clip-higher (DAPO): clip_high 0.6 lets ratio 1.5 through unclipped
    loss, _ = clipped_policy_loss(logp, logp_old, adv, mask, 0.2, 0.6, "token")
    assert abs(loss.item() - (-1.5 - 1.0 + 0.8) / 3) < 1e-6


def test_clip_fraction_counts_only_tokens_whose_gradient_the_clip_cut():
    """Ratios 1.5, 1.5, 0.5, 0.5 (clip 0.2) with advantages +1, -1, -1, +1: the clip cuts the
    gradient of the first (past 1.2, pushed up) and third (under 0.8, pushed down) only; the
    second and fourth are past a bound on the side the advantage pulls away from, where the
    minimum keeps the unclipped term (and its gradient): clip_frac = 2 / 4."""
    logp = torch.tensor([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [math.log(0.5)]],
                        requires_grad=True)
    loss, stats = clipped_policy_loss(logp, torch.zeros(4, 1), torch.tensor([1.0, -1.0, -1.0, 1.0]),
                                      torch.ones(4, 1), 0.2, 0.2, "token")
    assert abs(stats["clip_frac"].item() - 0.5) < 1e-6
    loss.backward()
    assert (logp.grad.flatten() == 0).tolist() == [True, False, True, False]


def test_aggregate_tokens_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_tokens(per_token, mask, "token").item() == pytest.approx(10 / 4)
    assert aggregate_tokens(per_token, mask, "sequence").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_tokens(per_token, mask, "constant", 5).item() == pytest.approx(10 / 10)
    assert aggregate_tokens(per_token, mask, "constant").item() == pytest.approx(10 / 6)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_tokens(per_token, mask, "mean")


def test_clipped_policy_loss_gradient_is_reinforce_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, logp.detach(), torch.tensor([2.0]),
                                  torch.ones(1, 2), aggregation="token")
    loss.backward()
    # d/dlogp of -(exp(logp - old) * A) / 2 at logp == old is -A / 2 per token
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))


def test_truncated_is_weights_by_hand():
    # trainer log-probs -1.0, -2.0, -0.5; the sampler's -1.5, -2.0, -2.0:
    # exp(0.5) = 1.648721, exp(0) = 1, exp(1.5) = 4.481689 capped at 2
    w = truncated_is_weights(torch.tensor([-1.0, -2.0, -0.5], requires_grad=True),
                             torch.tensor([-1.5, -2.0, -2.0]), cap=2.0)
    assert torch.allclose(w, torch.tensor([1.648721, 1.0, 2.0]), atol=1e-6)
    assert not w.requires_grad


def test_clipped_policy_loss_weights_scale_each_token():
    # ratio 1 everywhere, A = +2, two tokens weighted 0.5 and 2: per token -A * w = -1, -4;
    # "token" aggregation: -5 / 2; the gradient per token -A * w / 2 = -0.5, -2
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2),
                                  weights=torch.tensor([[0.5, 2.0]]))
    assert loss.item() == pytest.approx(-2.5)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -2.0]]))


def test_kl_k3_by_hand():
    # p_ref / p = 2 -> 2 - ln 2 - 1 = 0.3068528; equal -> 0
    v = kl_k3(torch.tensor([math.log(0.25), -1.0]), torch.tensor([math.log(0.5), -1.0]))
    assert torch.allclose(v, torch.tensor([1 - math.log(2.0), 0.0]), atol=1e-6)


def test_overlong_penalty_by_hand():
    p = overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_tokens=20, buffer=4)
    assert torch.allclose(p, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))



from echolm.losses import (  # noqa: E402
    best_of_group_advantages,
    clipped_value_loss,
    gae,
    rloo_advantages,
)


def test_rloo_advantages_by_hand():
    # rewards 1, 0, 0: baselines (0+0)/2=0, (1+0)/2=0.5, 0.5 -> advantages 1, -0.5, -0.5
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[1.0, -0.5, -0.5]]))


def test_best_of_group_advantages_by_hand():
    # prompt 1: the third sample is best; prompt 2: a tie between the first two -> the first
    adv = best_of_group_advantages(torch.tensor([[0.1, -2.0, 0.7], [0.5, 0.5, -1.0]]))
    assert torch.equal(adv, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


def test_gae_by_hand():
    # one row, response at positions 1..2 (position 0 is prompt, 3 is padding)
    r = torch.tensor([[0.0, 0.1, 1.0, 5.0]])
    v = torch.tensor([[9.0, 0.5, 0.2, 7.0]])
    m = torch.tensor([[0, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    # t=2: delta = 1.0 + 0 - 0.2 = 0.8 -> A2 = 0.8
    # t=1: delta = 0.1 + 0.2 - 0.5 = -0.2 -> A1 = -0.2 + 0.5 * 0.8 = 0.2
    assert torch.allclose(adv, torch.tensor([[0.0, 0.2, 0.8, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, 0.7, 1.0, 0.0]]), atol=1e-6)


def test_clipped_value_loss_by_hand():
    v = torch.tensor([[1.0, 0.0]])
    v_old = torch.tensor([[0.5, 0.0]])
    ret = torch.tensor([[0.0, 1.0]])
    # token 1: unclipped (1-0)^2 = 1; clipped value 0.5+0.2=0.7 -> 0.49; max 1 -> 0.5
    # token 2: both (0-1)^2 = 1 -> 0.5; mean over 2 tokens = 0.5
    loss = clipped_value_loss(v, v_old, ret, torch.ones(1, 2), clip=0.2)
    assert abs(loss.item() - 0.5) < 1e-6
    # only token 1 masked in
    loss = clipped_value_loss(v, v_old, ret, torch.tensor([[1, 0]]), clip=0.2)
    assert abs(loss.item() - 0.5) < 1e-6


def test_per_token_advantages_in_policy_loss():
    logp = torch.zeros(1, 2)
    loss, _ = clipped_policy_loss(logp, logp, torch.tensor([[1.0, 3.0]]), torch.ones(1, 2))
    assert abs(loss.item() + 2.0) < 1e-6  # -(1 + 3) / 2


# ---- preferences (reward models, DPO) ---------------------------------------------------
from echolm.losses import (  # noqa: E402
    bradley_terry_loss,
    dpo_loss,
    plackett_luce_loss,
    reward_centering_loss,
)


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # differences +1 and -1: -log sigmoid(1) = ln(1 + e^-1) = 0.3132617,
    # -log sigmoid(-1) = ln(1 + e) = 1.3132617; mean 0.8132617
    assert abs(bradley_terry_loss(rc, rr).item() - 0.8132617) < 1e-6
    per_pair = bradley_terry_loss(rc, rr, reduction="none")
    assert torch.allclose(per_pair, torch.tensor([0.3132617, 1.3132617]), atol=1e-6)
    # margin 0.5 asks for more: ln(1 + e^-0.5) = 0.4740770, ln(1 + e^1.5) = 1.7014132
    assert abs(bradley_terry_loss(rc, rr, margin=0.5).item() - (0.4740770 + 1.7014132) / 2) < 1e-6


def test_reward_centering_by_hand():
    # (2 + 1)^2 = 9 and (0 + 1)^2 = 1: mean 5, times coef 0.1 = 0.5
    assert abs(reward_centering_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), 0.1)
               .item() - 0.5) < 1e-6


def test_plackett_luce_loss_by_hand():
    # ranking scores 2, 1, 0 (best first):
    #   -[2 - ln(e^2 + e + 1)] = 2.4076060 - 2 = 0.4076060  (best picked from all three)
    #   -[1 - ln(e + 1)]       = 1.3132617 - 1 = 0.3132617  (second picked from the two left)
    #   -[0 - ln(e^0)]         = 0                          (the last is forced)
    s = torch.tensor([[2.0, 1.0, 0.0]])
    assert abs(plackett_luce_loss(s).item() - 0.7208677) < 1e-6
    # a second ranking of only two responses (third column masked out) is BT: ln(1 + e^-1)
    s2 = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert abs(plackett_luce_loss(s2, mask).item() - (0.7208677 + 0.3132617) / 2) < 1e-6
    # the masked score gets no gradient and the loss has no NaN
    s2.requires_grad_()
    plackett_luce_loss(s2, mask).backward()
    assert s2.grad[1, 2] == 0 and torch.isfinite(s2.grad).all()


def test_plackett_luce_with_two_responses_equals_bradley_terry():
    s = torch.randn(5, 2)
    assert torch.allclose(plackett_luce_loss(s), bradley_terry_loss(s[:, 0], s[:, 1]), atol=1e-6)


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    # chosen log-ratio -1 - -2 = +1, rejected -3 - -2 = -1: h = 2; beta 0.5 -> beta*h = 1
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert abs(loss.item() - 0.3132617) < 1e-6  # -log sigmoid(1)
    assert chosen.item() == 0.5 and rejected.item() == -0.5  # beta * log-ratios
    # IPO: (h - 1 / (2 beta))^2 = (2 - 1)^2 = 1
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, kind="ipo")
    assert abs(loss.item() - 1.0) < 1e-6


def test_dpo_loss_gradient_by_hand():
    # at h = 0 (policy == reference): d/dpc of -log sigmoid(beta h) = -beta * sigmoid(0)
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.1)
    loss.backward()
    assert abs(pc.grad.item() + 0.05) < 1e-7 and abs(pr.grad.item() - 0.05) < 1e-7


def test_chosen_nll_by_hand():
    from echolm.losses import chosen_nll

    # answers of 4 and 2 tokens with summed log-probs -2 and -3: per token 0.5 and 1.5
    lp = torch.tensor([-2.0, -3.0], requires_grad=True)
    loss = chosen_nll(lp, torch.tensor([4, 2]))
    assert abs(loss.item() - 1.0) < 1e-7  # (0.5 + 1.5) / 2
    loss.backward()  # d/dlp_i of mean(-lp_i / n_i) = -1 / (2 n_i)
    assert torch.allclose(lp.grad, torch.tensor([-0.125, -0.25]))
    assert chosen_nll(torch.tensor([-1.0]), torch.tensor([0])).item() == 1.0  # no 0 division


from echolm.losses import linear_cross_entropy  # noqa: E402


def test_fused_linear_cross_entropy_equals_the_plain_one():
    """The chunked head + loss (never materialises all logits) gives the same loss and
    gradients as masked_cross_entropy, itself checked by hand above."""
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(11, 16, requires_grad=True)
    y = torch.randint(0, 11, (3, 7))
    for mask in (None, (torch.rand(3, 7) > 0.4).long(), torch.zeros(3, 7, dtype=torch.long)):
        ref = masked_cross_entropy(h @ w.T, y, mask)
        gh, gw = torch.autograd.grad(ref, (h, w))
        got = linear_cross_entropy(h, w, y, mask, chunk=5)  # chunks not dividing 21 rows
        fh, fw = torch.autograd.grad(got, (h, w))
        assert torch.allclose(got, ref, atol=1e-6)
        assert torch.allclose(fh, gh, atol=1e-6) and torch.allclose(fw, gw, atol=1e-6)


from echolm.losses import head_logprobs  # noqa: E402


def test_head_logprobs_by_hand():
    # h = [[ln 2, 0]], w = identity on 3 tokens' first two dims + a zero row: logits
    # (ln 2, 0, 0), probabilities (1/2, 1/4, 1/4). log p(token 1) = ln(1/4); entropy
    # = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2. d log p(1) / d logits = onehot - p = (-1/2, 3/4, -1/4)
    h = torch.tensor([[math.log(2.0), 0.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    lp, ent = head_logprobs(h, w, torch.tensor([1]), entropy=True)
    assert torch.allclose(lp, torch.tensor([math.log(0.25)]), atol=1e-6)
    assert torch.allclose(ent, torch.tensor([1.5 * math.log(2.0)]), atol=1e-6)
    lp.sum().backward()
    g = torch.tensor([[-0.5, 0.75, -0.25]])
    assert torch.allclose(w.grad, g.T @ h.detach(), atol=1e-6)  # (-ln2/2, 3ln2/4, -ln2/4) x
    assert torch.allclose(h.grad, g @ w.detach(), atol=1e-6)  # (-1/2, 3/4)


def test_head_logprobs_equals_autograd_of_log_softmax():
    """Values and both gradients against the plain path, a weighted sum of log-probs as a
    policy loss makes; a frozen weight gets none; a second backward is refused."""
    torch.manual_seed(0)
    h = torch.randn(13, 16, requires_grad=True)
    w = torch.randn(70, 16, requires_grad=True)
    y, coef = torch.randint(0, 70, (13,)), torch.randn(13)
    plain = torch.log_softmax(h @ w.T, -1)
    ref = plain.gather(1, y[:, None]).squeeze(1)
    gh, gw = torch.autograd.grad((ref * coef).sum(), (h, w))
    lp, ent = head_logprobs(h, w, y, entropy=True)
    assert torch.allclose(lp, ref, atol=1e-5)
    assert torch.allclose(ent, -(plain.exp() * plain).sum(-1), atol=1e-5)
    assert not ent.requires_grad and head_logprobs(h, w, y)[1] is None
    loss = (lp * coef).sum()
    fh, fw = torch.autograd.grad(loss, (h, w), retain_graph=True)
    assert torch.allclose(fh, gh, atol=1e-5) and torch.allclose(fw, gw, atol=1e-5)
    try:
        torch.autograd.grad(loss, (h, w))
        raise AssertionError("a second backward must be refused")
    except RuntimeError as e:
        assert "twice" in str(e)
    frozen = w.detach()
    lp2, _ = head_logprobs(h, frozen, y)
    assert torch.allclose(torch.autograd.grad((lp2 * coef).sum(), h)[0], gh, atol=1e-5)
    # under bf16 autocast: the products in bf16 (the casts made once, in the forward), the
    # softmax in fp32, the gradients in the inputs' dtype: exactly the explicit computation
    hb, wb = h.detach().bfloat16(), w.detach().bfloat16()
    logits = (hb @ wb.T).float()
    want = torch.log_softmax(logits, -1)
    g = (-(want.exp()) * coef[:, None]).scatter_add(1, y[:, None], coef[:, None]).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        lp3, _ = head_logprobs(h, w, y)
    bh, bw = torch.autograd.grad((lp3 * coef).sum(), (h, w))
    assert torch.allclose(lp3, want.gather(1, y[:, None]).squeeze(1), atol=1e-6)
    assert bh.dtype == bw.dtype == torch.float32
    assert torch.allclose(bh, (g @ wb).float(), atol=1e-6)
    assert torch.allclose(bw, (g.T @ hb).float(), atol=1e-6)


def test_head_logprobs_without_a_backward_reads_blocks_of_rows_and_gives_the_same(
        monkeypatch):
    """Under no_grad (a reference's pass, an evaluation) the head runs HEAD_ROWS rows at a
    time, never holding a (rows, vocab) matrix: the same log-probs and entropies as the
    one-matrix path, in fp32 and under bf16 autocast; no rows give empty results."""
    import echolm.losses as losses
    from echolm.losses import HEAD_ROWS

    seen: list[int] = []
    block = losses._head_block
    monkeypatch.setattr(losses, "_head_block",
                        lambda hb, *a: seen.append(len(hb)) or block(hb, *a))
    torch.manual_seed(1)
    n = 2 * HEAD_ROWS + 17
    h, w = torch.randn(n, 16, requires_grad=True), torch.randn(70, 16)
    y = torch.randint(0, 70, (n,))
    for bf16 in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            full, full_ent = head_logprobs(h, w, y, entropy=True)  # h requires grad: one matrix
            with torch.no_grad():
                lp, ent = head_logprobs(h, w, y, entropy=True)
                assert head_logprobs(h, w, y)[1] is None
        assert lp.shape == (n,) and not lp.requires_grad
        assert seen[0] == n and seen[1:] == [HEAD_ROWS, HEAD_ROWS, 17] * 2  # with, without grad
        seen.clear()
        assert torch.allclose(lp, full.detach(), atol=1e-5)
        assert torch.allclose(ent, full_ent, atol=1e-5)
    with torch.no_grad():
        empty, ent = head_logprobs(h[:0], w, y[:0], entropy=True)
    assert empty.shape == (0,) and ent.shape == (0,)


from echolm.losses import explained_variance  # noqa: E402


def test_explained_variance_by_hand():
    # masked returns 1, 2, 3 (mean 2, variance 2/3); values 1, 2, 2 leave residuals 0, 0, 1
    # (mean 1/3, variance 2/9): 1 - (2/9) / (2/3) = 2/3. The padded 4th token is ignored.
    returns = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    values = torch.tensor([[1.0, 2.0], [2.0, -50.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert abs(explained_variance(values, returns, mask) - 2 / 3) < 1e-9
    assert explained_variance(returns, returns, mask) == 1.0
    assert abs(explained_variance(torch.full((2, 2), 2.0), returns, mask)) < 1e-9  # the mean
    assert math.isnan(explained_variance(values, torch.ones(2, 2), mask))  # nothing to explain
