"""Rollouts: sampled answers to chat prompts, and the padded batches the RL objectives read
them back from. Shared by RL, RLHF, ranking and evaluation."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from echolm.engine import SamplingParams, generate_ids
from echolm.lora import free_casts
from echolm.losses import head_logprobs
from echolm.model import Transformer
from echolm.tokenizer import Tokenizer


class Sampled(NamedTuple):
    """One sampled answer: the generated ids (with the end-of-turn token when the model
    stopped), whether it stopped, and (when asked) the sampler's log-probability of each id
    under the model's raw distribution (temperature 1, no filtering): what the trainer's
    log-probabilities are compared with (RL's truncated importance sampling)."""

    ids: list[int]
    stopped: bool
    logprobs: list[float] | None = None

    @property
    def answer(self) -> list[int]:
        """The answer's own ids: without the end-of-turn token it stopped on."""
        return self.ids[:-1] if self.stopped else self.ids


@torch.inference_mode()
def sample_responses(model: Transformer, tok: Tokenizer, prompts: list[list[int]], n: int,
                     max_tokens: int, temperature: float, seed: int, desc: str | None = None,
                     logprobs: bool = False) -> list[Sampled]:
    """`n` sampled responses to every prompt (prompt-major order). With `desc`, a progress bar
    of the answers finished (it goes when done)."""
    free_casts(model)  # training-time copies: the decoder has its own
    stops = tok.stop_ids
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                            stop_ids=stops)
    was_training = model.training
    model.eval()
    flat = [p for p in prompts for _ in range(n)]
    responses: list[list[int]] = [[] for _ in flat]
    lps: list[list[float]] = [[] for _ in flat]
    drawn = torch.zeros(len(flat))  # this step's log-probabilities, by row

    def keep_logprobs(rows: Tensor, logits: Tensor, nxt: Tensor) -> None:
        logits = logits.float()
        lp = logits.gather(1, nxt[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
        drawn[rows.cpu()] = lp.cpu()

    bar = tqdm(total=len(flat), desc=desc, unit="answer", leave=False, dynamic_ncols=True,
               disable=desc is None)
    for step in generate_ids(model, flat, params, pad_id=tok.pad,
                             on_draw=keep_logprobs if logprobs else None):
        step_lps = drawn.tolist() if logprobs else None
        for i, t in enumerate(step.tolist()):
            if t >= 0:
                responses[i].append(t)
                if step_lps is not None:
                    lps[i].append(step_lps[i])
                if t in stops:
                    bar.update(1)
    bar.close()
    model.train(was_training)
    return [Sampled(r, bool(r) and r[-1] in stops, lp if logprobs else None)
            for r, lp in zip(responses, lps, strict=True)]


def pad_right(seqs: list[list[int]], pad: int) -> Tensor:
    """Token sequences as one (B, longest) tensor, `pad` after each one's end."""
    x = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return x


def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad: int
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, targets, mask) right-padded; mask is 1 where the target is a response token."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    x, y = pad_right([s[:-1] for s in seqs], pad), pad_right([s[1:] for s in seqs], pad)
    mask = torch.zeros_like(x)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        mask[i, len(p) - 1:len(s) - 1] = 1
    return x, y, mask


def pad_logprobs(mask: Tensor, logprobs: list[list[float]]) -> Tensor:
    """Each answer's per-token numbers (the sampler's log-probabilities) placed where
    `pad_batch`'s mask has its tokens, 0 elsewhere: (B, T) float32."""
    flat = torch.tensor([v for row in logprobs for v in row], device=mask.device)
    return torch.zeros(mask.shape, device=mask.device).masked_scatter(mask.bool(), flat)


def response_logprobs(logits: Tensor, y: Tensor) -> Tensor:
    """log p(y) at every position of `logits` (..., V) -> (...), in float32, for logits a
    caller already has (RLHF's policy and value pass); from hidden states `token_logprobs`
    uses `losses.head_logprobs`, which makes the logits itself."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, y[..., None]).squeeze(-1)


def shared_prompts(x: Tensor, y: Tensor, sel: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """A `pad_batch` batch as (prompts (U, P) left-padded, their real positions, answers (N, A)
    right-padded, each answer's prompt row, the answers' real positions), when some rows share
    a prompt (a GRPO group, a DPO pair); None when none do, or when a row's targets are not
    one run (then the prompt is not simply what precedes them)."""
    B, T = sel.shape
    n = sel.sum(1)
    first = sel.int().argmax(1)
    span = torch.arange(T, device=sel.device)
    run = (span >= first[:, None]) & (span < (first + n)[:, None])
    if not bool((n > 0).all()) or not bool((sel == run).all()):
        return None
    firsts, counts = first.tolist(), n.tolist()  # a prompt is x up to its first target
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(x[i, :firsts[i] + 1].tolist()), len(index)) for i in range(B)]
    if len(index) == B:
        return None
    P, A = max(firsts) + 1, max(counts)
    prompts = torch.zeros(len(index), P, dtype=x.dtype, device=x.device)
    real = torch.zeros(len(index), P, dtype=torch.bool, device=x.device)
    for ids, u in index.items():
        prompts[u, P - len(ids):] = torch.tensor(ids, dtype=x.dtype)
        real[u, P - len(ids):] = True
    answers = torch.zeros(B, A, dtype=y.dtype, device=y.device)
    for i in range(B):
        answers[i, :counts[i]] = y[i, firsts[i]:firsts[i] + counts[i]]
    answer_real = torch.arange(A, device=sel.device) < n[:, None]
    return prompts, real, answers, torch.tensor(rows, device=x.device), answer_real


def token_logprobs(model: Transformer, x: Tensor, y: Tensor, mask: Tensor,
                   entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log p(y_t | x_<=t) (B, T) at the positions `mask` selects, 0 elsewhere, and (when
    asked) the model's entropy there (no gradient: it is only logged). The output head and
    the vocabulary-wide softmax, the costliest part of a small model's step, run only on the
    selected positions (an answer's tokens, not its prompt's), fused (`head_logprobs`); a
    prompt that several rows share (a GRPO group, a DPO pair) is read once
    (`shared_prompts`). RL, RLHF, DPO and the gold measurement all score answers with it."""
    sel = mask.bool()
    shared = shared_prompts(x, y, sel)
    if shared is None:
        hidden = model.hidden_states(x)[sel]
    else:
        prompts, real, answers, rows, answer_real = shared
        hidden = model.prompt_answer_states(prompts, real, answers, rows)[answer_real]
    lp, ent = head_logprobs(hidden, model.lm_head.weight, y[sel], entropy)  # row-major order
    out = lp.new_zeros(x.shape).masked_scatter(sel, lp)
    if ent is None:
        return out, None
    return out, ent.new_zeros(x.shape).masked_scatter(sel, ent)
