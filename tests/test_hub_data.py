"""`hf:NAME[:CONFIG][:SPLIT]` data sources with `datasets` installed, tested offline on datasets
saved to disk: pretraining text (`text` column) through the tokenizer and pretrain stages,
SFT conversations (`messages` column), splits, and clear errors for bad columns and rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub: every dataset is built and saved here
os.environ["HF_DATASETS_OFFLINE"] = "1"
datasets = pytest.importorskip("datasets")

from echolm.cli import main  # noqa: E402
from echolm.data.chat import load_conversations  # noqa: E402
from echolm.data.text import iter_documents  # noqa: E402
from echolm.errors import EchoError  # noqa: E402

CHATS = [
    [{"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am Echo, a small language model."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Say hi."},
     {"role": "assistant", "content": "Hi!"}],
] * 12


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _docs(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for f in sorted(corpus.glob("short_*.jsonl"))
            for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def text_dataset(corpus, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "text"
    docs = _docs(corpus)
    datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "chat"
    datasets.Dataset.from_dict({"messages": CHATS}).save_to_disk(folder)
    return folder


def test_saved_text_dataset_gives_the_same_documents_as_the_same_jsonl(text_dataset, corpus):
    for split in ("train", "val"):
        a = list(iter_documents([f"hf:{text_dataset}"], split, 0.1))
        b = list(iter_documents([str(f) for f in sorted(corpus.glob("short_*.jsonl"))], split,
                                0.1))
        assert a == b and len(a) > 0


def test_tokenizer_and_pretrain_stages_read_a_saved_dataset(text_dataset, chat_dataset,
                                                            tmp_path):
    run = tmp_path / "run"
    common = ["--set", f'data.pretrain=["hf:{text_dataset}"]', "--set", "data.val_fraction=0.1"]
    assert main(["tokenizer", "train", "--out", str(run), "--preset", "micro", *common]) == 0
    assert main(["pretrain", "--out", str(run), "--reconfigure", "--set", "pretrain.max_steps=3",
                 "--set", "pretrain.eval_every=0", "--set", "pretrain.eval_tokens=1024"]) == 0
    meta = json.loads((run / "tokens" / "meta.json").read_text())
    docs = list(iter_documents([f"hf:{text_dataset}"], "train", 0.1))
    assert meta["train"]["bytes"] == sum(len(d.encode()) for d in docs)
    assert json.loads((run / "base" / "done.json").read_text())["steps"] == 3

    # SFT on a saved dataset of conversations (`messages` column)
    assert main(["sft", "--out", str(run), "--reconfigure",
                 "--set", f'data.sft=["hf:{chat_dataset}"]',
                 "--set", "sft.max_steps=2", "--set", "sft.micro_batch=2",
                 "--set", "data.eval_problems=2", "--set", 'data.tasks=["identity"]']) == 0
    done = json.loads((run / "sft" / "done.json").read_text())
    assert done["conversations"] == len(CHATS) and done["steps"] == 2


def test_messages_read_back_as_conversations(chat_dataset):
    convs = load_conversations([f"hf:{chat_dataset}"], [], 0, seed=0)
    assert convs == CHATS


def test_splits_of_a_saved_dataset_dict(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["train doc one", "train doc two"]}),
        "validation": datasets.Dataset.from_dict({"text": ["validation doc"]}),
    }).save_to_disk(folder)
    assert list(iter_documents([f"hf:{folder}"], "train", 0.0)) == ["train doc one",
                                                                    "train doc two"]
    assert list(iter_documents([f"hf:{folder}::validation"], "train", 0.0)) == [
        "validation doc"]
    with pytest.raises(EchoError, match=r"no split 'test' \(has \['train', 'validation'\]\)"):
        list(iter_documents([f"hf:{folder}::test"], "train", 0.0))


@pytest.mark.parametrize("columns, reader, words", [
    ({"content": ["a", "b"]}, "text", "no 'text' column (has ['content'])"),
    ({"text": ["fine", None]}, "text", "row 1: 'text' must be a string"),
    ({"text": ["a"]}, "chat", "no 'messages' column (has ['text'])"),
    ({"messages": [[{"role": "bot", "content": "x"}]]}, "chat", "row 0: messages[0].role"),
    ({"messages": [[{"role": "user", "content": "x"}]]}, "chat", "row 0: no assistant"),
])
def test_bad_columns_and_rows_are_clear_errors(tmp_path, columns, reader, words):
    folder = tmp_path / "bad"
    datasets.Dataset.from_dict(columns).save_to_disk(folder)
    spec = f"hf:{folder}"
    with pytest.raises(EchoError, match=__import__("re").escape(words)) as e:
        if reader == "text":
            list(iter_documents([spec], "train", 0.0))
        else:
            load_conversations([spec], [], 0, seed=0)
    assert f"data source '{spec}'" in str(e.value)


def test_unreachable_hub_dataset_and_bad_specs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(EchoError, match="cannot load it"):
        list(iter_documents(["hf:nobody/no-such-dataset-echolm"], "train", 0.0))
    for spec in ("hf:", "hf:a:b:c:d"):
        with pytest.raises(EchoError, match=r"expected hf:NAME\[:CONFIG\]\[:SPLIT\]"):
            list(iter_documents([spec], "train", 0.0))
    run = tmp_path / "run"
    assert main(["tokenizer", "train", "--out", str(run), "--preset", "micro",
                 "--set", 'data.pretrain=["hf:nobody/no-such-dataset-echolm"]']) == 2
    err = capsys.readouterr().err
    assert err.startswith("echolm: error: data source 'hf:nobody/no-such-dataset-echolm'")
    assert err.count("\n") == 1
