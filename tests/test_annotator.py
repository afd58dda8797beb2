"""The simulated annotator: each gold term on hand-made answers, and Plackett-Luce ranking
(deterministic with a seed, the gold order at temperature 0, noisier when hotter)."""

from __future__ import annotations

import pytest

from echolm.annotator import (
    OPEN_WEIGHTS,
    TASK_WEIGHTS,
    SimulatedAnnotator,
    gold_score,
    gold_terms,
    pair_agreement,
)
from echolm.data.prompts import PromptItem, topic_words
from echolm.english import rime
from echolm.tasks import get_task
from echolm.tasks.base import Problem

SUM = Problem("arithmetic", "arithmetic:45+37", "What is 45 + 37?", "82",
              "ones: 5 + 7 = 12, write 2, carry 1\ntens: 4 + 3 + 1 = 8, write 8\n"
              "45 + 37 = 82\nAnswer: 82")
TASK = PromptItem(SUM.prompt, SUM, "task:arithmetic", (), "test")
SEA = PromptItem("Write a short line about the sea.", None, "open:line", topic_words("the sea"))
RHYME = PromptItem("Give me a word that rhymes with 'night'.", None, "open:rhyme", ("night",))
GOOD_LINE = "The sea is calm and blue tonight."


def test_weights_sum_to_one_and_correct_dominates():
    assert sum(TASK_WEIGHTS.values()) == pytest.approx(1)
    assert sum(OPEN_WEIGHTS.values()) == pytest.approx(1)
    assert TASK_WEIGHTS["correct"] > sum(v for k, v in TASK_WEIGHTS.items() if k != "correct")


def test_correct_beats_wrong_even_when_the_wrong_one_looks_better():
    assert gold_terms(TASK, SUM.solution, True)["correct"] == 1
    assert gold_score(TASK, SUM.solution, True) == pytest.approx(1)
    wrong = SUM.solution.replace("82", "83")
    assert gold_terms(TASK, wrong, True)["correct"] == 0
    assert gold_score(TASK, SUM.solution, True) > gold_score(TASK, wrong, True)
    # correct but cut off and rambling still beats a tidy wrong answer
    messy = SUM.solution + "\n" + "and and and then the the " * 30
    assert gold_score(TASK, messy + "\nAnswer: 82", False) > gold_score(TASK, wrong, True)


def test_finished_beats_unfinished():
    for item, text in ((TASK, SUM.solution), (SEA, GOOD_LINE)):
        assert gold_terms(item, text, False)["finished"] == 0
        assert gold_score(item, text, True) > gold_score(item, text, False)


def test_on_topic_beats_off_topic():
    off = "I like to eat bread in the morning."
    assert gold_terms(SEA, GOOD_LINE, True)["on_topic"] == 1
    assert gold_terms(SEA, off, True)["on_topic"] == 0
    assert gold_score(SEA, GOOD_LINE, True) > gold_score(SEA, off, True)
    # a rhyme prompt wants a real word with the same ending, not the word itself
    assert rime("night") == "ight" and rime("cake") == "ake" and rime("day") == "ay"
    assert gold_terms(RHYME, "Light.", True)["on_topic"] == 1
    assert gold_terms(RHYME, "Night.", True)["on_topic"] == 0
    assert gold_terms(RHYME, "Blue.", True)["on_topic"] == 0
    # prompts without a topic (from a file) use their own content words
    item = PromptItem("Tell me about volcanoes.")
    assert gold_terms(item, "A volcano is a mountain that erupts.", True)["on_topic"] == 1
    assert gold_terms(item, "I am fine, thank you.", True)["on_topic"] == 0


