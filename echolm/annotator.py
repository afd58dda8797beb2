"""A SIMULATED annotator: a fixed, documented "gold" preference that stands in for people.

Ranking answers by hand is slow, so offline demos and tests use this instead, and it is also
the held-out yardstick for reward hacking: a model tuned to please a *learned* reward model
can drive that model's score up while this gold score goes down ("high-scoring nonsense").
It is not a person and not a judge model: a few hand-written rules, described here in full.
Rankings it makes are stored under a name that says so ("simulated:gold-v1:t0.1").

The gold score of a response to a prompt (`gold_score`) is a weighted sum of terms, each in
[0, 1], so the score is in [0, 1]. An empty (or whitespace-only) response scores 0.

    term       meaning                                                  task   open
    correct    the task's verifier accepts the answer (1 or 0)           0.60     -
    finished   the model ended its turn (<|assistant_end|>), not cut off 0.12   0.25
    on_topic   mentions what was asked about (below)                     0.04   0.25
    concise    length in a band (below): not empty, not rambling         0.08   0.15
    fresh      no repetition: 1 - repeated share of word 3-grams/lines   0.08   0.15
    readable   share of real words x share of ordinary characters        0.08   0.20

"task" weights apply to prompts that came from a checkable task family (the PromptItem has a
`problem`); correctness dominates: any correct answer (>= 0.60) outranks any wrong one
(<= 0.40). "open" weights apply to everything else (open-ended requests, prompts from a file).

on_topic: the topic words (an open-ended prompt's topic, e.g. "sea" for "Write a short line
about the sea."; otherwise the prompt's content words: numbers and words of 3+ letters that are
not stop or instruction words) that the response mentions, up to two: 1 if it mentions two (or
all, if fewer), 0.5 for one of two, 0 for none; 1 when there are no topic words to look for.
Words match after a crude stem (plural -s/-es, -ing/-ed, a shared 4-letter prefix); spelled
out letters ("a-p-p-l-e") count as the word they spell (here and in fresh and readable). A
rhyme prompt is on topic when the response has a real word, other than the target, that ends
in the target's rime (its last vowel group to the end: "night" -> "ight", "cake" -> "ake").
The match is then multiplied by fresh and readable: naming the topic counts only in text that
reads and does not repeat itself (stuffing "sea sea sea" is the obvious way to game a topic
check).

concise: characters of the stripped response, n. Open prompts: band [3, 160]; task prompts:
[1, max(160, 2 x the worked solution)]. Inside the band 1; below, n / low; above, falling
linearly to 0 at 3 x high.

fresh: with w = lower-case word tokens, 1 - max(1 - distinct/total of word 3-grams, 1 -
distinct/total of non-blank lines); 1 for fewer than 4 words.

readable: (share of alphabetic words that are English words, single letters and plain
inflections included; 1 if the response has no words but has numbers) x (share of
non-space characters that are letters, digits or common punctuation). Words come from the
`english-words` package (web2 + gcide), else /usr/share/dict/words; with neither, only the
character share counts.

Ranking (`SimulatedAnnotator.rank`) samples a Plackett-Luce order from the gold scores with a
temperature: P(next best = i) is proportional to exp(score_i / temperature) over those not yet
placed (the Gumbel-max trick: sort by score / temperature + Gumbel noise). temperature 0 gives
the gold order exactly (ties by position); higher temperatures disagree with gold more often,
as people disagree with each other. The noise is seeded from (seed, prompt, responses), so the
same question always gets the same ranking, whatever order questions come in (a resumed run
ranks exactly as an uninterrupted one).
"""

from __future__ import annotations

import functools
import math
import random
import re

from echolm.data.prompts import PromptItem
from echolm.english import english_words, is_word, rime
from echolm.tasks import Task, get_task

GOLD_VERSION = "gold-v1"
TASK_WEIGHTS = {"correct": 0.60, "finished": 0.12, "on_topic": 0.04, "concise": 0.08,
                "fresh": 0.08, "readable": 0.08}
OPEN_WEIGHTS = {"finished": 0.25, "on_topic": 0.25, "concise": 0.15, "fresh": 0.15,
                "readable": 0.20}
OPEN_BAND = (3, 160)  # characters
TASK_BAND_MIN = 160

STOPWORDS = frozenset("""
a an the and or but if of to in on at by for with from into about as is are was were be been
being am do does did doing have has had it its this that these those there here i me my mine
you your yours he him his she her we us our they them their what which who whom whose when
where why how all any some no not nor so than too very can could will would should may might
must shall just also only one please tell say give me write something short very little
""".split())
# Words that say what to do rather than what about: not evidence that an answer is on topic.
INSTRUCTION_WORDS = frozenset("""
write describe explain tell give name suggest use sentence word words line letter letters
spell spelled count many times occur appear calculate compute answer question brief briefly
thing things note quick curious exactly really hey hi hello good morning excuse question
identify introduce yourself state call
""".split())
_WORD_RE = re.compile(r"[a-z]+|\d+")
_ALPHA_RE = re.compile(r"[A-Za-z]+")
_SPELLED_RE = re.compile(r"\b(?:[A-Za-z][-, ]{1,2}){2,}[A-Za-z]\b")
_OK_CHARS = set(".,!?'\"-:;()+*=/%&$#@\u2019")


# ---- the terms -------------------------------------------------------------------------------
def _join_spelled(text: str) -> str:
    """'a-p-p-l-e' / 'a p p l e' -> 'apple': spelled-out letters read as the word they spell."""
    return _SPELLED_RE.sub(lambda m: re.sub(r"[^A-Za-z]", "", m.group()), text)


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(_join_spelled(text).lower())


