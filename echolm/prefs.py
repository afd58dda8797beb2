"""The preference store: prompts, sampled responses (with the checkpoint and sampling settings
that produced them) and rankings (best first, who ranked and when), in SQLite.

WAL mode and short immediate transactions let several processes (the terminal ranker, the
web page, a simulated annotator) write at once without losing anything. Import and export
speak JSON Lines in two shapes: pairs ``{"prompt", "chosen", "rejected"}`` and full
rankings ``{"prompt", "responses": [...], "ranking": [i, j, ...]}`` (indices, best first).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from echolm.data.text import read_jsonl
from echolm.errors import EchoError

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE, source TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL, stage TEXT NOT NULL DEFAULT '', checkpoint TEXT NOT NULL DEFAULT '',
    sampling TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rankings (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    response_ids TEXT NOT NULL, annotator TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS responses_prompt ON responses(prompt_id);
CREATE INDEX IF NOT EXISTS rankings_prompt ON rankings(prompt_id);
"""
# the columns Echo reads, per table: a store without them is someone else's database
COLUMNS = {"prompts": {"id", "text", "source", "created"},
           "responses": {"id", "prompt_id", "text", "stage", "checkpoint", "sampling",
                         "created"},
           "rankings": {"id", "prompt_id", "response_ids", "annotator", "created"}}
MOVE_ASIDE = "move it away (Echo then starts an empty store) or put back a good copy"


def implied_pairs(answers: Sequence) -> list[tuple[int, int]]:
    """Every (better, worse) pair of positions a ranking of `answers` (best first) implies:
    (i, j) for i < j, except two identical answers (no preference between them). The one
    place rankings become pairs: the export, the reward model and DPO all use it."""
    return [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))
            if answers[i] != answers[j]]


@dataclass
class Ranking:
    prompt: str
    responses: list[str]  # best first
    annotator: str
    prompt_id: int
    response_ids: list[int]


