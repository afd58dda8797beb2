"""Reading the JSON files a run directory holds (config.json, summary.json, done.json,
timings.json, eval/*.json, ...): the one reader every place uses, so that a corrupt file
(cut, overwritten, edited by hand) is one line naming it, what is wrong with it and what to
do, never a traceback. Caches that can simply be measured again use `read_cache` instead."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from echolm.errors import EchoError

_REQUIRED = object()
_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number",
          float: "a number"}

# what to do about a corrupt file, by how it came to be
RERUN = "rerun the stage with --force"
DELETE = "delete it to recompute"


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_NAMES.get(k, k.__name__) for k in kinds)


def _found(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            type(None): "null"}.get(type(value), "a number")


def read_json(path: Path, fix: str, kind: type | tuple[type, ...] = dict,
              values: type | tuple[type, ...] | None = None, default: Any = _REQUIRED) -> Any:
    """The JSON value in `path`, which must be of type `kind` (and, for an object, every
    value of type `values`, when given). A missing file gives `default` (an error if none
    is given); an unreadable, invalid or wrongly shaped one is an EchoError that names the
    file, what is wrong and `fix` (what the user should do)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if default is not _REQUIRED:
            return default
        raise EchoError(f"{path}: missing; {fix}") from None
    except UnicodeDecodeError:
        raise EchoError(f"{path}: not a JSON file (not UTF-8 text); {fix}") from None
    except OSError as e:
        raise EchoError(f"{path}: cannot read ({e.strerror or e}); {fix}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise EchoError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(data, kind):
        raise EchoError(f"{path}: expected {_kind_name(kind)}, found {_found(data)}; {fix}")
    if values is not None and isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(value, values):
                raise EchoError(f"{path}: '{key}' should be {_kind_name(values)}, found "
                                f"{_found(value)}; {fix}")
    return data


def read_cache(path: Path, log: Callable[[str], Any] = print, kind: type = dict) -> Any:
    """A cache file's JSON value, or None when there is none yet or it is corrupt (then
    measured again: said in one log line, and the caller's write replaces the file)."""
    try:
        return read_json(path, "it is measured again", kind, default=None)
    except EchoError as e:
        log(f"warning: {e}")
        return None


# what to do about a run's config.json and timings.json (read in more than one place)
CONFIG_FIX = ("restore it, or delete it and give the run's --preset and --set options again")
TIMINGS_FIX = "delete it (the wall times of the stages already run are then lost)"
