"""Training objectives as small pure functions: tensors in, loss out. Each has a test against
numbers worked out by hand (tests/test_losses.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token negative log-likelihood in nats, shape of `targets` (no reduction)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                           reduction="none").view(targets.shape)


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy over positions where `mask` is 1 (all positions if None).

    logits (B, T, V), targets (B, T) ids, mask (B, T) of 0/1. This is pretraining's loss
    (no mask) and SFT's (mask = assistant tokens). A batch with no masked-in token gives 0
    rather than NaN, so an all-prompt micro-batch cannot poison the gradient.
    """
    nll = token_cross_entropy(logits, targets)
    if mask is None:
        return nll.mean()
    mask = mask.to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def bits_per_byte(nll_nats_sum: float, n_bytes: int) -> float:
    """Summed token NLL (nats) over the UTF-8 bytes those tokens spell: comparable across
    vocabularies, unlike per-token loss."""
    return nll_nats_sum / (math.log(2.0) * max(n_bytes, 1))


# ---- reinforcement learning (GRPO family) ------------------------------------------------


def group_advantages(rewards: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's group-relative advantage: each sample's reward minus its group's mean, divided
    by the group's standard deviation (`scale_by_std`, GRPO) or not (Dr. GRPO, which found the
    division over-weights groups that are almost all right or all wrong).

    rewards (n_groups, group_size) -> advantages of the same shape. Population std (/n).
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def clipped_policy_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor,
                        clip_low: float = 0.2, clip_high: float = 0.2,
                        aggregation: str = "token", max_tokens: int | None = None,
                        weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, as GRPO and its variants use it.

    logp, logp_old, mask: (B, T) per response token (mask 1 on tokens the policy generated);
    advantages: (B,) one per sequence (GRPO, RLOO) or (B, T) one per token (PPO with GAE).
    ratio = exp(logp - logp_old); per token -min(ratio * A, clip(ratio, 1 - clip_low,
    1 + clip_high) * A). DAPO's "clip-higher" is clip_high > clip_low. Aggregated over tokens
    by `aggregate_tokens` ("token", "sequence" or "constant"). `weights` (B, T), no gradient,
    multiply each token's term (truncated importance sampling: `truncated_is_weights`).
    Returns the loss and statistics: clip fraction (the share of tokens whose gradient the
    clip cut off), mean ratio, and approx_kl, the k3 estimate
    of KL(old || new) per token, mean((ratio - 1) - log ratio): how far this update has moved
    the policy from the one that sampled (cleanRL's diagnostic; >~0.05 means steps too big).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - logp_old)
    adv = (advantages[:, None] if advantages.ndim == 1 else advantages).to(logp.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach().to(per_token.dtype)
    loss = aggregate_tokens(per_token, mask, aggregation, max_tokens)
    log_ratio = (logp - logp_old).detach()
    # clipped: the tokens whose gradient the clip cut off (TRL's clip_ratio): the ratio past
    # the bound on the side the advantage pushes it. A ratio past a bound on the other side
    # keeps its gradient (the minimum picks the unclipped term), so it is not counted.
    cut = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
    stats = {k: aggregate_tokens(v.detach().to(logp.dtype), mask) for k, v in (
        ("clip_frac", cut), ("ratio", ratio), ("approx_kl", (log_ratio.exp() - 1) - log_ratio))}
    return loss, stats


def truncated_is_weights(logp_old: Tensor, logp_sampler: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"; TRL's vllm_importance_sampling_cap): per token
    min(pi_train / pi_sampler, cap) = min(exp(logp_old - logp_sampler), cap), no gradient.
    The answers were drawn by the sampler, whose numbers differ from the trainer's (another
    dtype, other kernels); weighting each token's surrogate by this ratio makes the gradient
    the trainer's policy's own, and the cap bounds the variance a rare token could add."""
    return torch.exp(logp_old.detach() - logp_sampler).clamp(max=cap)


def aggregate_tokens(per_token: Tensor, mask: Tensor, aggregation: str = "token",
                     max_tokens: int | None = None) -> Tensor:
    """A per-token term (B, T) over the tokens `mask` selects, as one number:
      "token"    sum over all tokens / number of tokens (DAPO: long answers weigh more),
      "sequence" mean within each sequence, then mean over sequences (original GRPO),
      "constant" sum / (B * max_tokens) (Dr. GRPO: no length bias at all; max_tokens None:
                 T). GRPO's surrogate and its KL penalty are both aggregated this way."""
    mask = mask.to(per_token.dtype)
    if aggregation == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "sequence":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if aggregation == "constant":
        denom = per_token.shape[0] * (max_tokens if max_tokens is not None else per_token.shape[1])
        return (per_token * mask).sum() / denom
    raise ValueError(f"aggregation must be token, sequence or constant, got {aggregation!r}")


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 when the critic
    predicts the returns exactly, 0 when it does no better than their mean, negative when
    worse. NaN when the returns do not vary. (Population variances, as numpy's var.)"""
    m = mask.bool()
    y, v = returns[m].double(), values[m].double()
    var_y = y.var(unbiased=False) if y.numel() else torch.tensor(0.0)
    if var_y == 0:
        return float("nan")
    return float(1 - (y - v).var(unbiased=False) / var_y)


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token KL(policy || reference) estimate "k3" (Schulman): r - log r - 1 with
    r = p_ref / p_policy. Unbiased, always >= 0, low variance; what GRPO penalises."""
    log_r = logp_ref - logp
    return torch.exp(log_r) - log_r - 1


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer, then falling linearly to
    -1 at max_tokens (a response cut off by the limit gets the full -1)."""
    start = max_tokens - buffer
    over = (lengths.to(torch.float32) - start).clamp(min=0)
    return -(over / max(buffer, 1)).clamp(max=1.0)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out: each sample's reward minus the mean of the *other* samples of
    the same prompt (an unbiased baseline). rewards (n_prompts, k) with k >= 2."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def best_of_group_advantages(rewards: Tensor) -> Tensor:
    """Rejection-sampling fine-tuning (Llama 2's RLHF; RAFT, Dong et al. 2023) as advantages:
    1 for the highest-reward sample of each prompt (the first on a tie), 0 for the rest, so
    the policy-gradient step is a likelihood step on the best of k. rewards (n_prompts, k)."""
    best = rewards.argmax(dim=1, keepdim=True)
    return torch.zeros_like(rewards).scatter_(1, best, 1.0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the masked (response) tokens of each row.

    rewards, values, mask: (B, T). delta_t = r_t + gamma * V_{t+1} - V_t (V after the last
    response token is 0), A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages,
    returns = advantages + values), both 0 outside the mask.
    """
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # outside the response (padding after it) carry nothing back
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    return adv, (adv + values) * mask


def clipped_value_loss(values: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor,
                       clip: float = 0.2) -> Tensor:
    """PPO's value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2),
    averaged over masked tokens."""
    mask = mask.to(values.dtype)
    clipped = values_old + (values - values_old).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


# ---- preferences (reward models, DPO) --------------------------------------------------


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None,
                       reduction: str = "mean") -> Tensor:
    """Bradley-Terry pairwise loss of a reward model: -log sigmoid(r_c - r_r - margin).

    r_chosen, r_rejected: (N,) scores of the preferred and the other response of N pairs.
    `margin` (a number or (N,)) asks for a gap of at least that much (Llama 2's margin); None
    or 0 is plain BT. reduction "mean" (default) or "none" (per pair)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if reduction == "none":
        return loss
    if reduction != "mean":
        raise ValueError(f"reduction must be mean or none, got {reduction!r}")
    return loss.mean()


def reward_centering_loss(r_chosen: Tensor, r_rejected: Tensor, coef: float) -> Tensor:
    """Reward centering regulariser (Eisenstein et al. 2023, "Helping or Herding?"):
    coef * mean((r_c + r_r)^2). BT only sees differences, so the scores' overall level drifts
    freely; this pins each pair's mean near 0 so rewards from different runs are comparable."""
    return coef * ((r_chosen + r_rejected) ** 2).mean()


def plackett_luce_loss(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plackett-Luce negative log-likelihood of full rankings, mean over rankings.

    scores (B, K): row b holds the scores of its responses in ranking order, best first;
    mask (B, K) 0/1 marks real responses (rankings of different lengths; masked-out columns
    take no part anywhere). Per ranking: -sum_i log(exp(s_i) / sum_{j >= i} exp(s_j)), i.e.
    the best is chosen from all, the second from the rest, ... With K = 2 this is BT.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    s = scores.float().masked_fill(~mask, -1e9)  # exp(-1e9 - s) == 0: out of every sum
    # log sum_{j >= i} exp(s_j): a cumulative logsumexp from the right
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    nll = ((tail - s) * mask).sum(-1)
    return nll.mean()


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float, kind: str = "sigmoid"
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation on sequence log-probabilities (N,) of N pairs.

    h = (pc - rc) - (pr - rr), the policy's log-ratio gain of chosen over rejected against
    the reference.
      "sigmoid" (DPO, Rafailov et al. 2023): -log sigmoid(beta * h)
      "ipo"     (IPO, Azar et al. 2023):     (h - 1 / (2 * beta))^2
    Returns (mean loss, chosen implicit rewards beta * (pc - rc), rejected implicit rewards
    beta * (pr - rr)); the rewards are detached (for logging and accuracy).
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"kind must be sigmoid or ipo, got {kind!r}")
    return (loss.mean(), beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def chosen_nll(chosen_logps: Tensor, chosen_counts: Tensor) -> Tensor:
    """RPO's extra term (Pang et al. 2024): the chosen answers' negative log-likelihood per
    token, averaged over pairs. chosen_logps (N,) summed log-probs, chosen_counts (N,) their
    token counts. Added to DPO's loss, it keeps the preferred answers likely: DPO alone can
    lower both answers of a pair while it widens the gap between them."""
    return (-chosen_logps / chosen_counts.clamp(min=1).to(chosen_logps.dtype)).mean()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i weights[i] * CE(h[i] @ w.T, targets[i]), `chunk` rows at a time.

    The (N, vocab) logits, their fp32 copy, the log-probs and their gradient are never
    materialised for the whole batch: each chunk's softmax gradient is turned into its
    share of dh and dw right away (in the forward pass, while the logits are in cache), so
    backward is only a scale. Matmuls run in the autocast dtype when autocast is on.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, weights: Tensor,
                chunk: int) -> Tensor:
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.h_dtype, ctx.w_dtype = h.dtype, w.dtype
        with torch.autocast(dev, enabled=False):
            hc, wc = h.to(dtype), w.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            dh = torch.empty_like(hc) if need_grad else None
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
            for s in range(0, hc.shape[0], chunk):
                hs, t, ws = hc[s:s + chunk], targets[s:s + chunk, None], weights[s:s + chunk]
                z = (hs @ wc.T).float()
                picked = z.gather(1, t)
                top = z.amax(dim=-1, keepdim=True)
                e = z.sub_(top).exp_()  # in place: z is not needed any more
                total = e.sum(dim=-1, keepdim=True)
                loss += ((top + total.log() - picked).squeeze(1) * ws).sum()
                if need_grad:  # d loss / d z = weight * (softmax - onehot)
                    g = e.mul_(ws[:, None] / total)
                    g.scatter_add_(1, t, -ws[:, None])
                    g = g.to(dtype)
                    dh[s:s + chunk] = g @ wc
                    dw += (g.T @ hs).float()
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        dh, dw = ctx.saved_tensors
        return (dh * grad).to(ctx.h_dtype), (dw * grad).to(ctx.w_dtype), None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                         mask: Tensor | None = None, chunk: int = 512) -> Tensor:
    """`masked_cross_entropy(hidden @ weight.T, targets, mask)` without the full logits.

    hidden (B, T, C), weight (vocab, C) (the output head), targets (B, T), mask (B, T) of
    0/1 or None. Same value and gradients (up to float rounding); peak memory and time drop
    by the (B*T, vocab) fp32 tensors the plain path allocates.
    """
    n = targets.numel()
    if mask is None:
        weights = torch.full((n,), 1.0 / max(n, 1), device=hidden.device)
    else:
        m = mask.flatten().float()
        weights = m / m.sum().clamp(min=1.0)
    return _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(),
                                     weights, chunk)


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(h @ w.T)[target] per row; the entropy of each row too when asked.

    What autograd does for `log_softmax(lm_head(h)).gather(...)`, in fewer passes over the
    (rows, vocab) matrix: the log-probs are made in place in the logits' buffer and kept; the
    backward turns them into the softmax in place and takes the gradient from there (no
    zero-filled (rows, vocab) gradient of the gather, no second softmax for the entropy). The
    weight's gradient comes out of one matrix product, contiguous and unshared, so autograd
    adds a tied embedding's gradient into it in place. Backward once only (it reuses that
    buffer). Matmuls run in the autocast dtype when autocast is on, the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, entropy: bool
                ) -> tuple[Tensor, Tensor | None]:
        hc, wc = _head_casts(h, w)  # kept for the backward: cast once, not twice
        picked, ent, logp = _head_block(hc, wc, targets, entropy)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        ctx.dtypes, ctx.spent = (h.dtype, w.dtype), False
        ctx.save_for_backward(hc, wc, targets, logp)
        return picked, ent

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_entropy: Tensor | None):
        if ctx.spent:
            raise RuntimeError("head_logprobs: backward ran twice (it reuses its buffer)")
        ctx.spent = True
        h, w, targets, logp = ctx.saved_tensors  # in the matmul dtype
        h_dtype, w_dtype = ctx.dtypes
        # d picked / d logits = onehot(target) - softmax
        g = logp.exp_().mul_(-grad[:, None]).scatter_add_(1, targets[:, None], grad[:, None])
        with torch.autocast(h.device.type, enabled=False):
            g = g.to(h.dtype)
            dh = (g @ w).to(h_dtype) if ctx.needs_input_grad[0] else None
            dw = (g.T @ h).to(w_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def _head_casts(h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """h and w in the dtype the head's matmul runs in: autocast's when it is on."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    return h.to(dtype), w.to(dtype)


def _head_block(h: Tensor, w: Tensor, targets: Tensor, entropy: bool
                ) -> tuple[Tensor, Tensor | None, Tensor]:
    """(log p(targets), entropies or None, the (rows, vocab) fp32 log-probs) of rows h under
    head w, both already in the matmul dtype; the log-softmax made in place."""
    with torch.autocast(h.device.type, enabled=False):
        logp = (h @ w.T).float()
        logp.sub_(torch.logsumexp(logp, dim=-1, keepdim=True))
        picked = logp.gather(1, targets[:, None]).squeeze(1)
        ent = None
        if entropy:  # a row block at a time: no second (rows, vocab) buffer
            ent = torch.empty_like(picked)
            for s in range(0, len(picked), 64):
                block = logp[s:s + 64]
                ent[s:s + 64] = -(block.exp() * block).sum(-1)
    return picked, ent, logp


HEAD_ROWS = 256  # rows per block when no backward follows


def head_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, entropy: bool = False
                  ) -> tuple[Tensor, Tensor | None]:
    """log p(targets) (M,) under the output head `weight` (vocab, C) at the rows of `hidden`
    (M, C), in fp32, and the entropy of each row's distribution (no gradient) when asked,
    else None. Values and gradients are those of `log_softmax(hidden @ weight.T)`, gathered."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _HeadLogprobs.apply(hidden, weight, targets, entropy)
    # no backward follows (a reference's pass, an evaluation): a block of rows at a time, so
    # scoring many answers never holds a (rows, vocab) matrix (16 DPO pairs: ~1 GB, and the
    # heap kept every such size it had seen)
    h, w = _head_casts(hidden, weight)
    picked, ents = [], []
    for r in range(0, max(len(h), 1), HEAD_ROWS):  # each block's log-probs freed here
        p, e, _ = _head_block(h[r:r + HEAD_ROWS], w, targets[r:r + HEAD_ROWS], entropy)
        picked.append(p)
        ents.append(e)
    return torch.cat(picked), torch.cat(ents) if entropy else None
