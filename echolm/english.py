"""English word helpers shared by the simulated annotator (is it a real word? does it rhyme?)
and the open-ended chat data (a rhyme for a target word)."""

from __future__ import annotations

import functools
from pathlib import Path

# words people write to a chat model that a dictionary lacks
EXTRA_WORDS = frozenset("echo echolm ok okay hi chatgpt ai gpt llm online email".split())


@functools.cache
def english_words() -> frozenset[str]:
    """Lower-case English words, all lengths (empty if no word list is installed)."""
    try:
        from english_words import get_english_words_set
    except ImportError:
        path = Path("/usr/share/dict/words")
        if not path.exists():
            return frozenset()
        words = path.read_text(encoding="utf-8", errors="ignore").lower().split()
        return frozenset(w for w in words if w.isalpha())
    return frozenset(get_english_words_set(["web2", "gcide"], lower=True, alpha=True))


def is_word(w: str) -> bool:
    """A real word, a single letter, or a plain inflection of a real word."""
    w = w.lower()
    words = english_words()
    if len(w) == 1 or w in words or w in EXTRA_WORDS:
        return True
    for suffix in ("s", "es", "ed", "d", "ing", "ly", "er", "est"):
        if w.endswith(suffix) and len(w) > len(suffix) + 1:
            stem = w[: -len(suffix)]
            if stem in words or stem + "e" in words:
                return True
            if len(stem) > 2 and stem[-1] == stem[-2] and stem[:-1] in words:  # running
                return True
    return False


_VOWELS = "aeiouy"


def rime(word: str) -> str:
    """The part of a word that rhymes, crudely: from its last vowel group to the end, a silent
    final e kept ('night' -> 'ight', 'cake' -> 'ake', 'day' -> 'ay', 'blue' -> 'ue')."""
    w = word.lower()
    core = w[:-1] if w.endswith("e") and len(w) > 2 and w[-2] not in _VOWELS else w
    i = len(core) - 1
    while i >= 0 and core[i] not in _VOWELS:
        i -= 1
    if i < 0:
        return w
    while i > 0 and core[i - 1] in _VOWELS and core[i - 1] != "y":
        i -= 1
    return w[i:]