class PreferenceStore:
    """One connection to the store at `path` (created if absent). `with PreferenceStore(path)
    as store:` closes it at the end of the block. A file that is not an Echo store (not
    SQLite, damaged, another program's tables) is refused as it is opened, untouched; a
    row that does not make sense is refused when it is read, naming the row."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            self.db.execute("PRAGMA busy_timeout=60000")
            self._check_schema()  # before anything writes to the file
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self._write() as db:
                for statement in filter(str.strip, SCHEMA.split(";")):
                    db.execute(statement)
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise EchoError(f"{self.path}: not a readable preference store ({e}); "
                            f"{MOVE_ASIDE}") from None
        except EchoError:
            self.db.close()
            raise

    def _check_schema(self) -> None:
        tables = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        if not tables:
            return  # a new store
        for table, columns in COLUMNS.items():
            if table not in tables:
                raise EchoError(f"{self.path}: not an Echo preference store (no table "
                                f"'{table}'; it has {', '.join(sorted(tables))}); {MOVE_ASIDE}")
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})").fetchall()}
            if missing := columns - have:
                raise EchoError(f"{self.path}: not an Echo preference store (table '{table}' "
                                f"has no column {', '.join(sorted(missing))}); {MOVE_ASIDE}")
        damage = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if damage != "ok":
            raise EchoError(f"{self.path}: damaged ({damage}); {MOVE_ASIDE}")

    def _bad_row(self, table: str, row_id: int, what: str, fix: str = "") -> EchoError:
        fix = fix or f"DELETE FROM {table} WHERE id = {row_id}"
        return EchoError(f"{self.path}: {table} row {row_id}: {what}; mend or delete that row, "
                         f'e.g. sqlite3 {self.path} "{fix}"')

    def _ranked_responses(self, row_id: int, prompt_id: int, raw: str) -> dict[int, str]:
        """A ranking row's responses, id -> text in its order (best first), checked: distinct
        responses to its prompt."""
        try:
            ids = json.loads(raw)
        except (TypeError, ValueError):
            ids = None
        if not (isinstance(ids, list) and len(ids) >= 2 and len(set(ids)) == len(ids)
                and all(type(i) is int for i in ids)):
            raise self._bad_row("rankings", row_id, f"response_ids {str(raw)[:40]!r} is not a "
                                "list of two or more response ids")
        known = dict(self.db.execute(
            f"SELECT id, text FROM responses WHERE prompt_id = ? AND id IN "
            f"({','.join('?' * len(ids))})", (prompt_id, *ids)).fetchall())
        if unknown := [i for i in ids if i not in known]:
            raise self._bad_row("rankings", row_id, f"response_ids names response {unknown[0]}"
                                f", which is not an answer to its prompt {prompt_id}")
        return {i: known[i] for i in ids}

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction: takes the write lock up front, so concurrent writers
        queue (busy_timeout) instead of failing half-way."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # ---- writing -------------------------------------------------------------------------
    def add_prompt(self, text: str, source: str = "") -> int:
        if not text.strip():
            raise EchoError("a prompt must not be empty")
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO prompts(text, source, created) VALUES (?, ?, ?)",
                       (text, source, time.time()))
            return db.execute("SELECT id FROM prompts WHERE text = ?", (text,)).fetchone()[0]

    def add_responses(self, prompt_id: int, texts: list[str], stage: str = "",
                      checkpoint: str = "", sampling: dict | list[dict] | None = None
                      ) -> list[int]:
        """Store responses to one prompt in one transaction. `sampling`: one dict of settings
        for all of them, or a list with one dict per response (e.g. its seed, whether it
        finished)."""
        per = sampling if isinstance(sampling, list) else [sampling or {}] * len(texts)
        if len(per) != len(texts):
            raise EchoError(f"{len(per)} sampling records for {len(texts)} responses")
        with self._write() as db:
            ids = []
            for t, meta in zip(texts, per, strict=True):
                cur = db.execute(
                    "INSERT INTO responses(prompt_id, text, stage, checkpoint, sampling, created)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (prompt_id, t, stage, checkpoint, json.dumps(meta or {}), time.time()))
                ids.append(cur.lastrowid)
            return ids

    def add_ranking(self, prompt_id: int, response_ids: list[int], annotator: str) -> int:
        """Store an order over responses to one prompt, best first (at least two)."""
        if len(response_ids) < 2 or len(set(response_ids)) != len(response_ids):
            raise EchoError("a ranking needs at least two distinct responses")
        if not annotator:
            raise EchoError("a ranking needs an annotator name")
        with self._write() as db:
            rows = db.execute(
                f"SELECT id FROM responses WHERE prompt_id = ? AND id IN "
                f"({','.join('?' * len(response_ids))})", (prompt_id, *response_ids)).fetchall()
            if len(rows) != len(response_ids):
                raise EchoError(f"ranking names responses that do not belong to prompt "
                                f"{prompt_id}")
            cur = db.execute("INSERT INTO rankings(prompt_id, response_ids, annotator, created)"
                             " VALUES (?, ?, ?, ?)",
                             (prompt_id, json.dumps(response_ids), annotator, time.time()))
            return cur.lastrowid

    # ---- reading -------------------------------------------------------------------------
    def prompt_text(self, prompt_id: int) -> str:
        row = self.db.execute("SELECT text FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        if row is None:
            raise EchoError(f"no prompt with id {prompt_id}")
        return row[0]

    def responses(self, prompt_id: int) -> list[dict]:
        rows = self.db.execute("SELECT id, text, stage, checkpoint, sampling FROM responses "
                               "WHERE prompt_id = ? ORDER BY id", (prompt_id,)).fetchall()
        out = []
        for rid, text, stage, checkpoint, raw in rows:
            try:
                sampling = json.loads(raw)
            except (TypeError, ValueError):
                sampling = None
            if not isinstance(text, str):
                raise self._bad_row("responses", rid, "its text is not text")
            if not isinstance(sampling, dict):
                raise self._bad_row("responses", rid, f"sampling {str(raw)[:40]!r} is not a "
                                    "JSON object", f"UPDATE responses SET sampling = '{{}}' "
                                    f"WHERE id = {rid}")
            out.append({"id": rid, "text": text, "stage": stage, "checkpoint": checkpoint,
                        "sampling": sampling})
        return out

    def ranked_orders(self, prompt_id: int, annotator: str) -> list[list[int]]:
        """The orders (response ids, best first) `annotator` gave a prompt, oldest first."""
        rows = self.db.execute("SELECT id, response_ids FROM rankings WHERE prompt_id = ? AND "
                               "annotator = ? ORDER BY id", (prompt_id, annotator)).fetchall()
        return [list(self._ranked_responses(rid, prompt_id, raw)) for rid, raw in rows]

    def unranked(self, annotator: str, limit: int = 100) -> list[int]:
        """Prompts with at least two responses that `annotator` has not ranked yet."""
        rows = self.db.execute(
            "SELECT p.id FROM prompts p WHERE (SELECT COUNT(*) FROM responses r "
            "WHERE r.prompt_id = p.id) >= 2 AND NOT EXISTS (SELECT 1 FROM rankings k "
            "WHERE k.prompt_id = p.id AND k.annotator = ?) ORDER BY p.id LIMIT ?",
            (annotator, limit)).fetchall()
        return [r[0] for r in rows]

    def rankings(self, annotator: str | None = None) -> list[Ranking]:
        q = ("SELECT k.id, k.prompt_id, k.response_ids, k.annotator, p.text FROM rankings k "
             "JOIN prompts p ON p.id = k.prompt_id")
        args: tuple = ()
        if annotator is not None:
            q += " WHERE k.annotator = ?"
            args = (annotator,)
        out = []
        for rid, pid, ids_json, who, prompt in self.db.execute(q + " ORDER BY k.id",
                                                               args).fetchall():
            answers = self._ranked_responses(rid, pid, ids_json)
            out.append(Ranking(prompt, list(answers.values()), who, pid, list(answers)))
        return out

    def counts(self) -> dict[str, int]:
        return {t: self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("prompts", "responses", "rankings")}

    # ---- JSON Lines ----------------------------------------------------------------------
    def export_jsonl(self, path: str | Path, shape: str = "rankings",
                     annotator: str | None = None) -> int:
        """Write rankings (shape "rankings") or every implied pair (shape "pairs")."""
        if shape not in ("rankings", "pairs"):
            raise EchoError(f"export shape must be 'rankings' or 'pairs', got {shape!r}")
        lines = []
        for r in self.rankings(annotator):
            if shape == "rankings":
                lines.append({"prompt": r.prompt, "responses": r.responses,
                              "ranking": list(range(len(r.responses))),
                              "annotator": r.annotator})
            else:
                lines += [{"prompt": r.prompt, "chosen": r.responses[i],
                           "rejected": r.responses[j], "annotator": r.annotator}
                          for i, j in implied_pairs(r.responses)]
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
        tmp.replace(path)
        return len(lines)

    def import_jsonl(self, path: str | Path, annotator: str = "import") -> int:
        """Read pairs or rankings (the shape is per line); returns how many rankings were
        stored. Every line is checked before anything is written."""
        path = Path(path)
        records = []
        for n, rec in read_jsonl(path):  # validate everything before writing anything
            where = f"{path}:{n}"
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise EchoError(f"{where}: field 'prompt' must be a non-empty string")
            who = rec.get("annotator", annotator)
            if not isinstance(who, str) or not who.strip():
                raise EchoError(f"{where}: field 'annotator' must be a non-empty string")
            if "chosen" in rec or "rejected" in rec:
                for f in ("chosen", "rejected"):
                    if not isinstance(rec.get(f), str):
                        raise EchoError(f"{where}: field '{f}' must be a string")
                responses, order = [rec["chosen"], rec["rejected"]], [0, 1]
            else:
                responses, order = rec.get("responses"), rec.get("ranking")
                if not (isinstance(responses, list) and all(isinstance(x, str)
                                                             for x in responses)):
                    raise EchoError(f"{where}: field 'responses' must be a list of strings")
                if not (isinstance(order, list) and len(order) >= 2
                        and all(type(i) is int for i in order)
                        and sorted(order) == list(range(len(responses)))):
                    raise EchoError(f"{where}: field 'ranking' must order all "
                                    f"{len(responses)} responses (indices, best first)")
            # the same text twice (two identical samples) keeps its best place; a record left
            # with fewer than two different answers carries no preference and is skipped
            ranked = list(dict.fromkeys(responses[i] for i in order))
            if len(ranked) >= 2:
                records.append((rec["prompt"], ranked, who))
        for prompt, ranked, who in records:
            pid = self.add_prompt(prompt, source=str(path))
            known = {r["text"]: r["id"] for r in self.responses(pid)}  # pairs share answers
            fresh = [t for t in ranked if t not in known]
            known.update(zip(fresh, self.add_responses(pid, fresh, stage="import"), strict=True))
            self.add_ranking(pid, [known[t] for t in ranked], who)
        return len(records)
