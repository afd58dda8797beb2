"""Evaluation shared by the stages: bits per byte on held-out text, task accuracy and pass@k
(answers generated in the chat format, checked by each task's verifier), Wilson intervals,
and a cache of results per model file, so a model is not measured twice the same way (SFT's
own evaluation and `echolm eval`'s)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from echolm.atomic import atomic_write_json
from echolm.checkpoint import file_fingerprint
from echolm.engine import SamplingParams, generate
from echolm.errors import EchoError
from echolm.losses import bits_per_byte, token_cross_entropy
from echolm.model import Transformer
from echolm.runfiles import read_cache
from echolm.tasks import Problem, Task
from echolm.tasks.base import answer_line
from echolm.tasks.code import pass_at_k
from echolm.tokenizer import Tokenizer


@torch.inference_mode()
def eval_bpb(model: Transformer, tok: Tokenizer, tokens: np.ndarray, seq_len: int,
             max_tokens: int, batch: int = 16, autocast_ctx=None) -> dict:
    """Bits per byte of held-out `tokens`, read in order in rows of seq_len + 1.

    Special tokens (BOS) are excluded as targets: they spell no bytes. The result does not
    depend on the vocabulary, so models with different tokenizers compare fairly. A text
    shorter than one row is read as one shorter row; `tokens` in the result says how many
    were scored.
    """
    import contextlib

    if len(tokens) < 2:
        raise EchoError(f"bits per byte: the held-out text is {len(tokens)} token(s) long; "
                        "scoring needs 2 at least (more held-out text, data.pretrain)")
    seq_len = min(seq_len, len(tokens) - 1)
    device = next(model.parameters()).device
    n_rows = max(1, min(max_tokens, len(tokens) - 1) // seq_len)
    n_rows = min(n_rows, (len(tokens) - 1) // seq_len)
    nbytes = torch.tensor([len(b) for b in tok.token_bytes] +
                          [0] * (model.cfg.vocab_size - tok.vocab_size), dtype=torch.long)
    nll_sum, byte_sum, tok_count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for r0 in tqdm(range(0, n_rows, batch), desc="bits per byte", unit="batch", leave=False,
                   dynamic_ncols=True):
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


@torch.inference_mode()
def task_accuracy(model: Transformer, tok: Tokenizer, task: Task, problems: list[Problem],
                  temperature: float = 0.0, seed: int = 0, batch: int = 64,
                  max_tokens: int | None = None) -> dict:
    """Share of held-out problems answered correctly, the answer generated in the chat format
    and checked by the task's verifier. Greedy at temperature 0, else sampled (fixed seed)."""
    if max_tokens is None:  # room for the longest worked solution, plus slack
        max_tokens = max(len(tok.encode(p.solution)) for p in problems) + 16
    prompts = [tok.render_user(p.prompt) for p in problems]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=0,
                            seed=seed, stop_ids=tok.stop_ids)
    was_training = model.training
    model.eval()
    responses: list[str] = []
    for i in tqdm(range(0, len(prompts), batch), desc=f"{task.name}: answering", leave=False,
                  unit="batch", dynamic_ncols=True):
        outs = generate(model, tok, prompts[i:i + batch], params)
        responses += [tok.decode(o) for o in outs]
    model.train(was_training)
    scores = [task.score(p, r) for p, r in zip(problems, responses, strict=True)]
    correct = int(sum(scores))
    return {"accuracy": correct / len(problems), "correct": correct, "n": len(problems),
            "examples": [{"prompt": p.prompt, "response": r, "answer": p.answer}
                         for p, r in list(zip(problems, responses, strict=True))[:3]]}


def one_answer_baseline(task: Task, problems: list[Problem]) -> dict:
    """The score of giving every problem the same answer, the commonest one among them: what
    a model scores without reading the question (most letter counts are 1), so an accuracy is
    read against it. Ties go to the answer met first; where no answer repeats (spellings)
    there is no such answer: None, and the share one right guess would get."""
    if not problems:
        return {"answer": None, "accuracy": 0.0}
    answers = Counter(task.extract(answer_line(p.answer)) for p in problems)
    answer, count = answers.most_common(1)[0]
    return {"answer": answer if count > 1 else None, "accuracy": round(count / len(problems), 4)}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion k/n (Wilson score; sound at 0 and n)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.inference_mode()
def task_pass_at_k(model: Transformer, tok: Tokenizer, task: Task, problems: list[Problem],
                   n_samples: int, ks: list[int], temperature: float = 1.0, seed: int = 0,
                   batch: int = 128, max_tokens: int | None = None) -> dict:
    """pass@k for each k in `ks` (<= n_samples), averaged over problems, from n_samples
    sampled answers per problem. Each batch of samples has its own seed (seed + its first
    sample's index): with one seed, a problem whose samples span two batches would get the
    same random draws twice."""
    if max_tokens is None:
        max_tokens = max(len(tok.encode(p.solution)) for p in problems) + 16
    prompts = [tok.render_user(p.prompt) for p in problems]
    flat = [(i, pr) for i, pr in enumerate(prompts) for _ in range(n_samples)]
    was_training = model.training
    model.eval()
    correct = [0] * len(problems)
    for i in tqdm(range(0, len(flat), batch), desc=f"{task.name}: pass@k samples", leave=False,
                  unit="batch", dynamic_ncols=True):
        chunk = flat[i:i + batch]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i,
                                stop_ids=tok.stop_ids)
        outs = generate(model, tok, [pr for _, pr in chunk], params)
        for (j, _), o in zip(chunk, outs, strict=True):
            correct[j] += int(task.score(problems[j], tok.decode(o)))
    model.train(was_training)
    curve = {str(k): sum(pass_at_k(n_samples, c, k) for c in correct) / len(problems)
             for k in ks if k <= n_samples}
    return {"pass@k": curve, "n": len(problems), "samples_per_problem": n_samples,
            "temperature": temperature}


def bpb_key(seq_len: int, eval_tokens: int) -> str:
    return f"bpb:val:seq_len={seq_len}:tokens={eval_tokens}"


def cached(cache_dir: Path, weights: Path, key: str, compute: Callable[[], dict],
           log: Callable[[str], object] = print) -> dict:
    """`compute()`'s result for the model in `weights` measured as `key` says, computed once:
    kept in `cache_dir`/<hash of the weights>.json, so that a retrained model (other bytes) is
    measured again and the same one never twice (a corrupt cache file: measured again)."""
    path = cache_dir / f"{file_fingerprint(weights)}.json"
    entries = read_cache(path, log) or {}
    if key not in entries:
        entries[key] = compute()
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entries)
    return entries[key]
