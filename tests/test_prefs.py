"""The preference store: JSONL round trips, validation that names file:line, and several real
processes writing at once without losing anything."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from echolm.errors import EchoError
from echolm.prefs import PreferenceStore


def _store_with_rankings(path: Path) -> PreferenceStore:
    s = PreferenceStore(path)
    for p in range(3):
        pid = s.add_prompt(f"prompt {p}", source="test")
        ids = s.add_responses(pid, [f"answer {p}.{i}" for i in range(3)], stage="sft",
                              checkpoint="/x/sft", sampling={"temperature": 1.0})
        s.add_ranking(pid, [ids[2], ids[0], ids[1]], "alice")
        if p == 1:
            s.add_ranking(pid, [ids[0], ids[1]], "bob")
    return s


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rankings_round_trip_keeps_order_and_annotator(tmp_path):
    a = _store_with_rankings(tmp_path / "a.sqlite")
    assert a.export_jsonl(tmp_path / "a.jsonl") == 4
    first = _lines(tmp_path / "a.jsonl")
    assert first[0] == {"prompt": "prompt 0", "responses": ["answer 0.2", "answer 0.0",
                                                            "answer 0.1"],
                        "ranking": [0, 1, 2], "annotator": "alice"}
    assert [x["annotator"] for x in first] == ["alice", "alice", "bob", "alice"]
    b = PreferenceStore(tmp_path / "b.sqlite")
    assert b.import_jsonl(tmp_path / "a.jsonl") == 4
    b.export_jsonl(tmp_path / "b.jsonl")
    assert _lines(tmp_path / "b.jsonl") == first
    assert b.counts() == {"prompts": 3, "responses": 9, "rankings": 4}  # bob's answers shared
    assert [r.annotator for r in b.rankings("bob")] == ["bob"]


def test_pairs_round_trip(tmp_path):
    a = _store_with_rankings(tmp_path / "a.sqlite")
    assert a.export_jsonl(tmp_path / "pairs.jsonl", shape="pairs") == 3 * 3 + 1
    pairs = _lines(tmp_path / "pairs.jsonl")
    assert pairs[:3] == [
        {"prompt": "prompt 0", "chosen": "answer 0.2", "rejected": "answer 0.0",
         "annotator": "alice"},
        {"prompt": "prompt 0", "chosen": "answer 0.2", "rejected": "answer 0.1",
         "annotator": "alice"},
        {"prompt": "prompt 0", "chosen": "answer 0.0", "rejected": "answer 0.1",
         "annotator": "alice"}]
    b = PreferenceStore(tmp_path / "b.sqlite")
    assert b.import_jsonl(tmp_path / "pairs.jsonl") == 10
    assert b.counts() == {"prompts": 3, "responses": 9, "rankings": 10}  # answers shared
    b.export_jsonl(tmp_path / "again.jsonl", shape="pairs")
    assert _lines(tmp_path / "again.jsonl") == pairs


def test_import_reorders_by_ranking_and_defaults_the_annotator(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]})
                 + "\n" + json.dumps({"prompt": "p", "chosen": "x", "rejected": "a",
                                      "annotator": "carol"}) + "\n")
    s = PreferenceStore(tmp_path / "s.sqlite")
    assert s.import_jsonl(f, annotator="team") == 2
    r = s.rankings()
    assert (r[0].responses, r[0].annotator) == (["c", "a", "b"], "team")
    assert (r[1].responses, r[1].annotator) == (["x", "a"], "carol")
    assert s.counts()["responses"] == 4  # "a" is stored once


def test_identical_answers_carry_no_preference(tmp_path):
    s = PreferenceStore(tmp_path / "s.sqlite")
    pid = s.add_prompt("p")
    ids = s.add_responses(pid, ["same", "other", "same"])
    s.add_ranking(pid, ids, "alice")
    assert s.export_jsonl(tmp_path / "pairs.jsonl", shape="pairs") == 2  # not same vs same
    s.export_jsonl(tmp_path / "r.jsonl")
    t = PreferenceStore(tmp_path / "t.sqlite")
    assert t.import_jsonl(tmp_path / "r.jsonl") == 1
    assert t.rankings()[0].responses == ["same", "other"]  # the best place is kept
    f = tmp_path / "self.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
    assert t.import_jsonl(f) == 0


def test_per_response_sampling_records(tmp_path):
    s = PreferenceStore(tmp_path / "s.sqlite")
    pid = s.add_prompt("p")
    s.add_responses(pid, ["a", "b"], stage="sft", sampling=[{"seed": 1, "stopped": True},
                                                            {"seed": 1, "stopped": False}])
    assert [r["sampling"]["stopped"] for r in s.responses(pid)] == [True, False]
    with pytest.raises(EchoError, match="1 sampling records for 2 responses"):
        s.add_responses(pid, ["c", "d"], sampling=[{}])


GOOD = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "p", "chosen": "a"}', "field 'rejected' must be a string"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "field 'prompt' must be a non-empty"),
    ('{"prompt": " ", "chosen": "a", "rejected": "b"}', "field 'prompt' must be a non-empty"),
    ('{"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}',
     "field 'responses' must be a list of strings"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', "field 'ranking' must order"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, true]}',
     "field 'ranking' must order"),
    ('{"prompt": "p", "responses": ["a"], "ranking": [0]}', "field 'ranking' must order"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "annotator": ""}',
     "field 'annotator' must be a non-empty string"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "annotator": 7}',
     "field 'annotator' must be a non-empty string"),
    ('["p", "a", "b"]', "expected a JSON object"),
    ('{"prompt": "p", ', "invalid JSON"),
])
def test_bad_records_name_file_and_line_and_write_nothing(tmp_path, line, words):
    f = tmp_path / "prefs.jsonl"
    f.write_text(GOOD + "\n\n" + line + "\n")
    s = PreferenceStore(tmp_path / "s.sqlite")
    with pytest.raises(EchoError, match=r"prefs\.jsonl:3: .*" + __import__("re").escape(words)):
        s.import_jsonl(f)
    assert s.counts() == {"prompts": 0, "responses": 0, "rankings": 0}


def test_ranking_must_name_answers_to_its_own_prompt(tmp_path):
    s = PreferenceStore(tmp_path / "s.sqlite")
    p1, p2 = s.add_prompt("one"), s.add_prompt("two")
    a = s.add_responses(p1, ["a", "b"])
    b = s.add_responses(p2, ["c", "d"])
    with pytest.raises(EchoError, match="do not belong to prompt"):
        s.add_ranking(p1, [a[0], b[0]], "alice")
    with pytest.raises(EchoError, match="at least two distinct"):
        s.add_ranking(p1, [a[0], a[0]], "alice")
    assert s.counts()["rankings"] == 0


def test_store_is_a_context_manager_that_closes(tmp_path):
    with PreferenceStore(tmp_path / "s.sqlite") as s:
        pid = s.add_prompt("one")
        s.add_ranking(pid, s.add_responses(pid, ["a", "b"]), "alice")
    with pytest.raises(sqlite3.ProgrammingError):  # closed at the end of the block
        s.counts()
    with pytest.raises(RuntimeError), PreferenceStore(tmp_path / "s.sqlite") as t:
        raise RuntimeError("an error inside the block closes the store too")
    with pytest.raises(sqlite3.ProgrammingError):
        t.counts()
    with PreferenceStore(tmp_path / "s.sqlite") as u:  # what was written is there
        assert u.counts() == {"prompts": 1, "responses": 2, "rankings": 1}


# ---- several processes at once -----------------------------------------------------------------
WORKERS, PROMPTS, K, SHARED = 4, 50, 4, 5


def _writer(path: str, w: int, go) -> None:  # runs in a child process
    go.wait()  # all start together, on a database none of them has created yet
    texts = [f"worker {w} prompt {i}" for i in range(PROMPTS)]
    texts += [f"shared prompt {i}" for i in range(SHARED)]  # every worker adds these too
    with PreferenceStore(path) as s:
        for t in texts:
            pid = s.add_prompt(t, source=f"worker {w}")
            ids = s.add_responses(pid, [f"{t} / worker {w} answer {j}" for j in range(K)],
                                  stage="test", sampling={"worker": w})
            s.add_ranking(pid, ids[::-1], f"worker-{w}")


def test_concurrent_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "prefs.sqlite")
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(path, w, go)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    per = PROMPTS + SHARED
    s = PreferenceStore(path)
    assert s.counts() == {"prompts": WORKERS * PROMPTS + SHARED,
                          "responses": WORKERS * per * K, "rankings": WORKERS * per}
    db = sqlite3.connect(path)
    for pid, ids_json, who in db.execute("SELECT prompt_id, response_ids, annotator "
                                         "FROM rankings"):
        ids = json.loads(ids_json)
        rows = db.execute(f"SELECT prompt_id, text FROM responses WHERE id IN "
                          f"({','.join('?' * len(ids))})", ids).fetchall()
        assert len(rows) == K and {r[0] for r in rows} == {pid}
        assert all(f"worker {who.split('-')[1]} answer" in r[1] for r in rows)
    for w in range(WORKERS):
        assert len(s.rankings(f"worker-{w}")) == per
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_implied_pairs_by_hand():
    from echolm.prefs import implied_pairs

    # best first: a > b > a' (a copy of a) > c; the copy makes no pair with a
    assert implied_pairs(["a", "b", "a", "c"]) == [(0, 1), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert implied_pairs(["x"]) == [] and implied_pairs(["x", "x"]) == []