def test_repetition_and_junk_and_empty_lose():
    repeated = "The sea is blue. The sea is blue. The sea is blue. The sea is blue."
    lines = "The sea.\nThe sea.\nThe sea.\nThe sea."
    junk = "Thxe sqea ixs clm zqv blwue tnight."
    symbols = "The sea ### @@@ ~~~ ^^^ ||| ¤¤¤ ¶¶¶."
    t = gold_terms(SEA, repeated, True)
    assert t["fresh"] < 0.5 and gold_terms(SEA, GOOD_LINE, True)["fresh"] == 1
    assert gold_terms(SEA, lines, True)["fresh"] <= 0.25
    assert gold_terms(SEA, junk, True)["readable"] < 0.5
    assert gold_terms(SEA, symbols, True)["readable"] < 0.6
    good = gold_score(SEA, GOOD_LINE, True)
    for bad in (repeated, lines, junk, symbols):
        assert gold_score(SEA, bad, True) < good, bad
    assert gold_score(SEA, "", True) == 0 and gold_score(TASK, "  \n", True) == 0
    assert gold_score(SEA, "The sea.", False) > gold_score(SEA, "", True)


def test_concise_penalises_rambling_not_worked_solutions():
    ramble = " ".join(f"The sea number {i} is wide." for i in range(60))
    assert gold_terms(SEA, ramble, True)["concise"] < 0.3
    assert gold_terms(SEA, GOOD_LINE, True)["concise"] == 1
    assert gold_terms(TASK, SUM.solution, True)["concise"] == 1


def test_spelled_letters_read_as_their_word():
    task = get_task("spelling")
    p = task.problems("train", 1, seed=0)[0]
    item = PromptItem(p.prompt, p, "task:spelling")
    terms = gold_terms(item, p.solution, True)
    assert terms == {"correct": 1, "finished": 1, "on_topic": 1, "concise": 1, "fresh": 1,
                     "readable": 1}


ANSWERS = [GOOD_LINE, "I like bread.", "sea sea sea sea sea sea sea sea", "Thxe sqea zqv.", ""]
DONE = [True, True, True, True, False]


def test_ranking_is_deterministic_and_order_independent():
    a = SimulatedAnnotator(temperature=0.5, seed=3)
    first = a.rank(SEA, ANSWERS, DONE)
    assert sorted(first) == list(range(len(ANSWERS)))
    a.rank(RHYME, ["Light.", "Night."], [True, True])  # another question in between
    assert SimulatedAnnotator(temperature=0.5, seed=3).rank(SEA, ANSWERS, DONE) == first
    draws = {tuple(SimulatedAnnotator(0.5, seed=s).rank(SEA, ANSWERS, DONE)) for s in range(30)}
    assert len(draws) > 1  # the seed matters


def test_zero_temperature_gives_the_gold_order():
    scores = [gold_score(SEA, r, f) for r, f in zip(ANSWERS, DONE, strict=True)]
    gold = sorted(range(len(scores)), key=lambda i: -scores[i])
    assert len(set(scores)) == len(scores)
    assert SimulatedAnnotator(temperature=0).rank(SEA, ANSWERS, DONE) == gold
    for s in range(20):  # and a nearly-zero temperature too, whatever the seed
        assert SimulatedAnnotator(temperature=1e-4, seed=s).rank(SEA, ANSWERS, DONE) == gold


def test_hotter_annotators_disagree_with_gold_more():
    scores = [gold_score(SEA, r, f) for r, f in zip(ANSWERS, DONE, strict=True)]

    def agreement(t: float) -> float:
        agree = total = 0
        for s in range(300):
            a, n = pair_agreement(SimulatedAnnotator(t, seed=s).rank(SEA, ANSWERS, DONE),
                                  scores)
            agree, total = agree + a, total + n
        return agree / total

    cold, warm, hot = agreement(0.03), agreement(0.2), agreement(5.0)
    assert cold > warm > hot
    assert cold > 0.97 and hot < 0.65


def test_the_label_says_it_is_simulated():
    assert SimulatedAnnotator().label == "simulated:gold-v1:t0.1"
    assert SimulatedAnnotator(0.3, name="alice").label.startswith("simulated-alice:gold-v1")
    with pytest.raises(ValueError):
        SimulatedAnnotator(temperature=-1)
