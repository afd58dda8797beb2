"""The pretraining text a user brings: one book in one .txt file (the commonest case) is cut
into training and held-out text, and files saved with a byte-order mark are read as if they
had none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from echolm.cli import main
from echolm.data.chat import read_chat_file
from echolm.data.text import cut_tail, few_documents, iter_documents

BOM = "\ufeff"


@pytest.fixture
def book(corpus: Path, tmp_path: Path) -> Path:
    """One long document: the test corpus's long texts as the chapters of one book."""
    path = tmp_path / "book.txt"
    chapters = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("long_*.txt"))]
    path.write_text("\n\n".join(chapters), encoding="utf-8")
    return path


def test_one_book_is_cut_into_training_and_held_out_text(book: Path) -> None:
    text = book.read_text(encoding="utf-8")
    said: list[str] = []
    train = list(iter_documents([str(book)], "train", 0.1, log=said.append))
    val = list(iter_documents([str(book)], "val", 0.1))
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == text  # every byte on exactly one side
    assert train[0].endswith("\n\n") and not val[0].startswith("\n")  # at a paragraph break
    assert 0.08 < len(val[0]) / len(text) < 0.12
    assert said == ["data: only 1 document(s) in data.pretrain, too few to hold whole ones "
                    "out: the last 10% of each (cut at a paragraph break) is the held-out text"]


def test_whole_documents_are_held_out_when_there_are_enough(corpus: Path, book: Path) -> None:
    assert few_documents([str(corpus)], 0.1) is None  # 1524 documents
    assert few_documents([str(book), str(corpus / "long_00.txt")], 0.1) == 2
    assert few_documents([str(book)], 0.0) is None  # nothing held out at all
    assert list(iter_documents([str(book)], "val", 0.0)) == []
    doc = "one line without any break at all"
    assert doc[cut_tail(doc, 0.25):] == "at all"  # no paragraph or line break: the space
    assert cut_tail("a\nbb cc dd\n\nee", 0.2) == len("a\nbb cc dd\n\n")  # paragraph first
    assert cut_tail("x", 0.5) == 1  # too short to cut: all of it is training text


def test_one_book_trains_a_tokenizer_and_a_model(book: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = ["--out", str(run), "--preset", "micro", "--set", f'data.pretrain=["{book}"]',
            "--set", "data.val_fraction=0.1"]
    assert main(["tokenizer", "train", *args]) == 0
    assert main(["pretrain", *args, "--reconfigure", "--set", "pretrain.max_steps=2",
                 "--set", "pretrain.eval_tokens=1024"]) == 0
    out = capsys.readouterr().out
    assert out.count("data: only 1 document(s) in data.pretrain") == 2  # tokenizer, tokens
    meta = json.loads((run / "tokens" / "meta.json").read_text())
    assert meta["train"]["docs"] == meta["val"]["docs"] == 1
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == len(book.read_bytes())
    assert (run / "base" / "done.json").exists()


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path: Path) -> None:
    txt, jsonl, chat = tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "chat.jsonl"
    txt.write_text(BOM + "First line.\nSecond line.\n", encoding="utf-8")
    jsonl.write_text(BOM + json.dumps({"text": "a record"}) + "\n" +
                     json.dumps({"text": "another"}) + "\n", encoding="utf-8")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat.write_text(BOM + json.dumps({"messages": msgs}) + "\n", encoding="utf-8")
    assert txt.read_bytes().startswith(b"\xef\xbb\xbf")
    docs = list(iter_documents([str(txt), str(jsonl)], "train", 0.0))
    assert docs == ["First line.\nSecond line.\n", "a record", "another"]
    assert read_chat_file(chat) == [msgs]
