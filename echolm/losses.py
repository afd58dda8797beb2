"""Training objectives as small pure functions: tensors in, loss out. Each has a test against
numbers worked out by hand (tests/test_losses.py)."""

from __future__ import annotations

import math

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
