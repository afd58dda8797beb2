"""The checks config sections share: numbers in range and finite, task specs, data sources.
Each failure is one line naming `section.field`, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from echolm.errors import EchoError


def finite(section: str, obj: Any, names: tuple[str, ...], low: float = 0.0,
           strict: bool = False) -> None:
    """Each named field a finite number >= low (> low when strict), else one clear error."""
    for name in names:
        v = getattr(obj, name)
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise EchoError(f"{section}.{name}={v} must be a finite number "
                            f"{'>' if strict else '>='} {low:g}")


def at_least(section: str, obj: Any, names: tuple[str, ...], low: int) -> None:
    """Each named whole-number field >= low, else one clear error."""
    for name in names:
        if getattr(obj, name) < low:
            raise EchoError(f"{section}.{name}={getattr(obj, name)} must be >= {low}")


def fraction(section: str, obj: Any, name: str, high_open: bool = False) -> None:
    v = getattr(obj, name)
    if not 0 <= v <= 1 or (high_open and v == 1):
        raise EchoError(f"{section}.{name}={v} must be in [0, 1{')' if high_open else ']'}")


def one_of(section: str, obj: Any, name: str, options: tuple[str, ...]) -> None:
    """`section.name` must be one of `options`: "dpo.loss='x': expected sigmoid or ipo"."""
    value = getattr(obj, name)
    if value not in options:
        said = ", ".join(options[:-1]) + f" or {options[-1]}"
        raise EchoError(f"{section}.{name}='{value}': expected {said}")


def numbers(section: str, obj: Any, kind: type) -> None:
    """Every number of a section of this kind, whatever its field: floats finite (nan and inf
    are never a setting), whole numbers within 2^53 (JSON's exact range; larger overflow
    torch)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if type(v) is not kind:
                continue
            if kind is float and not math.isfinite(v):
                raise EchoError(f"{section}.{f.name}={value} must be finite (not nan or inf)")
            if kind is int and abs(v) >= 2**53:
                raise EchoError(f"{section}.{f.name}={v} is out of range (at most 2^53)")


def check_task_specs(where: str, specs: list[str], per_task: int = 0) -> int:
    """Each task spec builds its family (known name and options; `examples=N` a whole number
    >= 0), else one line naming the spec; returns the training examples they ask for."""
    from echolm.tasks.spec import parse_task_spec, task_from_spec  # tasks import no config

    total = 0
    for spec in specs:
        try:
            task_from_spec(spec)
            n = parse_task_spec(spec)[1].get("examples", per_task)
        except (EchoError, TypeError, ValueError) as e:
            raise EchoError(f"{where}: '{spec}': {e}") from None
        if not isinstance(n, int) or n < 0:
            raise EchoError(f"{where}: '{spec}': examples must be a whole number >= 0")
        total += n
    return total


def check_sources(where: str, sources: list[str]) -> None:
    """At least one data source, each "builtin", a path, or hf:NAME[:CONFIG][:SPLIT] (whether
    a path exists is asked when a command starts: see pipeline.resolve_run_config)."""
    if not sources:
        raise EchoError(f"{where} is empty: name at least one source (\"builtin\", a file or "
                        "folder, or hf:NAME)")
    for src in sources:
        parts = src.split(":")[1:] if src.startswith("hf:") else ["path"]
        if not src.strip() or not 1 <= len(parts) <= 3 or not parts[0]:
            raise EchoError(f"{where}: source '{src}': expected \"builtin\", a file or folder, "
                            "or hf:NAME[:CONFIG][:SPLIT]")


def check_lora(section: str, obj: Any, allowed: tuple[str, ...], supported: bool) -> None:
    """A loop's LoRA settings (lora_rank, lora_alpha, lora_dropout, lora_targets): the rank a
    whole number >= 0, only where the stage `supported` LoRA; alpha > 0, dropout in [0, 1),
    the targets known projection names, at least one, each once."""
    at_least(section, obj, ("lora_rank",), 0)
    if obj.lora_rank > 0 and not supported:
        raise EchoError(f"{section}.lora_rank={obj.lora_rank}: {section} trains the whole model "
                        "(LoRA is for the post-training stages sft, rl, rlhf, dpo); set it to 0")
    finite(section, obj, ("lora_alpha",), strict=True)
    fraction(section, obj, "lora_dropout", high_open=True)
    targets = obj.lora_targets
    bad = [t for t in targets if t not in allowed]
    if bad or not targets or len(set(targets)) != len(targets):
        what = (f"unknown '{bad[0]}'" if bad else "none" if not targets else "a name twice")
        raise EchoError(f"{section}.lora_targets={json.dumps(targets)}: {what}; expected one or "
                        f"more of {', '.join(allowed)}")


def check_stages(where: str, stages: list[str], pipeline: tuple[str, ...]) -> None:
    """`stages`: one or more of `pipeline`'s names, in its order."""
    unknown = [s for s in stages if s not in pipeline]
    if unknown or not stages:
        raise EchoError(f"{where}={stages}: expected one or more of {', '.join(pipeline)}"
                        + (f" (unknown: {unknown})" if unknown else ""))
    if [s for s in pipeline if s in stages] != stages:
        raise EchoError(f"{where}={stages}: list them in pipeline order ({', '.join(pipeline)})")
