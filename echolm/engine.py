"""Generation: prefill a batch of prompts into a preallocated KV cache, then decode one token
at a time, sampling with temperature / top-k / top-p / repetition penalty, stopping per row at
an end token or a length limit. Streaming yields text that never splits a UTF-8 character."""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from echolm.model import KVCache, Transformer
from echolm.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 makes already-seen tokens less likely
    seed: int | None = None
    stop_ids: Sequence[int] = field(default_factory=tuple)


def sample_next(logits: Tensor, p: SamplingParams, history: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row from logits (B, V)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate_ids(model: Transformer, prompts: list[list[int]], p: SamplingParams,
                 pad_id: int = 0) -> Iterator[Tensor]:
    """Yield, at each decode step, the new token of every row (B,), -1 for finished rows.

    Prompts of different lengths are left-padded into one batch; one forward pass per step.
    """
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(x) for x in prompts)
    total = min(L + p.max_tokens, model.cfg.max_seq_len)
    if L >= model.cfg.max_seq_len:
        raise ValueError(f"prompt of {L} tokens leaves no room (max_seq_len "
                         f"{model.cfg.max_seq_len})")
    idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, x in enumerate(prompts):
        idx[i, L - len(x):] = torch.tensor(x, dtype=torch.long)
        valid[i, L - len(x):] = True
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, total, device=device, dtype=dtype)
    gen = None
    if p.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed)
    stop = torch.tensor(list(p.stop_ids) or [-2], device=device)
    history = idx if p.repetition_penalty != 1.0 else None
    logits = model(idx, cache, valid)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(total - L):
        nxt = sample_next(logits, p, history, gen)
        nxt = torch.where(done, -1, nxt)
        yield nxt
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or cache.len >= total:
            return
        feed = nxt.clamp(min=0)[:, None]
        if history is not None:
            history = torch.cat([history, feed], 1)
        logits = model(feed, cache)[:, -1]


def generate(model: Transformer, tok: Tokenizer, prompts: list[list[int]],
             p: SamplingParams) -> list[list[int]]:
    """Completed token ids per prompt (stop token excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(p.stop_ids)
    for step in generate_ids(model, prompts, p, pad_id=tok.pad):
        for i, t in enumerate(step.tolist()):
            if t >= 0 and t not in stops:
                out[i].append(t)
    return out


class Utf8Stream:
    """Turns token ids into text pieces without ever emitting half a UTF-8 character: bytes
    that do not yet form a whole character wait for the next token (a token can end in the
    middle of a multi-byte character)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tok.token_bytes[token_id], final=False)

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
