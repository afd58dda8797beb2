"""Task specs as configs and the CLI write them ("arithmetic:difficulty=2,examples=4000"):
parsed into a task family, labelled for reports, and asked for up to n problems."""

from __future__ import annotations

from typing import Any

from echolm.errors import EchoError
from echolm.tasks import Problem, Task, get_task
from echolm.tasks.base import NotEnoughProblems


def parse_task_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"arithmetic:difficulty=2,ops=+-" -> ("arithmetic", {"difficulty": 2, "ops": "+-"})."""
    name, _, opts = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise EchoError(f"task spec '{spec}': expected name:key=value,...")
        kwargs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value
    return name.strip(), kwargs


# Spec options that belong to the SFT mixture, not to the task: "gsm:examples=1500" gives that
# family its own number of training conversations (instead of data.task_examples).
MIXTURE_OPTIONS = ("examples",)


def task_from_spec(spec: str) -> Task:
    name, kwargs = parse_task_spec(spec)
    for key in MIXTURE_OPTIONS:
        kwargs.pop(key, None)
    return get_task(name, **kwargs)


def task_label(spec: str, specs: list[str]) -> str:
    """The family name, unless several specs share it (then the whole spec)."""
    name = parse_task_spec(spec)[0]
    return name if sum(parse_task_spec(s)[0] == name for s in specs) == 1 else spec


def problems_up_to(task: Task, split: str, n: int, seed: int) -> list[Problem]:
    """`n` distinct problems, or all the family has if that is fewer (e.g. identity, or
    one-digit arithmetic with its few hundred sums)."""
    try:
        return task.problems(split, n, seed=seed)
    except NotEnoughProblems as e:
        return e.found
