"""Evaluation shared by the stages: bits per byte on held-out text (more to come: task
accuracy, pass@k, reward-model accuracy)."""

from __future__ import annotations

import numpy as np
import torch

from echolm.losses import bits_per_byte, token_cross_entropy
from echolm.model import Transformer
from echolm.tokenizer import Tokenizer


@torch.inference_mode()
def eval_bpb(model: Transformer, tok: Tokenizer, tokens: np.ndarray, seq_len: int,
             max_tokens: int, batch: int = 16, autocast_ctx=None) -> dict:
    """Bits per byte of held-out `tokens`, read in order in rows of seq_len + 1.

    Special tokens (BOS) are excluded as targets: they spell no bytes. The result does not
    depend on the vocabulary, so models with different tokenizers compare fairly.
    """
    import contextlib

    device = next(model.parameters()).device
    n_rows = max(1, min(max_tokens, len(tokens) - 1) // seq_len)
    n_rows = min(n_rows, (len(tokens) - 1) // seq_len)
    nbytes = torch.tensor([len(b) for b in tok.token_bytes] +
                          [0] * (model.cfg.vocab_size - tok.vocab_size), dtype=torch.long)
    nll_sum, byte_sum, tok_count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for r0 in range(0, n_rows, batch):
        rows = [tokens[r * seq_len: r * seq_len + seq_len + 1] for r in range(r0, min(n_rows,
                                                                                    r0 + batch))]
        t = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        x, y = t[:, :-1], t[:, 1:]
        with autocast_ctx or contextlib.nullcontext():
            logits = model(x)
        nll = token_cross_entropy(logits, y)
        b = nbytes.to(device)[y]
        keep = b > 0
        nll_sum += float(nll[keep].sum())
        byte_sum += int(b.sum())
        tok_count += int(keep.sum())
    model.train(was_training)
    return {"bpb": bits_per_byte(nll_sum, byte_sum), "loss": nll_sum / max(tok_count, 1),
            "tokens": tok_count, "bytes": byte_sum}
