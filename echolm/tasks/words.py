"""`spelling` and `letter_count`: character-level questions about real English words.

Both are hard for token-level models for the same reason (a word is one or two tokens, its
letters are invisible), so the worked solutions spell the word out first and then work on the
letters. Split by word, with the same key for both families: a val word is never seen in train
by either of them.

Word source, in order: the `english-words` package, then Debian's /usr/share/dict/words. The
package has no frequencies, so "common" is approximated as: in both of its lists (web2 and
gcide), written in lowercase in web2 (drops proper nouns), ASCII letters only, 3-10 letters.
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path

from echolm.errors import EchoError
from echolm.tasks.base import Problem, Task, answer_line, check_split, sample_unique, split_of
from echolm.tasks.extract import extract_number, marked_answer

MIN_LEN, MAX_LEN = 3, 10
DICT_WORDS = Path("/usr/share/dict/words")
SPELL_PROMPTS = (
    "Spell the word '{w}'.",
    "How do you spell '{w}'?",
    "Spell '{w}' letter by letter.",
    "Can you spell {w}?",
)
COUNT_PROMPTS = (
    "How many times does the letter '{c}' appear in '{w}'?",
    "How many {c}'s are in the word '{w}'?",
    "Count the letter '{c}' in '{w}'.",
    "How many times does '{c}' occur in the word {w}?",
)
# Share of letter_count questions about a letter the word does not contain (answer 0).
ABSENT_LETTER_FRACTION = 0.2
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Single letters with a separator between each: "a-p-p-l-e", "a p p l e", "a, p, p, l, e".
_SEP = r"(?:\s*[-,]\s*|\s+)"
_SPELLED_RE = re.compile(rf"(?<![a-z])[a-z](?:{_SEP}[a-z](?![a-z]))+", re.IGNORECASE)
_SPELLED_FULL_RE = re.compile(rf"[a-z](?:{_SEP}[a-z])*")


def _usable(word: str) -> bool:
    return MIN_LEN <= len(word) <= MAX_LEN and word.isascii() and word.isalpha()


@functools.cache
def word_list() -> tuple[str, ...]:
    """Sorted common lowercase words of 3-10 letters (sorted: sets have no stable order)."""
    try:
        from english_words import get_english_words_set
    except ImportError:
        get_english_words_set = None
    if get_english_words_set is not None:
        web2 = get_english_words_set(["web2"], alpha=True)
        gcide = get_english_words_set(["gcide"], alpha=True, lower=True)
        words = {w for w in web2 if w.islower() and _usable(w)} & gcide
    elif DICT_WORDS.exists():
        lines = DICT_WORDS.read_text(encoding="utf-8", errors="ignore").split()
        words = {w for w in lines if w.islower() and _usable(w)}
    else:
        raise EchoError(
            "spelling/letter_count need an English word list: `pip install english-words` "
            f"(or `apt-get install wamerican` for {DICT_WORDS})"
        )
    if not words:
        raise EchoError("spelling/letter_count: the English word list is empty")
    return tuple(sorted(words))


def spell(word: str) -> str:
    return "-".join(word)


def word_split(word: str) -> str:
    return split_of(f"word:{word}")


def normalize_spelling(text: str) -> str:
    """'A-P-P-L-E.' / 'a p p l e' / 'a, p, p' -> 'a-p-p-l-e'; an unspelled 'apple' stays 'apple'."""
    text = text.strip().strip(".!\"'*`").strip().lower()
    if _SPELLED_FULL_RE.fullmatch(text):
        return "-".join(c for c in text if c.isalpha())
    return text


class _WordTask(Task):
    def __init__(self, min_len: int = MIN_LEN, max_len: int = MAX_LEN) -> None:
        if not MIN_LEN <= min_len <= max_len <= MAX_LEN:
            raise EchoError(
                f"{self.name}: need {MIN_LEN} <= min_len <= max_len <= {MAX_LEN}, "
                f"got min_len={min_len}, max_len={max_len}"
            )
        self.min_len, self.max_len = min_len, max_len

    @functools.cached_property
    def _words(self) -> dict[str, tuple[str, ...]]:
        by_split: dict[str, list[str]] = {"train": [], "val": []}
        for w in word_list():
            if self.min_len <= len(w) <= self.max_len:
                by_split[word_split(w)].append(w)
        return {k: tuple(v) for k, v in by_split.items()}

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        check_split(split)
        name = f"{self.name}/{self.min_len}-{self.max_len}"
        words = self._words[split]
        return sample_unique(name, split, n, seed, lambda rng: self._make(rng.choice(words), rng))

    def _make(self, word: str, rng: random.Random) -> Problem:
        raise NotImplementedError


class SpellingTask(_WordTask):
    name = "spelling"

    def _make(self, word: str, rng: random.Random) -> Problem:
        answer = spell(word)
        return Problem(
            task=self.name,
            id=f"spelling:{word}",
            prompt=rng.choice(SPELL_PROMPTS).format(w=word),
            answer=answer,
            solution=f"'{word}' has {len(word)} letters: {answer}\n{answer_line(answer)}",
        )

    def extract(self, response: str) -> str | None:
        marked = marked_answer(response)
        if marked is not None:
            return normalize_spelling(marked) or None
        found = _SPELLED_RE.findall(response)
        return normalize_spelling(found[-1]) if found else None


class LetterCountTask(_WordTask):
    """How many times a letter appears in a word. Most short words have no repeated letter,
    so most answers are 1 (70% at max_len=7) and a model that always says 1 scores that much;
    `balanced=1` asks about an absent letter, a letter that appears once, and one that
    appears twice or more, a third of the time each (RL on it cannot win by a constant)."""

    name = "letter_count"

    def __init__(self, min_len: int = MIN_LEN, max_len: int = MAX_LEN, balanced: int = 0
                 ) -> None:
        super().__init__(min_len, max_len)
        if balanced not in (0, 1):
            raise EchoError(f"letter_count: balanced must be 0 or 1, got {balanced}")
        self.balanced = bool(balanced)

    @functools.cached_property
    def _repeating(self) -> dict[str, tuple[str, ...]]:
        """Per split, the words with a letter that appears twice or more."""
        return {k: tuple(w for w in v if len(set(w)) < len(w)) for k, v in self._words.items()}

    def _make(self, word: str, rng: random.Random) -> Problem:
        if self.balanced:
            kind = rng.randrange(3)  # 0: absent, 1: once, 2: twice or more
            if kind == 2:
                word = rng.choice(self._repeating[word_split(word)] or (word,))
            counts = {c: word.count(c) for c in sorted(set(word))}
            pick = ([c for c, n in counts.items() if n >= 2] if kind == 2 else
                    [c for c, n in counts.items() if n == 1] if kind == 1 else [])
            letter = (rng.choice(pick) if pick else
                      rng.choice([c for c in _LETTERS if c not in word]))
            return self._problem(word, letter, rng)
        absent = [c for c in _LETTERS if c not in word]
        if rng.random() < ABSENT_LETTER_FRACTION:
            letter = rng.choice(absent)
        else:
            letter = rng.choice(sorted(set(word)))
        return self._problem(word, letter, rng)

    def _problem(self, word: str, letter: str, rng: random.Random) -> Problem:
        return Problem(
            task=self.name,
            id=f"letter_count:{word}:{letter}",
            prompt=rng.choice(COUNT_PROMPTS).format(c=letter, w=word),
            answer=str(word.count(letter)),
            solution=count_solution(word, letter),
        )

    def extract(self, response: str) -> str | None:
        return extract_number(response)


def count_solution(word: str, letter: str) -> str:
    """Spell the word, then keep a running count letter by letter: each step is local."""
    running, steps = 0, []
    for c in word:
        running += c == letter
        steps.append(f"{c} {running}")
    return (
        f"Spell it: {spell(word)}\n"
        f"Running count of '{letter}': {', '.join(steps)}\n"
        f"{answer_line(str(running))}"
    )
