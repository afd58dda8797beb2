"""Held-out measurements (echolm/evaluate.py): bits per byte by hand, pass@k sampling."""

import numpy as np
import pytest
import torch

from echolm.config import ModelConfig
from echolm.errors import EchoError
from echolm.evaluate import eval_bpb
from echolm.model import Transformer


class _ByteTok:
    """16 tokens, each spelling one byte (token 0 none: a special token)."""

    vocab_size = 16
    token_bytes = [b""] + [bytes([65 + i]) for i in range(15)]


def test_bits_per_byte_of_a_uniform_model_is_log2_of_its_vocabulary():
    """A fresh model's output head is zero: every next token has probability 1/16, i.e. 4
    bits, and every token here spells one byte: 4.000 bits per byte. A held-out text of 5
    tokens, shorter than one row of 64: read as one row of 4 targets (before: no row, and
    0.000 bits per byte from 0 tokens)."""
    model = Transformer(ModelConfig(vocab_size=16, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                    max_seq_len=128))
    got = eval_bpb(model, _ByteTok(), np.array([1, 2, 3, 4, 5]), seq_len=64, max_tokens=1000)
    assert got["tokens"] == 4 and got["bytes"] == 4
    assert got["bpb"] == pytest.approx(4.0)
    with pytest.raises(EchoError, match="held-out text is 1 token"):
        eval_bpb(model, _ByteTok(), np.array([1]), seq_len=64, max_tokens=1000)


def test_pass_at_k_samples_that_span_two_batches_are_drawn_afresh():
    """12 samples of one problem in batches of 8: samples 8-11 come in the second batch, rows
    0-3, where samples 0-3 were in the first. With one seed for both batches, each batch's
    first decode step drew the same uniform numbers for its first rows, so samples 8-11
    began with the same tokens as samples 0-3 (a batch of 128 and a batch of 72 of one
    prompt: 72 answers repeated outright)."""
    from echolm.evaluate import task_pass_at_k
    from echolm.tasks.base import Problem

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=16, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                    max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)

    class Tok:  # token ids in, ids out: the answers are what the model sampled
        pad, stop_ids = 15, [0]

        def render_user(self, text: str) -> list[int]:
            return [3, 4, 5]

        def decode(self, ids: list[int]) -> str:
            return ",".join(map(str, ids))

    answers: list[str] = []

    class Record:
        name = "record"

        def score(self, problem: Problem, answer: str) -> bool:
            answers.append(answer)
            return False

    problem = Problem("record", "p0", "q", "1", "Answer: 1")
    task_pass_at_k(model, Tok(), Record(), [problem], n_samples=12, ks=[1], temperature=1.0,
                   seed=0, batch=8, max_tokens=12)
    assert len(answers) == 12
    first = [a.split(",")[0] for a in answers]
    assert first[8:] != first[:4]
