"""Prompts for learning from human rankings (RLHF): what the model answers K times so that a
person (or the simulated annotator in `echolm.annotator`) can rank the answers.

Two kinds, mixed about half and half:

* task prompts from the verifiable families (arithmetic difficulty 1 and 2, spelling,
  letter_count, identity), each carrying its `Problem`, so the correctness of an answer can
  still be checked after the model has been tuned on rankings (reward hacking shows up as
  answers the reward model likes that the verifier rejects);
* open-ended requests with no single right answer ("Write a short line about the sea.",
  "Say something kind to a friend.", "Give me a word that rhymes with 'night'."), built from
  templates over real words and topics. Each carries its topic words, so the simulated
  annotator can tell an on-topic answer from an off-topic one.

Train and val are disjoint: task prompts use their family's own train/val split (by problem
key), open-ended prompts are split by (template, topic). Everything is a pure function of
(split, n, seed). Prompts stay short: the models are tiny.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from echolm.errors import EchoError
from echolm.tasks.base import Problem, check_split, split_of
from echolm.tasks.spec import problems_up_to, task_from_spec

# Task families whose problems are asked (about half of all prompts), in rotation.
TASK_SPECS = ("arithmetic:difficulty=1", "arithmetic:difficulty=2", "spelling", "letter_count",
              "identity")
# Share of (template, topic) keys held out for val.
OPEN_VAL_FRACTION = 0.2

_PLACES = ("the sea", "the moon", "the sun", "the stars", "the river", "the forest",
           "the mountains", "the desert", "the city", "the garden", "the sky", "the beach",
           "the rain", "the snow", "the wind", "the night", "the morning", "a small town",
           "an old house", "a quiet lake")
_ANIMALS = ("a cat", "a dog", "a horse", "an owl", "a fox", "a bee", "a whale", "a rabbit",
            "a bird", "a fish", "a lion", "a mouse", "a frog", "a bear", "a duck", "a snail",
            "a goat", "a cow", "a sheep", "a wolf", "a deer", "a turtle", "a spider", "a crow")
_THINGS = ("a tree", "a cup of tea", "a book", "a bicycle", "a candle", "a clock", "an apple",
           "a bridge", "a letter", "a song", "a door", "a lamp", "a chair", "a boat",
           "a window", "a loaf of bread", "a flower", "a map", "a key", "a hat", "a pencil",
           "a kite", "a blanket", "a mirror", "an umbrella", "a basket", "a garden", "a train")
_PEOPLE = ("a friend", "a teacher", "a neighbour", "your brother", "your sister", "a child",
           "a doctor", "a farmer", "a student", "your mother", "your father", "a stranger",
           "a baker", "a nurse", "a sailor", "an old man")
_SEASONS = ("winter", "summer", "spring", "autumn", "a rainy day", "a sunny day",
            "the weekend", "the holidays")
_RHYMES = ("night", "cat", "day", "tree", "rain", "star", "cake", "bell", "king", "moon",
           "boat", "rose", "hill", "sing", "fun", "blue", "light", "book", "fish", "red",
           "snow", "bear", "hat", "play", "sun", "ball", "cold", "nice", "road", "sky")
_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "brown")
_ACTIVITIES = ("sleeping well", "cooking rice", "learning to swim", "reading more",
               "saving money", "waking up early", "staying calm", "making friends",
               "writing a letter", "planting seeds", "running", "drawing")
_WORDS = ("garden", "river", "happy", "quickly", "bright", "gentle", "window", "morning",
          "friend", "music", "travel", "dream", "quiet", "warm", "shadow", "paper", "honest",
          "little", "forest", "water", "summer", "laugh", "simple", "kitchen")
_OCCASIONS = ("a birthday", "a wedding", "the new year", "a new job", "a graduation",
              "a new baby", "a first day at school", "a retirement")

# (template id, template, topics). A prompt is template.format(t=topic).
TEMPLATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("line", "Write a short line about {t}.", _PLACES + _ANIMALS[:6]),
    ("describe", "Describe {t} in one sentence.", _ANIMALS + _THINGS),
    ("kind", "Say something kind to {t}.", _PEOPLE),
    ("thanks", "Write a thank-you note to {t}.", _PEOPLE),
    ("rhyme", "Give me a word that rhymes with '{t}'.", _RHYMES),
    ("fact", "Tell me one thing about {t}.", _ANIMALS + _PLACES[:8]),
    ("like", "What do you like about {t}?", _SEASONS + _PLACES[:10]),
    ("colour", "Name something that is {t}.", _COLOURS),
    ("tip", "Give me a short tip for {t}.", _ACTIVITIES),
    ("wish", "Write a short wish for {t}.", _OCCASIONS),
    ("story", "Tell a very short story about {t}.", _ANIMALS + _THINGS[:8]),
    ("name", "Suggest a name for {t}.", _ANIMALS),
    ("why", "Why do people like {t}?", _THINGS[:12] + _SEASONS),
    ("hello", "Say hello to {t}.", _PEOPLE),
    ("use", "Use the word '{t}' in a sentence.", _WORDS),
    ("plan", "What should I do on {t}?", _SEASONS),
)

# More everyday things, asked about in training only (below): with a few hundred prompts a
# small model memorises which words go with which prompt; with these it must learn to name
# whatever it was asked about, the skill the held-out prompts test.
_MORE_THINGS = tuple(("an " if w[0] in "aeiou" else "a ") + w for w in """
ant apron arrow axe badger bag balloon banana band barn barrel basin bat bean bed belt bench
berry blade boot bottle bow bowl box brick broom brush bucket bull butter button cabbage cage
camel cap carpet carriage cart castle cave chain cheese cherry chest chicken chimney church
cloak cloud coat coin collar comb cottage crown curtain dagger daisy desk diamond dish donkey
dove dragon drum eagle egg elephant fan feather fence field flag flute fork fountain gate giant
glass glove goose grape hammer harp hawk hedge helmet hen honey horn hut island jar jewel kettle
knife ladder lamb lantern leaf lemon lily lock meadow milk mill monkey nest net oak ox palace
pan parrot path peach pearl pen pig pillow pipe plate plough pond pot purse queen rat ring robin
rock rope sack saddle sail salt sand scarf shell ship shoe shop sword table tent tiger tower toy
tray trumpet valley vase village violin wagon wall wand wheel whistle wing wine wool worm
""".split())
# (template id, topics) of TEMPLATES asked about _MORE_THINGS too, always in the train split.
TRAIN_ONLY = (("line", _MORE_THINGS), ("describe", _MORE_THINGS), ("fact", _MORE_THINGS),
              ("story", _MORE_THINGS), ("why", _MORE_THINGS))

_ARTICLES = ("a", "an", "the", "your")


@dataclass(frozen=True)
class PromptItem:
    """One prompt to sample answers for.

    text: the user's message. problem: the task Problem it came from (its verifier can check an
    answer), or None for an open-ended prompt. kind: "task:<family>", "open:<template id>" or
    "file". topic: the words an on-topic answer should mention (open-ended prompts; for a
    rhyme prompt, the word to rhyme with). source: where it came from, for the preference
    store and for error messages ("rlhf:train", "prompts.txt:3").
    """

    text: str
    problem: Problem | None = None
    kind: str = "file"
    topic: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""


def topic_words(topic: str) -> tuple[str, ...]:
    """'a cup of tea' -> ('cup', 'tea'): the content words of a topic phrase."""
    skip = set(_ARTICLES) | {"of", "to", "for", "at", "in", "on", "new", "first", "old",
                             "small", "quiet", "short", "very"}
    words = tuple(w for w in topic.lower().replace("-", " ").split() if w not in skip)
    return words or tuple(topic.lower().split())


def open_prompts(split: str) -> list[PromptItem]:
    """Every open-ended prompt of `split`, in template order: val holds out a share of
    TEMPLATES' (template, topic) pairs; train has the rest and every TRAIN_ONLY pair (about a
    thousand prompts)."""
    check_split(split)
    pairs = [(tid, template, t) for tid, template, topics in TEMPLATES for t in topics
             if split_of(f"open:{tid}:{t}", OPEN_VAL_FRACTION) == split]
    if split == "train":
        templates = {tid: template for tid, template, _ in TEMPLATES}
        pairs += [(tid, templates[tid], t) for tid, topics in TRAIN_ONLY for t in topics]
    out, seen = [], set()
    for tid, template, t in pairs:
        text = template.format(t=t)
        text = text[0].upper() + text[1:]
        if text not in seen:
            seen.add(text)
            out.append(PromptItem(text, None, f"open:{tid}", topic_words(t), f"rlhf:{split}"))
    return out


def task_prompts(split: str, n: int, seed: int) -> list[PromptItem]:
    """`n` task prompts (or all there are), the families in rotation, from `split` only."""
    check_split(split)
    per = -(-n // len(TASK_SPECS)) if n > 0 else 0
    pools: list[list[Problem]] = []
    for k, spec in enumerate(TASK_SPECS):
        # ask each family for more than its share: a small family (one-digit sums, identity
        # val) runs out, and the others fill in
        pools.append(problems_up_to(task_from_spec(spec), split, min(per * 3, n), seed + k))
    out: list[PromptItem] = []
    seen: set[str] = set()
    depth = 0
    while len(out) < n and any(depth < len(p) for p in pools):
        for pool in pools:
            if depth < len(pool) and len(out) < n and pool[depth].prompt not in seen:
                p = pool[depth]
                seen.add(p.prompt)
                out.append(PromptItem(p.prompt, p, f"task:{p.task}", (), f"rlhf:{split}"))
        depth += 1
    return out


def rlhf_prompts(split: str, n: int, seed: int = 0) -> list[PromptItem]:
    """`n` distinct prompts from `split`, open-ended and task prompts alternating (the first
    is open-ended), deterministic in (split, n, seed). Raises EchoError if the split has fewer
    than `n` distinct prompts."""
    check_split(split)
    if n < 0:
        raise EchoError(f"number of prompts must be >= 0, got {n}")
    opens = open_prompts(split)
    random.Random(f"rlhf-open:{split}:{seed}").shuffle(opens)
    n_open = min((n + 1) // 2, len(opens))
    tasks = task_prompts(split, n - n_open, seed)
    if n_open + len(tasks) < n:
        raise EchoError(f"the {split} split has only {n_open + len(tasks)} distinct RLHF "
                        f"prompts, fewer than the {n} asked for")
    opens = opens[:n_open]
    out: list[PromptItem] = []
    for i in range(max(len(opens), len(tasks))):
        out += opens[i:i + 1] + tasks[i:i + 1]
    return out
