"""Chat data for supervised fine-tuning: conversations in OpenAI's message shape, the built-in
mixture made from the verifiable task families, and packing into training rows.

A conversation is ``{"messages": [{"role": "system|user|assistant", "content": "..."}]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echolm.config import Config
from echolm.data.text import read_jsonl, source_files
from echolm.errors import EchoError
from echolm.tasks import Problem
from echolm.tasks.spec import parse_task_spec, problems_up_to, task_from_spec
from echolm.tokenizer import Tokenizer


def problem_messages(p: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.solution}]


def builtin_mixture(specs: list[str], per_task: int, seed: int) -> list[list[dict]]:
    """Training conversations from the task families (their train split only): `per_task` of
    each, or the spec's own `examples=N`. A family with fewer distinct problems than that
    repeats them, so each family weighs what was asked."""
    convs = []
    for k, spec in enumerate(specs):
        n = parse_task_spec(spec)[1].get("examples", per_task)
        if not isinstance(n, int) or n < 0:
            raise EchoError(f"task spec '{spec}': examples must be a whole number >= 0")
        problems = problems_up_to(task_from_spec(spec), "train", max(n, 1), seed + k)
        convs += [problem_messages(problems[i % len(problems)]) for i in range(n)]
    return convs


def check_messages(msgs: Any, where: str) -> list[dict]:
    """A conversation's messages, checked: a non-empty list of {role, content} objects with at
    least one assistant message. `where` names the file and line (or dataset and row)."""
    if not isinstance(msgs, list) or not msgs:
        raise EchoError(f"{where}: field 'messages' must be a non-empty list")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise EchoError(f"{where}: messages[{k}].role must be system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise EchoError(f"{where}: messages[{k}].content must be a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise EchoError(f"{where}: no assistant message (nothing to learn from)")
    return msgs


def read_chat_file(path: Path) -> list[list[dict]]:
    return [check_messages(rec.get("messages"), f"{path}:{n}") for n, rec in read_jsonl(path)]


def _hf_chats(spec: str) -> list[list[dict]]:
    from echolm.data.text import hf_column

    return [check_messages(msgs, f"data source '{spec}': row {row}")
            for row, msgs in hf_column(spec, "messages")]


def load_conversations(sources: list[str], specs: list[str], per_task: int, seed: int,
                       open_examples: int = 0, text_sources: list[str] | None = None,
                       val_fraction: float = 0.01) -> list[list[dict]]:
    """Conversations of every SFT source. "builtin" is the task mixture plus `open_examples`
    open-ended requests answered with sentences of the pretraining text `text_sources`."""
    convs: list[list[dict]] = []
    for source in sources:
        if source == "builtin":
            from echolm.data.open_chat import open_chat_conversations

            convs += builtin_mixture(specs, per_task, seed)
            convs += open_chat_conversations(open_examples, seed, text_sources or ["builtin"],
                                             val_fraction)
        elif source.startswith("hf:"):
            convs += _hf_chats(source)
        else:
            for f in source_files(source):
                convs += read_chat_file(f)
    if not convs:
        raise EchoError("no SFT conversations in the data sources")
    return convs


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]


def encode_conversations(tok: Tokenizer, convs: list[list[dict]], max_len: int
                         ) -> list[Encoded]:
    """Render, and cut any conversation longer than a row (its tail is then not learned)."""
    out = []
    for k, msgs in enumerate(convs):
        ids, mask = tok.render_conversation(msgs, where=f"conversation {k}")
        out.append(Encoded(ids[:max_len], mask[:max_len]))
    return out


class PackedSampler:
    """SFT rows: whole conversations packed greedily into rows of seq_len + 1 tokens, padding
    after the last one (mask 0). The conversation order is a permutation drawn from
    (seed, epoch), so the batch at any step is a pure function of (seed, step): exact resume.
    Rows are split across processes and accumulation steps like pretraining's BatchSampler."""

    def __init__(self, examples: list[Encoded], pad: int, seq_len: int, micro_batch: int,
                 grad_accum: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.examples, self.pad, self.seq_len = examples, pad, seq_len
        self.micro, self.accum, self.seed = micro_batch, grad_accum, seed
        self.rank, self.world = rank, world_size
        self.rows_per_step = micro_batch * grad_accum * world_size
        self._epochs: dict[int, list[list[int]]] = {}
        if len(self._rows(0)) < self.rows_per_step:
            raise EchoError(f"SFT data packs into {len(self._rows(0))} rows, fewer than one "
                            f"step needs ({self.rows_per_step}); add data or lower micro_batch")

    def _rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:  # every epoch packed once: a row in epoch e reads the
            self._epochs[epoch] = self._pack(epoch)  # lengths of epochs 0..e-1 (ints: small)
        return self._epochs[epoch]

    def _pack(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        rows, cur, used = [], [], 0
        for i in order.tolist():
            n = len(self.examples[i].ids)
            if cur and used + n > self.seq_len + 1:
                rows.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            rows.append(cur)
        return rows

    def _row(self, g: int) -> tuple[list[int], list[int]]:
        epoch = 0
        while g >= len(self._rows(epoch)):
            g -= len(self._rows(epoch))
            epoch += 1
        ids, mask = [], []
        for i in self._rows(epoch)[g]:
            ids += self.examples[i].ids
            mask += self.examples[i].mask
        pad = self.seq_len + 1 - len(ids)
        return ids + [self.pad] * pad, mask + [0] * pad

    def epoch(self, step: int) -> float:
        return step * self.rows_per_step / max(len(self._rows(0)), 1)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = []
        for a in range(self.accum):
            index = (step * self.accum + a) * self.world + self.rank
            rows = [self._row(index * self.micro + j) for j in range(self.micro)]
            ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
            mask = torch.tensor([r[1] for r in rows], dtype=torch.long)
            out.append((ids[:, :-1], ids[:, 1:], mask[:, 1:]))
        return out


def sft_task_specs(cfg: Config) -> list[str]:
    """The task families SFT's mixture holds and SFT evaluates: sft.tasks, else data.tasks."""
    return cfg.sft.tasks or cfg.data.tasks


def sft_rows(cfg: Config, tok: Tokenizer, rows: int) -> PackedSampler:
    """Rows of the SFT mixture, `rows` per micro-batch, for RLHF's and DPO's "ptx" term
    (InstructGPT's PPO-ptx): a reward model or a preference signal that cannot check an answer
    (a 5M model's cannot check a sum) lets the policy drift from right answers while it gains
    elsewhere; the SFT likelihood keeps what SFT taught. A different order from SFT's own."""
    data, sft = cfg.data, cfg.sft
    convs = load_conversations(data.sft, sft_task_specs(cfg), data.task_examples, sft.seed,
                               data.open_examples, data.pretrain, data.val_fraction)
    return PackedSampler(encode_conversations(tok, convs, sft.seq_len + 1), tok.pad,
                         sft.seq_len, rows, 1, sft.seed + 1)
