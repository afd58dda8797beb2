"""Objectives against numbers worked out by hand."""

import math

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
