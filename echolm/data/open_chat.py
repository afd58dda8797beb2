"""Open-ended chat for the built-in SFT mixture, answered with real sentences.

The task families teach a model to solve checkable problems; a chat model also meets requests
with no single right answer ("Write a short line about the sea."). No chat corpus can be had
offline, so the answers here are real sentences: for each train-split open-ended prompt
(`echolm.data.prompts.open_prompts`: the RLHF templates' train pairs plus ~170 everyday things
asked about in training only), a sentence from the pretraining text (of the built-in corpus,
only its literary sources: Austen, Shakespeare, Milton, the World English Bible, fortunes) that
mentions the topic, from the topic on ("Although the moon is smaller than the earth, it is far
away." -> "The moon is smaller than the earth, it is far away."), and for a rhyme request a
common corpus word with the same rime ("night" -> "'light' rhymes with 'night'.").

The answers are on topic, short and finished, but not always apt: a line about a cat taken from
Shakespeare is a line about a cat, not a kind word to one. That is the point for the later
stages: sampled answers then differ in what the simulated annotator scores (on topic, finished,
concise, readable), which is what a reward model can learn from and RLHF can improve.
Held-out (template, topic) pairs never appear here, so the val prompts of `echolm rank` and the
gold evaluation stay unseen.

Why this design, measured: docs/architecture.md ("Open-ended answers for SFT").
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Iterator

from echolm.data.prompts import open_prompts
from echolm.english import rime
from echolm.errors import EchoError

LITERARY = ("austen", "shakespeare", "milton", "web-bible", "fortunes")
MIN_CHARS, MAX_CHARS = 24, 140
MAX_PER_WORD = 400  # sentences kept per topic word (the first ones in corpus order)
MAX_SCAN_BYTES = 64_000_000  # enough sentences long before this; a huge user corpus is cut here
_SENTENCE_RE = re.compile(r"[^.!?]+[.!?]")
_WORD_RE = re.compile(r"[a-z]+")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2014": " - ", "\u2013": "-"})
_CLEAN_RE = re.compile(r"[A-Z][A-Za-z ,;:'\-!?.]+")  # plain prose: no digits, brackets, quotes
_TOKEN_RE = re.compile(r"[A-Za-z']+")
# words that may stay in front of the topic word when an answer starts at it ("the sea ...")
_DETERMINERS = frozenset("the a an this that my his her their our your every".split())
MIN_WORDS = 4  # an answer cut to start at its topic keeps at least this many words


def _sentences(text: str) -> list[str]:
    flat = " ".join(text.translate(_QUOTES).split())
    out = []
    for m in _SENTENCE_RE.finditer(flat):
        s = m.group().strip()
        if MIN_CHARS <= len(s) <= MAX_CHARS and _CLEAN_RE.fullmatch(s) and s[-2] != " ":
            out.append(s)
    return out


def _variants(word: str) -> set[str]:
    return {word, word + "s", word + "es"}


def _documents(sources: tuple[str, ...], val_fraction: float) -> Iterator[str]:
    """Training documents of the pretraining sources; of the built-in corpus, literary only."""
    from echolm.data.builtin import build_builtin_corpus
    from echolm.data.text import iter_documents, read_jsonl

    for source in sources:
        if source == "builtin":
            path = build_builtin_corpus(progress=False) / "train.jsonl"
            yield from (r["text"] for _, r in read_jsonl(path) if r["source"] in LITERARY)
        else:
            yield from iter_documents([source], "train", val_fraction)


@functools.cache
def _corpus_index(sources: tuple[str, ...], val_fraction: float
                  ) -> tuple[dict[str, list[str]], Counter]:
    """Topic word -> sentences mentioning it; and corpus word counts (for common rhymes)."""
    wanted = {v: w for item in open_prompts("train") for w in item.topic for v in _variants(w)}
    found: dict[str, list[str]] = {w: [] for w in wanted.values()}
    counts: Counter = Counter()
    scanned = 0
    for doc in _documents(sources, val_fraction):
        for s in _sentences(doc):
            words = _WORD_RE.findall(s.lower())
            counts.update(words)
            for w in set(words):
                if w in wanted and len(found[wanted[w]]) < MAX_PER_WORD:
                    found[wanted[w]].append(s)
        scanned += len(doc)
        if scanned >= MAX_SCAN_BYTES:
            break
    return found, counts


def topic_first(sentence: str, words: tuple[str, ...]) -> str | None:
    """The sentence from its first topic word on (with the determiner before it, capitalised),
    or None when what is left is under MIN_WORDS words: "Although the moon is smaller than the
    earth, it is far away." -> "The moon is smaller than the earth, it is far away."

    Why: a small model learns to talk about the asked topic only when the answer names it
    where copying from the prompt is easy, at the start. With the topic somewhere in a long
    sentence, the cpu-preset model mentioned an unseen prompt's topic 2% of the time."""
    tokens = list(_TOKEN_RE.finditer(sentence))
    for i, m in enumerate(tokens):
        if any(m.group().lower() in _variants(w) for w in words):
            j = i - 1 if i > 0 and tokens[i - 1].group().lower() in _DETERMINERS else i
            if len(tokens) - j < MIN_WORDS:
                return None
            out = sentence[tokens[j].start():]
            return out[0].upper() + out[1:]
    return None


def _rhymes(target: str, counts: Counter, n: int = 12) -> list[str]:
    tail = rime(target)
    return [w for w, c in counts.most_common() if c >= 5 and len(w) > len(tail)
            and w.endswith(tail) and w != target and not w.startswith(target)][:n]


def open_chat_pairs(sources: list[str], val_fraction: float = 0.01
                    ) -> list[tuple[str, list[str]]]:
    """(prompt, candidate answers) for every train-split open-ended prompt that has answers
    in the pretraining text `sources` (data.pretrain)."""
    sentences, counts = _corpus_index(tuple(sources), val_fraction)
    out = []
    for item in open_prompts("train"):
        if item.kind == "open:rhyme":
            t = item.topic[0]
            answers = [f"'{w}' rhymes with '{t}'." for w in _rhymes(t, counts)]
        else:
            pools = [sentences.get(w, []) for w in item.topic]
            both = set.intersection(*map(set, pools)) if len(pools) > 1 else set()
            whole = sorted(both) or [s for pool in pools for s in pool]
            cut = (topic_first(s, item.topic) for s in whole)
            answers = sorted({a for a in cut if a}) or whole
        if answers:
            out.append((item.text, answers))
    return out


def open_chat_conversations(n: int, seed: int, sources: list[str], val_fraction: float = 0.01
                            ) -> list[list[dict]]:
    """`n` open-ended conversations, prompts in rotation, answers drawn with `seed` from the
    pretraining text `sources`."""
    if n <= 0:
        return []
    pairs = open_chat_pairs(sources, val_fraction)
    if not pairs:
        raise EchoError(f"data.open_examples={n}, but the pretraining text {sources} has no "
                        "sentence that answers any open-ended prompt (set it to 0)")
    rng = random.Random(f"open-chat:{seed}")
    order = list(range(len(pairs)))
    convs = []
    while len(convs) < n:
        rng.shuffle(order)
        for i in order[: n - len(convs)]:
            prompt, answers = pairs[i]
            convs.append([{"role": "user", "content": prompt},
                          {"role": "assistant", "content": rng.choice(answers)}])
    return convs
