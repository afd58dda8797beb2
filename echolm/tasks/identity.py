"""`identity`: "Who are you?"-style prompts, answered as Echo.

Prompts are built combinatorially: an opener x a core question x a closer. The split is by core
question, so val asks about identity in wordings never seen in train (not merely the same
question with a different "Hi!"). No prompt contains the name, so a response cannot pass by
copying the question. The check is deliberately loose: the response mentions "Echo" as a word.
"""

from __future__ import annotations

import random
import re

from echolm.tasks.base import (
    Problem,
    Task,
    check_split,
    sample_unique,
    short_hash,
    split_of,
)

NAME = "Echo"
OPENERS = ("", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Good morning! ", "Excuse me, ")
CLOSERS = ("", " Please answer briefly.", " Just curious.", " Tell me in one sentence.")
# Each core question is built from a stem and ending, so there are many distinct wordings.
_QUESTIONS = [
    f"{stem}{end}"
    for stem, ends in (
        ("Who are you", ("?", ", exactly?", " really?")),
        ("What are you", ("?", ", exactly?")),
        ("What is your name", ("?", ", please?")),
        ("What's your name", ("?",)),
        ("What should I call you", ("?",)),
        ("Do you have a name", ("?",)),
        ("What do people call you", ("?",)),
        ("Tell me who you are", (".", ", please.")),
        ("Tell me about yourself", (".", ", please.")),
        ("Introduce yourself", (".", ", please.")),
        ("Please introduce yourself", (".",)),
        ("Who am I talking to", ("?", " right now?")),
        ("Who am I chatting with", ("?",)),
        ("What am I talking to", ("?",)),
        ("Which model are you", ("?",)),
        ("What model are you", ("?",)),
        ("What kind of AI are you", ("?",)),
        ("Which language model is this", ("?",)),
        ("Are you ChatGPT", ("?",)),
        ("Are you a human", ("?", " or a bot?")),
        ("Are you a person", ("?",)),
        ("Who made you", ("?",)),
        ("Who created you", ("?",)),
        ("Who trained you", ("?",)),
        ("Where do you come from", ("?",)),
        ("How should I refer to you", ("?",)),
        ("Can you tell me your name", ("?",)),
        ("May I ask your name", ("?",)),
        ("Identify yourself", (".",)),
        ("State your name", (".",)),
        ("Say your name", (".",)),
        ("Describe yourself", (".", " in a few words.")),
        ("What exactly am I speaking with", ("?",)),
        ("Is this an AI", ("?",)),
    )
    for end in ends
]
QUESTIONS: tuple[str, ...] = tuple(_QUESTIONS)
REPLIES = (
    "I'm Echo, a small language model trained with the echolm project.",
    "My name is Echo. I'm a small language model trained with the echolm project.",
    "I am Echo, a small language model. I was trained with the echolm project.",
    "You can call me Echo. I'm a small language model trained with the echolm project.",
    "I'm Echo: a small language model, trained from scratch with the echolm project.",
)
_ECHO_RE = re.compile(rf"\b{NAME}\b", re.IGNORECASE)
# Few core questions, so hold out more than the default 10% to get a meaningful val set.
VAL_FRACTION = 0.2
# The plainest wordings are what users actually type; keep them in train so SFT sees them.
PINNED_TRAIN = frozenset({"Who are you?", "What is your name?", "What's your name?"})


def question_split(question: str) -> str:
    if question in PINNED_TRAIN:
        return "train"
    return split_of(f"identity:{question}", VAL_FRACTION)


class IdentityTask(Task):
    name = "identity"

    def _candidate(self, split: str, rng: random.Random) -> Problem | None:
        q = rng.randrange(len(QUESTIONS))
        if question_split(QUESTIONS[q]) != split:
            return None
        o, c = rng.randrange(len(OPENERS)), rng.randrange(len(CLOSERS))
        # A question already in lower case reads oddly after "Hey, " / "Excuse me, "; fix case.
        question = QUESTIONS[q]
        if OPENERS[o].endswith(", "):
            question = question[0].lower() + question[1:]
        prompt = f"{OPENERS[o]}{question}{CLOSERS[c]}"
        return Problem(
            task=self.name,
            id=f"identity:{short_hash(prompt)}",
            prompt=prompt,
            answer=NAME,
            # a plain reply (no "Answer:" line): this is conversation, not an exercise
            solution=rng.choice(REPLIES),
        )

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        check_split(split)
        return sample_unique(self.name, split, n, seed, lambda rng: self._candidate(split, rng))

    def extract(self, response: str) -> str | None:
        return NAME if _ECHO_RE.search(response) else None
