"""Reading pretraining text: the built-in corpus, .txt / .jsonl / .parquet files or folders,
and Hugging Face datasets (``hf:NAME[:CONFIG][:SPLIT]``) when `datasets` is installed.

Every document is checked as it is read; a bad file names itself, the line and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from echolm.errors import EchoError

EXTENSIONS = (".txt", ".jsonl", ".parquet")


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise EchoError(f"{path}: file is empty")
    if b"\x00" in raw[:65536]:
        raise EchoError(f"{path}: looks binary (contains NUL bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is dropped
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EchoError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None


def read_jsonl(path: Path, field: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; malformed lines are errors."""
    text = _read_utf8(path)
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is not a newline
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EchoError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise EchoError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        if field is not None and not isinstance(rec.get(field), str):
            what = "is missing" if field not in rec else "must be a string"
            raise EchoError(f"{path}:{n}: field '{field}' {what}")
        yield n, rec


def _file_docs(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield _read_utf8(path)
    elif path.suffix == ".jsonl":
        for _, rec in read_jsonl(path, "text"):
            yield rec["text"]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["text"])
        except Exception as e:  # pyarrow raises several types for missing columns / bad files
            raise EchoError(f"{path}: cannot read a 'text' column from parquet ({e})") from None
        for i, t in enumerate(table.column("text").to_pylist()):
            if not isinstance(t, str):
                raise EchoError(f"{path}: row {i}: 'text' must be a string, got {t!r:.40}")
            yield t
    else:
        raise EchoError(f"{path}: unsupported file type (use {', '.join(EXTENSIONS)})")


def _hf_dataset(spec: str):  # noqa: ANN202 - a datasets.Dataset, imported lazily
    """``hf:NAME[:CONFIG][:SPLIT]``: a hub dataset, or a local folder (one written by
    ``save_to_disk``, else any folder of data files ``load_dataset`` reads). SPLIT defaults to
    train."""
    parts = spec.split(":")[1:]
    if len(parts) > 3:
        raise EchoError(f"data source '{spec}': expected hf:NAME[:CONFIG][:SPLIT]")
    name, config, split = (parts + [None, None, None])[:3]
    if not name:
        raise EchoError(f"data source '{spec}': expected hf:NAME[:CONFIG][:SPLIT]")
    try:
        import datasets
    except ImportError:
        raise EchoError(f"data source '{spec}' needs the optional `datasets` package: "
                        "pip install 'echolm[hf]'") from None
    split = split or "train"
    folder = Path(name).expanduser()
    saved = folder.is_dir() and any((folder / f).exists()
                                    for f in ("state.json", "dataset_dict.json"))
    try:
        if saved:
            ds = datasets.load_from_disk(str(folder))
        else:
            ds = datasets.load_dataset(str(folder) if folder.is_dir() else name,
                                       config or None, split=split)
    except Exception as e:  # datasets raises many types (offline, missing, bad split ...)
        msg = " ".join(str(e).split())[:300]
        raise EchoError(f"data source '{spec}': cannot load it ({type(e).__name__}: {msg})"
                        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise EchoError(f"data source '{spec}': no split '{split}' (has {sorted(ds)})")
        ds = ds[split]
    return ds


def hf_column(spec: str, column: str, batch_size: int = 1024) -> Iterator[tuple[int, Any]]:
    """(row, value) of one column of a hub / saved dataset; a missing column is an error."""
    ds = _hf_dataset(spec)
    if column not in ds.column_names:
        raise EchoError(f"data source '{spec}': no '{column}' column (has {ds.column_names})")
    row = 0
    for batch in ds.select_columns([column]).iter(batch_size=batch_size):
        for value in batch[column]:
            yield row, value
            row += 1


def _hf_docs(spec: str) -> Iterator[str]:
    for row, text in hf_column(spec, "text"):
        if not isinstance(text, str):
            raise EchoError(f"data source '{spec}': row {row}: 'text' must be a string, "
                            f"got {text!r:.40}")
        yield text


def source_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise EchoError(f"data source '{source}': no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in EXTENSIONS and p.is_file())
        if not files:
            raise EchoError(f"{path}: folder holds no {', '.join(EXTENSIONS)} files")
        return files
    return [path]


def _held_out(doc: str, fraction: float) -> bool:
    """Deterministic split by document content: the same document always lands on one side."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


# Fewer documents than this many held-out ones expected (count x val_fraction): too few to
# hold whole documents out (one book would land on one side), so each is cut instead.
MIN_HELD_OUT_DOCS = 5


def _source_docs(source: str) -> Iterator[str]:
    docs = _hf_docs(source) if source.startswith("hf:") else (
        d for f in source_files(source) for d in _file_docs(f))
    return (d for d in docs if d.strip())


def few_documents(sources: list[str], val_fraction: float) -> int | None:
    """The number of documents in the (non built-in) sources when too few to hold whole
    ones out (see MIN_HELD_OUT_DOCS), else None. Reads no further than that number."""
    if val_fraction <= 0:
        return None
    enough = math.ceil(MIN_HELD_OUT_DOCS / val_fraction)
    n = 0
    for source in sources:
        if source == "builtin":  # split already (its own val.jsonl)
            continue
        for _ in _source_docs(source):
            n += 1
            if n >= enough:
                return None
    return n or None


def cut_tail(doc: str, fraction: float) -> int:
    """Where to cut `doc` so that about its last `fraction` is held out: at the paragraph
    break (else line break, else space) nearest that point, else at that point; len(doc)
    for a document too short to cut."""
    target = round(len(doc) * (1 - fraction))
    window = max(1, len(doc) - target)  # look no further than the held-out part's size
    for sep in ("\n\n", "\n", " "):
        before = doc.rfind(sep, max(0, target - window), target + 1)
        after = doc.find(sep, target, min(len(doc), target + window))
        found = [i for i in (before, after) if i > 0]
        if found:
            cut = min(found, key=lambda i: abs(i - target)) + len(sep)
            if doc[:cut].strip() and doc[cut:].strip():
                return cut
    return target if doc[:target].strip() and doc[target:].strip() else len(doc)


def iter_documents(sources: list[str], split: str, val_fraction: float = 0.01,
                   log: Callable[[str], Any] | None = None) -> Iterator[str]:
    """Documents of `split` ("train" or "val") from all sources, in a fixed order. Whole
    documents are held out by a hash of their text; when the sources hold too few documents
    for that (one book), the last `val_fraction` of each is held out instead, cut at a
    paragraph break, and `log` says so."""
    if split not in ("train", "val"):
        raise ValueError(split)
    few = few_documents(sources, val_fraction)
    if few is not None and log is not None:
        log(f"data: only {few} document(s) in data.pretrain, too few to hold whole ones out: "
            f"the last {val_fraction:.0%} of each (cut at a paragraph break) is the held-out "
            "text")
    for source in sources:
        if source == "builtin":
            from echolm.data.builtin import build_builtin_corpus

            folder = build_builtin_corpus()
            for _, rec in read_jsonl(folder / f"{split}.jsonl", "text"):
                yield rec["text"]
            continue
        for doc in _source_docs(source):
            if few is not None:
                cut = cut_tail(doc, val_fraction)
                part = doc[cut:] if split == "val" else doc[:cut]
                if part.strip():
                    yield part
            elif _held_out(doc, val_fraction) == (split == "val"):
                yield doc
