"""Muon with the Newton-Schulz dtype as a parameter (train/muon.py), against torch's own Muon,
and the machine facts that choose the dtype (machine.py)."""

from __future__ import annotations

import torch

from echolm.machine import describe, fast_dtype, isa, native_bf16
from echolm.optim import Muon, newton_schulz


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g) * 0.1)
            for shape in ((24, 40), (40, 24), (16, 16))]


def _train(opt_class, steps: int = 4, **kwargs) -> list[torch.Tensor]:
    params = _params()
    opt = opt_class(params, lr=0.02, weight_decay=0.01, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def test_in_bf16_it_is_torch_muon_bit_for_bit() -> None:
    ours = _train(Muon, ns_dtype=torch.bfloat16)
    theirs = _train(torch.optim.Muon)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_in_fp32_it_takes_the_same_steps_more_precisely() -> None:
    """fp32 differs from torch's bf16 only by bf16 rounding, and is closer to the exact
    (float64) iteration than bf16 is."""
    start = [p.detach().clone() for p in _params()]
    fp32 = _train(Muon, ns_dtype=torch.float32)
    bf16 = _train(torch.optim.Muon)
    exact = _train(Muon, ns_dtype=torch.float64)
    for s, a, b, e in zip(start, fp32, bf16, exact, strict=True):
        step = (e - s).norm()
        assert (a - b).norm() / step < 0.02  # the same update up to bf16 rounding (~2^-8)
        assert (a - e).norm() < (b - e).norm() / 10


def test_newton_schulz_makes_singular_values_near_one() -> None:
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(newton_schulz(g, dtype=dtype).float())
        assert s.min() > 0.5 and s.max() < 1.5  # the quintic's documented band
    tall = newton_schulz(g.T, dtype=torch.float32)
    assert torch.allclose(tall, newton_schulz(g, dtype=torch.float32).T)


def test_default_dtype_is_the_machines_fast_one() -> None:
    opt = Muon(_params(), lr=0.01)
    assert opt.ns_dtype == fast_dtype("cpu")
    assert fast_dtype("cpu") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)


def test_native_bf16_follows_the_cpu_flags() -> None:
    flags = frozenset({"avx2", "fma", "amx_bf16", "avx512f"})
    assert isa(flags) == ["AVX2", "AVX-512", "AMX-BF16"]
    info = describe(measure=True)
    assert info["peak_tflops"]["fp32"] > 0 and info["peak_tflops"]["bf16"] > 0
    assert info["native_bf16"] == native_bf16("cpu")
    if not native_bf16("cpu"):  # emulated bf16 is far below fp32 (AVX2: ~40-65x)
        assert info["peak_tflops"]["bf16"] < info["peak_tflops"]["fp32"]
