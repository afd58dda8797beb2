"""`arithmetic`: Echo's own + - * problems with worked column arithmetic.

Difficulty picks (digits per operand, number of operands); see LEVELS. Two-operand problems get
a column-by-column solution (carries, borrows, partial products) because that is the algorithm a
small model can actually imitate digit by digit; longer expressions get one line per operation
in precedence order ("30 * 4 = 120", "12 + 120 = 132").

The split key is the canonical expression text, so "12 + 30" is in exactly one split whatever the
seed or prompt wording.
"""

from __future__ import annotations

import ast
import random
from fractions import Fraction

from echolm.errors import EchoError
from echolm.tasks.base import Problem, Task, answer_line, sample_unique, split_of
from echolm.tasks.extract import extract_number

# difficulty -> (max digits per operand, number of operands)
LEVELS: dict[int, tuple[int, int]] = {1: (1, 2), 2: (2, 2), 3: (3, 2), 4: (2, 3), 5: (3, 4)}
PROMPTS = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "{e} = ?")
COLUMNS = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")


def _column(i: int) -> str:
    return COLUMNS[i] if i < len(COLUMNS) else f"column {i + 1}"


def _digits(x: int) -> list[int]:
    """Digits of a non-negative int, least significant first."""
    return [int(c) for c in reversed(str(x))]


def add_steps(a: int, b: int) -> list[str]:
    """Column addition of two non-negative ints, one line per column."""
    if a < 10 and b < 10:
        return [f"{a} + {b} = {a + b}"]
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    lines, carry = [], 0
    for i in range(width):
        s = da[i] + db[i] + carry
        terms = f"{da[i]} + {db[i]}" + (f" + {carry}" if carry else "")
        if i == width - 1:
            lines.append(f"{_column(i)}: {terms} = {s}, write {s}")
        else:
            lines.append(
                f"{_column(i)}: {terms} = {s}, write {s % 10}" + (", carry 1" if s >= 10 else "")
            )
        carry = s // 10
    lines.append(f"{a} + {b} = {a + b}")
    return lines


def sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction with borrows; a negative result is done as -(b - a)."""
    if a < 10 and b < 10:
        return [f"{a} - {b} = {a - b}"]
    if a < b:
        intro = f"{b} is bigger than {a}, so work out {b} - {a} and negate it"
        return [intro, *sub_steps(b, a), f"{a} - {b} = {a - b}"]
    da, db = _digits(a), _digits(b)
    db += [0] * (len(da) - len(db))
    lines, borrow = [], 0
    for i in range(len(da)):
        top = da[i] - borrow
        terms = f"{da[i]} - {db[i]}" + (" - 1" if borrow else "")
        if top < db[i]:
            # Borrowing shows as the top digit plus 10: "15 - 7 = 8, write 8, borrow 1".
            v = top + 10 - db[i]
            terms = f"{da[i] + 10} - {db[i]}" + (" - 1" if borrow else "")
            lines.append(f"{_column(i)}: {terms} = {v}, write {v}, borrow 1")
            borrow = 1
        else:
            v = top - db[i]
            lines.append(f"{_column(i)}: {terms} = {v}, write {v}")
            borrow = 0
    lines.append(f"{a} - {b} = {a - b}")
    return lines


def mul_steps(a: int, b: int) -> list[str]:
    """Multiplication: by a single digit column by column, otherwise via partial products."""
    if a < 10 and b < 10:
        return [f"{a} * {b} = {a * b}"]
    if a < 10:  # put the single digit second so the column method applies
        return [f"{a} * {b} = {b} * {a}", *mul_steps(b, a)]
    if b < 10:
        da = _digits(a)
        lines, carry = [], 0
        for i, d in enumerate(da):
            p = d * b + carry
            terms = f"{d} * {b}" + (f" + {carry}" if carry else "")
            if i == len(da) - 1:
                lines.append(f"{_column(i)}: {terms} = {p}, write {p}")
            else:
                lines.append(
                    f"{_column(i)}: {terms} = {p}, write {p % 10}"
                    + (f", carry {p // 10}" if p >= 10 else "")
                )
            carry = p // 10
        lines.append(f"{a} * {b} = {a * b}")
        return lines
    parts = [d * 10**i for i, d in enumerate(_digits(b)) if d]
    if len(parts) == 1:  # 60 = 6 * 10: multiply by the digit, then shift
        digit, shift = b // 10 ** (len(str(b)) - 1), 10 ** (len(str(b)) - 1)
        return [
            f"{a} * {b} = {a} * {digit} * {shift}",
            f"{a} * {digit} = {a * digit}",
            f"{a * digit} * {shift} = {a * b}",
            f"{a} * {b} = {a * b}",
        ]
    lines = [f"{a} * {b} = " + " + ".join(f"{a} * {p}" for p in parts)]
    lines += [f"{a} * {p} = {a * p}" for p in parts]
    if len(parts) > 1:
        lines.append(" + ".join(str(a * p) for p in parts) + f" = {a * b}")
    lines.append(f"{a} * {b} = {a * b}")
    return lines


# ---- expression evaluation, one binary operation per line (also used by the rg_* families)

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _fmt(x: Fraction, right: bool = False) -> str:
    s = str(x.numerator) if x.denominator == 1 else str(x)
    return f"({s})" if right and x < 0 else s


def expression_steps(expr: str) -> tuple[list[str], Fraction]:
    """Evaluate +, -, *, / and unary minus exactly, recording each operation as a line.

    A unary minus directly on a number is part of the literal (-9), not a step.
    """
    lines: list[str] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            literal = isinstance(node.operand, ast.Constant)
            v = ev(node.operand)
            if isinstance(node.op, ast.UAdd):
                return v
            if not literal:
                lines.append(f"-{_fmt(v, right=True) if v < 0 else f'({_fmt(v)})'} = {_fmt(-v)}")
            return -v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div):
                if b == 0:
                    raise ZeroDivisionError(expr)
                r = a / b
            else:
                r = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
            lines.append(f"{_fmt(a)} {_OPS[type(node.op)]} {_fmt(b, right=True)} = {_fmt(r)}")
            return r
        raise ValueError(f"unsupported expression: {expr!r}")

    value = ev(ast.parse(expr, mode="eval").body)
    return lines, value


class ArithmeticTask(Task):
    name = "arithmetic"

    def __init__(self, difficulty: int = 1, ops: str = "+-*") -> None:
        if difficulty not in LEVELS:
            raise EchoError(
                f"arithmetic: difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}"
            )
        if not ops or set(ops) - set("+-*"):
            raise EchoError(f"arithmetic: ops must be a non-empty subset of '+-*', got {ops!r}")
        self.difficulty = difficulty
        self.digits, self.operands = LEVELS[difficulty]
        self.ops = "".join(sorted(set(ops), key="+-*".index))

    def _expression(self, rng: random.Random) -> str:
        top = 10**self.digits - 1
        parts = [str(rng.randint(0, top))]
        for _ in range(self.operands - 1):
            op = rng.choice(self.ops)
            # Keep products short: the factor after '*' has at most 1 digit (2 at 3-digit levels
            # with two operands), so answers stay within a tiny model's reach.
            mul_digits = 2 if (self.digits >= 3 and self.operands == 2) else 1
            x = rng.randint(0, 10**mul_digits - 1) if op == "*" else rng.randint(0, top)
            parts += [op, str(x)]
        return " ".join(parts)

    def _solution(self, expr: str) -> tuple[list[str], int]:
        tokens = expr.split()
        if len(tokens) == 3:
            a, op, b = int(tokens[0]), tokens[1], int(tokens[2])
            steps = {"+": add_steps, "-": sub_steps, "*": mul_steps}[op](a, b)
            return steps, {"+": a + b, "-": a - b, "*": a * b}[op]
        steps, value = expression_steps(expr)
        return steps, int(value)

    def _candidate(self, split: str, rng: random.Random) -> Problem | None:
        expr = self._expression(rng)
        if split_of(f"arithmetic:{expr}") != split:
            return None
        steps, value = self._solution(expr)
        return Problem(
            task=self.name,
            id=f"arithmetic:{expr.replace(' ', '')}",
            prompt=rng.choice(PROMPTS).format(e=expr),
            answer=str(value),
            solution="\n".join(steps + [answer_line(str(value))]),
        )

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        name = f"{self.name}/d{self.difficulty}/{self.ops}"
        return sample_unique(name, split, n, seed, lambda rng: self._candidate(split, rng))

    def extract(self, response: str) -> str | None:
        return extract_number(response)
