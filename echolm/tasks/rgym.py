"""Families built on the `reasoning-gym` package: `gsm`, `rg_arithmetic`, `chain_sum`.

reasoning-gym is imported lazily, so the other families work without it installed. We use its
generators only: its own score_answer gives 0.01 for a wrong answer, and we want exactly 0.

- gsm: reasoning-gym's `gsm_symbolic`, 100 GSM8K templates re-instantiated with fresh names and
  numbers (85 marked usable upstream, in `tasks_ok`). The solution is the template's own chain of
  thought (`metadata['answer_cot']`, ending "#### 42"), rewritten to end "Answer: 42". Items do
  not record their template, so we call the per-template generators directly and split by
  template: VAL_TEMPLATES whole templates are val-only, so val is new *problem structure*, not
  just new numbers.
- rg_arithmetic / chain_sum: `basic_arithmetic` and `chain_sum` expressions, split by expression.
  They come without worked solutions, so we evaluate them step by step ourselves.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any

from echolm.errors import EchoError
from echolm.tasks.arithmetic import expression_steps
from echolm.tasks.base import (
    Problem,
    Task,
    answer_line,
    check_split,
    sample_unique,
    short_hash,
    split_of,
    stable_hash,
)
from echolm.tasks.extract import extract_number, normalize_number

# gsm templates held out for val, out of the 85 usable (about 12%).
VAL_TEMPLATES = 10
_FINAL_RE = re.compile(r"\n?####[^\n]*\s*$")
# reasoning-gym items are generated from Random(seed + index); any index works, this bounds it.
_VIRTUAL_SIZE = 10**9


def _reasoning_gym(family: str) -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise EchoError(
            f"task {family!r} needs the reasoning-gym package: pip install reasoning-gym"
        ) from e
    return reasoning_gym


class GSMTask(Task):
    name = "gsm"

    def __init__(self, max_chars: int | None = None) -> None:
        # Tiny models cannot fit long problems; max_chars drops any whose prompt + solution is
        # longer (median is ~460 characters, the longest templates run to ~950).
        if max_chars is not None and max_chars < 150:
            raise EchoError(f"gsm: max_chars must be at least 150 (or None), got {max_chars}")
        self.max_chars = max_chars

    @functools.cached_property
    def _generators(self) -> dict[int, Any]:
        rg = _reasoning_gym(self.name)
        try:
            from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

            gens = rg.create_dataset("gsm_symbolic", size=1, seed=0).generators
            return {t: gens[t] for t in tasks_ok}
        except (ImportError, AttributeError, KeyError) as e:
            raise EchoError(
                f"gsm: this reasoning-gym version has no per-template gsm_symbolic generators "
                f"({e}); the task was written against reasoning-gym 0.1.25"
            ) from e

    @functools.cached_property
    def templates(self) -> dict[str, tuple[int, ...]]:
        """Template ids per split: the VAL_TEMPLATES with the smallest stable hash are val."""
        ranked = sorted(self._generators, key=lambda t: stable_hash(f"gsm:template:{t}"))
        val, train = sorted(ranked[:VAL_TEMPLATES]), sorted(ranked[VAL_TEMPLATES:])
        return {"val": tuple(val), "train": tuple(train)}

    def _candidate(self, split: str, rng: random.Random) -> Problem | None:
        template = rng.choice(self.templates[split])
        item = self._generators[template](random.Random(rng.getrandbits(64)), 1.0)
        answer = normalize_number(str(item["answer"]))
        if answer is None:
            return None
        steps = _FINAL_RE.sub("", item["metadata"]["answer_cot"]).strip()
        solution = f"{steps}\n{answer_line(answer)}"
        prompt = item["question"].strip()
        if self.max_chars is not None and len(prompt) + len(solution) > self.max_chars:
            return None
        return Problem(
            task=self.name,
            id=f"gsm:t{template}:{short_hash(prompt)}",
            prompt=prompt,
            answer=answer,
            solution=solution,
        )

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        check_split(split)
        name = f"{self.name}/{self.max_chars}"
        return sample_unique(name, split, n, seed, lambda rng: self._candidate(split, rng))

    def extract(self, response: str) -> str | None:
        return extract_number(response)


class _ExpressionTask(Task):
    """A reasoning-gym expression generator, split by expression, solved by expression_steps."""

    dataset = ""
    # difficulty -> (max_terms, max_digits); min_terms=2, min_digits=1 throughout
    levels: dict[int, tuple[int, int]] = {}

    def __init__(self, difficulty: int = 1) -> None:
        if difficulty not in self.levels:
            raise EchoError(
                f"{self.name}: difficulty must be one of {sorted(self.levels)}, got {difficulty!r}"
            )
        self.difficulty = difficulty

    @functools.cached_property
    def _dataset(self) -> Any:
        max_terms, max_digits = self.levels[self.difficulty]
        return _reasoning_gym(self.name).create_dataset(
            self.dataset,
            size=_VIRTUAL_SIZE,
            seed=0,
            min_terms=2,
            max_terms=max_terms,
            min_digits=1,
            max_digits=max_digits,
        )

    def _candidate(self, split: str, rng: random.Random) -> Problem | None:
        item = self._dataset[rng.randrange(_VIRTUAL_SIZE)]
        expr = item["metadata"]["expression"]
        key = expr.replace(" ", "")
        if split_of(f"{self.name}:{key}") != split:
            return None
        try:
            steps, value = expression_steps(expr)
        except (ZeroDivisionError, ValueError, SyntaxError):
            return None
        # basic_arithmetic evaluates '/' as floor division; ~1% of its items divide unevenly.
        # Skip those rather than teach a '/' that disagrees with ordinary arithmetic.
        if value.denominator != 1 or str(value.numerator) != str(item["answer"]).strip():
            return None
        answer = str(value.numerator)
        return Problem(
            task=self.name,
            id=f"{self.name}:{key}",
            prompt=item["question"].strip(),
            answer=answer,
            solution="\n".join(steps + [answer_line(answer)]),
        )

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        check_split(split)
        name = f"{self.name}/d{self.difficulty}"
        return sample_unique(name, split, n, seed, lambda rng: self._candidate(split, rng))

    def extract(self, response: str) -> str | None:
        return extract_number(response)


class RGArithmeticTask(_ExpressionTask):
    """reasoning-gym `basic_arithmetic`: + - * /, parentheses, negative numbers."""

    name = "rg_arithmetic"
    dataset = "basic_arithmetic"
    levels = {1: (2, 1), 2: (3, 2), 3: (4, 3), 4: (6, 4)}  # 4 = reasoning-gym's defaults


class ChainSumTask(_ExpressionTask):
    """reasoning-gym `chain_sum`: non-negative numbers joined by + and -, left to right."""

    name = "chain_sum"
    dataset = "chain_sum"
    levels = {1: (2, 1), 2: (3, 2), 3: (4, 3), 4: (6, 4)}
