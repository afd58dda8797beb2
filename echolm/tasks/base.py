"""The task interface: a Problem, the Task base class, and the split/sampling helpers.

Every family generates problems procedurally. Train and val are disjoint *by problem*: each
family maps a problem to a split key (an expression, a word, a template id ...) and the key
alone decides the split, so a val problem can never turn up in train under another seed.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from echolm.errors import EchoError

SPLITS = ("train", "val")
# Share of split keys held out for val; families with few keys (gsm templates) pick their own.
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Problem:
    task: str  # family name, e.g. "arithmetic"
    id: str  # stable id, unique within the family
    prompt: str  # the user's message
    answer: str  # canonical final answer, e.g. "42"
    solution: str  # worked assistant reply for SFT; ends "Answer: <answer>" (not identity)


class Task(ABC):
    """A family of problems with a verifier. Subclasses set `name` and implement the rest."""

    name: str = ""

    @abstractmethod
    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """`n` distinct problems from `split` ("train" or "val"), the same for the same seed."""

    @abstractmethod
    def extract(self, response: str) -> str | None:
        """The final answer in a model response, normalised like `Problem.answer`; None if none."""

    def score(self, problem: Problem, response: str) -> float:
        """1.0 if the extracted answer equals the problem's answer, else 0.0 (never partial)."""
        got = self.extract(response)
        return 1.0 if got is not None and got == self.extract(f"Answer: {problem.answer}") else 0.0


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise EchoError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (builtin hash() is salted per run)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def split_of(key: str, val_fraction: float = VAL_FRACTION) -> str:
    """Which split a problem key belongs to; a pure function of the key."""
    return "val" if stable_hash(key) % 10_000 < val_fraction * 10_000 else "train"


def short_hash(text: str) -> str:
    return f"{stable_hash(text):016x}"[:10]


class NotEnoughProblems(EchoError):
    """A family has fewer distinct problems than asked for; `found` holds those it has."""

    def __init__(self, message: str, found: list[Problem]) -> None:
        super().__init__(message)
        self.found = found


def sample_unique(
    name: str,
    split: str,
    n: int,
    seed: int,
    candidate: Callable[[random.Random], Problem | None],
) -> list[Problem]:
    """Draw candidates until there are `n` with distinct ids.

    `candidate` returns None for a draw that falls in the other split (or is unusable). The rng
    is seeded from (name, split, seed), so the result is deterministic. If the family runs out
    of distinct problems (small difficulty levels have only a few hundred) this raises rather
    than silently returning fewer or repeating.
    """
    check_split(split)
    if n < 0:
        raise EchoError(f"{name}: number of problems must be >= 0, got {n}")
    rng = random.Random(f"{name}:{split}:{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    max_tries = 50 * n + 20_000
    tries = 0
    while len(out) < n:
        if tries >= max_tries:
            raise NotEnoughProblems(
                f"{name}: found only {len(out)} distinct {split} problems after {tries} draws, "
                f"fewer than the {n} asked for; ask for fewer or use a harder setting", out
            )
        tries += 1
        problem = candidate(rng)
        if problem is None or problem.id in seen:
            continue
        seen.add(problem.id)
        out.append(problem)
    return out


def answer_line(answer: str) -> str:
    return f"Answer: {answer}"
