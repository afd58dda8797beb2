"""Pulling a final answer out of a free-form model response.

Order of preference, the same for every family: the last "Answer: ..." line (the format our
SFT solutions teach), then the last \\boxed{...}, then "the answer is ...", then a
family-specific fallback (last number, last spelled-out word ...). An explicit answer marker
wins even when what follows it is unusable: a response that writes "Answer: ?" gets None rather
than credit for some number in its scratch work.

Plain regex + Decimal, not math-verify: our answers are integers or short decimals, and this is
~100x faster (RL scores thousands of samples per step).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_ANSWER_RE = re.compile(r"answer\**\s*[:：]", re.IGNORECASE)
_ANSWER_IS_RE = re.compile(r"answer\s+is\b\s*[:：]?", re.IGNORECASE)
# One level of nested braces is enough for \boxed{\frac{1}{2}}.
_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
# A minus counts only when it is not a binary minus ("10-4" ends in 4, "= -4" is -4); thousands
# separators only in groups of three, so "3, 4" stays two numbers.
_NUMBER_RE = re.compile(r"(?<![\w.])(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve".split()
    )
}
_WORD_RE = re.compile(r"[a-z]+", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """'1,000' / '1000.0' / '+1000' -> '1000'; '2.50' -> '2.5'; not a number -> None."""
    text = text.strip().replace(",", "").lstrip("+")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def marked_answer(response: str) -> str | None:
    """The text after the last explicit answer marker, or None if the response has none."""
    spans = [m.end() for m in _ANSWER_RE.finditer(response)]
    if spans:
        return _rest_of_line(response, spans[-1])
    boxed = _BOXED_RE.findall(response)
    if boxed:
        return boxed[-1].strip()
    spans = [m.end() for m in _ANSWER_IS_RE.finditer(response)]
    if spans:
        return _rest_of_line(response, spans[-1])
    return None


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start : end if end >= 0 else len(text)].strip()


def first_number(text: str) -> str | None:
    for m in _NUMBER_RE.finditer(text):
        return normalize_number(m.group())
    # "Answer: three" is still an answer; only small counts are ever written as words.
    for w in _WORD_RE.findall(text):
        if w.lower() in _NUMBER_WORDS:
            return _NUMBER_WORDS[w.lower()]
    return None


def last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_number(response: str) -> str | None:
    """The final numeric answer, normalised with `normalize_number`; None if there is none."""
    marked = marked_answer(response)
    if marked is not None:
        return first_number(marked)
    return last_number(response)
