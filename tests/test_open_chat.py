"""Open-ended chat for SFT: real sentences of the pretraining text answer the RLHF templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from echolm.annotator import on_topic
from echolm.data.chat import load_conversations
from echolm.data.open_chat import _sentences, open_chat_conversations, topic_first
from echolm.data.prompts import open_prompts
from echolm.errors import EchoError

TEXT = """The sea was calm and the wind was fair that night.
She walked along the river until the sun went down.  A fox ran across the frozen field!
Why did the little cat sleep all day in the garden?
The moon rose over the quiet lake, and the owls began to call.
It was the best of times [1] and 1999 was a year.
I like the light of the morning; it shines on every tree.
The bright star burned above the mountains while the town slept.
Be kind to a friend who is in need, for a friend is a gift.
"""


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join([TEXT] * 3))
    return folder


def test_sentences_keep_plain_prose_and_drop_digits_brackets_and_fragments():
    got = _sentences(TEXT)
    assert "The sea was calm and the wind was fair that night." in got
    assert "A fox ran across the frozen field!" in got
    assert "Why did the little cat sleep all day in the garden?" in got
    assert not any("1999" in s or "[" in s for s in got)
    # a line break inside a sentence is joined with a space
    assert _sentences("The cat sat\non the mat today.") == ["The cat sat on the mat today."]


def test_open_conversations_are_train_prompts_answered_on_topic(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    convs = open_chat_conversations(200, seed=0, sources=[str(corpus)], val_fraction=0.0)
    assert len(convs) == 200
    train = {p.text: p for p in open_prompts("train")}
    val = {p.text for p in open_prompts("val")}
    prompts = {c[0]["content"] for c in convs}
    assert prompts <= set(train) and not prompts & val
    assert len(prompts) >= 10  # prompts rotate: not one prompt 200 times
    for user, assistant in convs:
        item = train[user["content"]]
        assert assistant["role"] == "assistant"
        # every answer names the topic (or, for a rhyme request, rhymes): gold's on-topic term
        assert on_topic(item, assistant["content"]) > 0, (user, assistant)
        if item.kind != "open:rhyme":  # a real sentence, from its topic on
            a = assistant["content"]
            flat = TEXT.replace("  ", " ").replace("\n", " ")
            assert a in flat or a[0].lower() + a[1:] in flat, a
            # from its topic on, unless no sentence leaves enough words after the topic
            # ("... in the garden?"): then whole sentences
            assert a in _sentences(TEXT) or any(
                a.lower().startswith(d + w) for w in item.topic
                for d in ("", "the ", "a ", "an ", "every ")), (item.topic, a)


def test_topic_first_starts_the_answer_at_its_topic():
    assert (topic_first("Although the moon is smaller than the earth, it is far away.",
                        ("moon",)) == "The moon is smaller than the earth, it is far away.")
    # plurals count; a determiner is kept only when it is right before the topic word
    assert topic_first("We saw five foxes in the snow.", ("fox",)) == "Foxes in the snow."
    assert topic_first("I gave her a cup of hot tea today.", ("cup", "tea")) == (
        "A cup of hot tea today.")
    # too little left after the topic: no answer; no topic word at all: no answer
    assert topic_first("Pish for thee, Iceland dog!", ("dog",)) is None
    assert topic_first("Nothing about it here at all.", ("sea",)) is None


def test_open_conversations_are_deterministic_in_the_seed(tmp_path):
    corpus = str(write_corpus(tmp_path / "corpus"))
    a = open_chat_conversations(50, 1, [corpus], 0.0)
    assert a == open_chat_conversations(50, 1, [corpus], 0.0)
    assert a != open_chat_conversations(50, 2, [corpus], 0.0)


def test_builtin_sft_mixture_adds_open_conversations(tmp_path):
    corpus = str(write_corpus(tmp_path / "corpus"))
    convs = load_conversations(["builtin"], ["identity"], 10, 0, open_examples=7,
                               text_sources=[corpus], val_fraction=0.0)
    assert len(convs) == 17


def test_text_with_no_answers_is_a_clear_error(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("Zzz qqq xxx vvv www yyy ppp.\n" * 10)
    with pytest.raises(EchoError, match="open_examples=5"):
        open_chat_conversations(5, 0, [str(folder)], 0.0)