def _stem(w: str) -> str:
    for suffix in ("ing", "es", "ed", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    return w


def _same_word(a: str, b: str) -> bool:
    if a == b or _stem(a) == _stem(b):
        return True
    return len(a) >= 4 and len(b) >= 4 and a[:4] == b[:4] and (a.startswith(b) or
                                                                 b.startswith(a))


def content_words(text: str) -> tuple[str, ...]:
    """Numbers and words of 3+ letters that are neither stop nor instruction words."""
    out = []
    for w in _words(text):
        if w.isdigit() or (len(w) >= 3 and w not in STOPWORDS and w not in INSTRUCTION_WORDS):
            if w not in out:
                out.append(w)
    return tuple(out)


def on_topic(item: PromptItem, response: str) -> float:
    said = _words(response)
    if item.kind == "open:rhyme" and item.topic:
        target = item.topic[0]
        tail = rime(target)
        for w in said:
            if (w.endswith(tail) and not _same_word(w, target) and len(w) > len(tail)
                    and (not english_words() or is_word(w))):
                return 1.0
        return 0.0
    topic = item.topic or content_words(item.text)
    if not topic:
        return 1.0
    found = sum(any(_same_word(t, w) for w in said) for t in topic)
    return min(1.0, found / min(2, len(topic)))


def concise(item: PromptItem, response: str) -> float:
    n = len(response.strip())
    if item.problem is not None:
        lo, hi = 1, max(TASK_BAND_MIN, 2 * len(item.problem.solution))
    else:
        lo, hi = OPEN_BAND
    if n < lo:
        return n / lo
    if n <= hi:
        return 1.0
    return max(0.0, 1.0 - (n - hi) / (2 * hi))


def fresh(response: str) -> float:
    words = _words(response)
    if len(words) < 4:
        return 1.0
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    repeated = 1 - len(set(grams)) / len(grams)
    lines = [x.strip().lower() for x in response.splitlines() if x.strip()]
    if len(lines) >= 2:
        repeated = max(repeated, 1 - len(set(lines)) / len(lines))
    return 1.0 - repeated


def readable(response: str) -> float:
    chars = [c for c in response if not c.isspace()]
    if not chars:
        return 0.0
    ok = sum(c.isascii() and c.isalnum() or c in _OK_CHARS for c in chars) / len(chars)
    alpha = _ALPHA_RE.findall(_join_spelled(response))
    if not alpha:
        word_share = 1.0 if any(c.isdigit() for c in chars) else 0.0
    elif not english_words():
        word_share = 1.0
    else:
        word_share = sum(is_word(w) for w in alpha) / len(alpha)
    return word_share * ok


@functools.cache
def _task(name: str) -> Task:
    return get_task(name)


def gold_terms(item: PromptItem, response: str, finished: bool) -> dict[str, float]:
    """Every term of the gold score (each in [0, 1]); "correct" only for task prompts."""
    terms = {}
    if item.problem is not None:
        terms["correct"] = float(_task(item.problem.task).score(item.problem, response))
    f, r = fresh(response), readable(response)
    terms.update(finished=1.0 if finished else 0.0, on_topic=on_topic(item, response) * f * r,
                 concise=concise(item, response), fresh=f, readable=r)
    return terms


def gold_score(item: PromptItem, response: str, finished: bool) -> float:
    """The gold preference for one response, in [0, 1] (see the module docstring)."""
    if not response.strip():
        return 0.0
    terms = gold_terms(item, response, finished)
    weights = TASK_WEIGHTS if item.problem is not None else OPEN_WEIGHTS
    return round(sum(w * terms[k] for k, w in weights.items()), 6)


def pair_agreement(ranking: list[int], scores: list[float]) -> tuple[int, int]:
    """(pairs ordered as the scores order them, pairs with different scores) for a ranking
    (indices, best first)."""
    agree = total = 0
    for a in range(len(ranking)):
        for b in range(a + 1, len(ranking)):
            i, j = ranking[a], ranking[b]
            if scores[i] != scores[j]:
                total += 1
                agree += scores[i] > scores[j]
    return agree, total


SIMULATED = "simulated"  # every label of the simulated annotator starts with it


def is_simulated_name(name: str) -> bool:
    """Whether an annotator name is the simulated annotator's (any case): only it may store
    rankings under such a name, so people (terminal, web page) are refused it."""
    return name.strip().casefold().startswith(SIMULATED)


class SimulatedAnnotator:
    """Ranks responses by the gold score with Plackett-Luce noise (see the module docstring).

    It is a stand-in for people: what it hands out is an order, best first, exactly what a
    person gives, never the scores behind it.
    """

    def __init__(self, temperature: float = 0.1, seed: int = 0, name: str = SIMULATED
                 ) -> None:
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature, self.seed = temperature, seed
        self.name = name if name.startswith(SIMULATED) else f"{SIMULATED}-{name}"

    @property
    def label(self) -> str:
        """The annotator name stored with its rankings: says it is simulated, which gold
        version, and how noisy."""
        return f"{self.name}:{GOLD_VERSION}:t{self.temperature:g}"

    def rank(self, item: PromptItem, responses: list[str], finished: list[bool]) -> list[int]:
        """Indices of `responses`, best first."""
        if len(responses) != len(finished):
            raise ValueError("responses and finished differ in length")
        scores = [gold_score(item, r, f) for r, f in zip(responses, finished, strict=True)]
        if self.temperature == 0:
            return sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        rng = random.Random(f"{self.seed}\x00{item.text}\x00" + "\x00".join(
            f"{int(f)}{r}" for r, f in zip(responses, finished, strict=True)))
        keys = [s / self.temperature - math.log(-math.log(rng.random() or 1e-300))
                for s in scores]
        return sorted(range(len(scores)), key=lambda i: -keys[i])
