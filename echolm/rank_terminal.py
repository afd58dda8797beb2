"""The person at the terminal for `echolm rank`: one prompt's question (its K answers), shown
with control characters made visible, and the typed order parsed ("3142", "3 1 4 2", s to
skip, q to quit) with a message that says what is wrong."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from echolm.data.prompts import PromptItem

SKIP, QUIT = "skip", "quit"
# `echolm rank`'s defaults (its --help reads them here, without importing torch)
DEFAULT_K = 4  # answers per prompt
DEFAULT_N = 20  # prompts, when none are given
TEMPERATURE = 1.0  # sampling temperature of the answers
MAX_TOKENS = 128  # longest answer
MAX_K = 16


@dataclass
class Question:
    """One prompt's K different answers, as shown to the person ranking them."""

    item: PromptItem
    prompt_id: int
    response_ids: list[int]
    texts: list[str]
    finished: list[bool]
    reused: bool  # the answers were already in the store


# picks an order (indices best first) for question n of total, or SKIP / QUIT
Chooser = Callable[[Question, int, int], "list[int] | str"]


def example_order(k: int) -> str:
    """An example order of k answers: '21', '312', '3142', '31425' ... ('3 1 4 2 5 ...' for
    10 or more)."""
    nums = {2: [2, 1], 3: [3, 1, 2]}.get(k, [3, 1, 4, 2] + list(range(5, k + 1)))
    return "".join(map(str, nums)) if k <= 9 else "3 1 4 2 5 ..."


def parse_order(text: str, k: int) -> list[int] | str:
    """A typed order -> indices best first (0-based), SKIP or QUIT; ValueError with a message
    that says what is wrong."""
    t = text.strip().lower()
    if t in ("s", "skip"):
        return SKIP
    if t in ("q", "quit", "exit"):
        return QUIT
    example = example_order(k)
    if not t:
        raise ValueError(f"type the answer numbers best first (e.g. {example}), s to skip, "
                         "q to quit")
    if re.search(r"[^\d\s,>]", t):
        raise ValueError(f"'{text.strip()}' is not an order: type the answer numbers best "
                         f"first (e.g. {example}), s to skip, q to quit")
    parts = re.split(r"[\s,>]+", t.strip(" ,>"))
    if len(parts) == 1 and k <= 9:
        parts = list(parts[0])
    elif len(parts) == 1 and len(parts[0]) > 1:
        raise ValueError(f"with {k} answers, separate the numbers with spaces (e.g. 3 1 2 ...)")
    nums = [int(p) for p in parts]
    for x in nums:
        if not 1 <= x <= k:
            raise ValueError(f"there is no answer {x}: the answers are numbered 1-{k}")
    twice = sorted({x for x in nums if nums.count(x) > 1})
    if twice:
        raise ValueError(f"answer {twice[0]} appears more than once: use each number once")
    missing = [x for x in range(1, k + 1) if x not in nums]
    if missing:
        which = ", ".join(map(str, missing))
        raise ValueError(f"rank all {k} answers, best first: {which} "
                         f"{'is' if len(missing) == 1 else 'are'} missing")
    return [x - 1 for x in nums]


def printable(text: str) -> str:
    """Control characters a model may emit (escape sequences, bells) shown as \\xNN, so an
    answer cannot move the cursor or recolour the terminal."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf")
                   else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text)


def format_question(q: Question, n: int, total: int, stage: str) -> str:
    lines = [f"--- prompt {n} of {total} ({stage} model, {len(q.texts)} answers"
             + (", sampled earlier" if q.reused else "") + ") ---", q.item.text, ""]
    for i, (text, fin) in enumerate(zip(q.texts, q.finished, strict=True), 1):
        body = printable(text).split("\n") if text else ["(empty answer)"]
        lines.append(f"[{i}] {body[0]}")
        lines += [f"    {x}" for x in body[1:]]
        if not fin:
            lines.append("    [cut off: the model did not end its turn]")
    return "\n".join(lines)


def terminal_chooser(stage: str, out: TextIO, inp: TextIO) -> Chooser:
    def choose(q: Question, n: int, total: int) -> list[int] | str:
        out.write("\n" + format_question(q, n, total, stage) + "\n")
        k = len(q.texts)
        while True:
            out.write(f"order, best first (e.g. {example_order(k)}), s = skip, q = quit: ")
            out.flush()
            line = inp.readline()
            if not line:  # end of input (Ctrl-D)
                out.write("\n")
                return QUIT
            try:
                return parse_order(line, k)
            except ValueError as e:
                out.write(f"  {e}\n")

    return choose
