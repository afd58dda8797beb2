import pytest

from echolm.errors import EchoError
from echolm.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. It's 12345 o'clock; naïve café — "
        "don't you think?\n\n  Indented   lines\tand tabs. 日本語のテキスト 🙂🙂 ")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [TEXT * 3, "Hello world. " * 50, "def f(x):\n    return x * 2\n" * 20]
    return train_tokenizer(texts, 400)


def test_tiktoken_gives_the_same_ids_as_hf(tok):
    samples = [TEXT, "", " ", "\n\n\n", "a" * 100, "12 + 345 = 357", "Ünïcödé 🙂 x" * 3,
               "  leading and trailing  ", "tab\tsep\r\nwin"]
    for s in samples:
        assert tok.encode(s) == tok.hf.encode(s, add_special_tokens=False).ids, s
        assert tok.decode(tok.encode(s)) == s


def test_digits_are_single_tokens(tok):
    assert [p for _, p in tok.pieces("2024")] == ["2", "0", "2", "4"]


def test_special_tokens_exist_and_text_cannot_forge_them(tok):
    assert all(t in tok.special for t in SPECIAL_TOKENS)
    # user text spelling a special token stays text (HF's own encode would make it special)
    assert tok.bos not in tok.encode("<|bos|>")
    assert tok.decode(tok.encode("x <|bos|> y")) == "x <|bos|> y"


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(EchoError, match="vocab_size=100 is too small"):
        train_tokenizer(["hello"], 100)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EchoError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_chat_mask_worked_out_by_hand(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"},
            {"role": "assistant", "content": "B"}]
    ids, mask = tok.render_conversation(msgs)
    sp = tok.special
    s, u, a, v, b = (tok.encode(x) for x in "SUAVB")
    assert all(len(x) == 1 for x in (s, u, a, v, b))
    assert ids == [sp["<|bos|>"],
                   sp["<|system_start|>"], *s, sp["<|system_end|>"],
                   sp["<|user_start|>"], *u, sp["<|user_end|>"],
                   sp["<|assistant_start|>"], *a, sp["<|assistant_end|>"],
                   sp["<|user_start|>"], *v, sp["<|user_end|>"],
                   sp["<|assistant_start|>"], *b, sp["<|assistant_end|>"]]
    # trained on: the assistant's text and its end token, in both turns; nothing else
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]


def test_bad_conversation_messages(tok):
    with pytest.raises(EchoError, match="role must be one of"):
        tok.render_conversation([{"role": "robot", "content": "x"}])
    with pytest.raises(EchoError, match="'content' must be a string"):
        tok.render_conversation([{"role": "user", "content": 3}])
    with pytest.raises(EchoError, match="system message must come first"):
        tok.render_conversation([{"role": "user", "content": "x"},
                                 {"role": "system", "content": "y"}])


def test_render_user_is_one_user_turn_then_the_open_assistant_turn(tmp_path):
    from echolm.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello there, what is 2 + 2?"] * 50, vocab_size=300)
    ids = tok.render_user("What is 2 + 2?")
    assert ids == tok.render_prompt([{"role": "user", "content": "What is 2 + 2?"}])
    sp = tok.special
    assert ids[0] == sp["<|bos|>"] and ids[1] == sp["<|user_start|>"]
    assert ids[-2:] == [sp["<|user_end|>"], sp["<|assistant_start|>"]]
