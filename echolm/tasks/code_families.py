"""The `code` task's problems: small Python functions generated from 50 families (add_7,
count_vowels, clamp_2_9, fizzbuzz_3_5, keep_above_4 ...), most parametrised, each with a
reference body and hidden test cases computed by running the reference. Split by family +
parameters (the problem id): val asks for functions never seen in train. Scoring lives in
echolm/tasks/code.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from echolm.tasks.base import split_of


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


