"""A command's `--out` folder (`echolm export hf`, `echolm import hf`): refused where replacing
it could destroy work, and replaced only once the new one is complete.

Refused: the source itself, a folder holding it or inside it, a folder inside a run directory
(`is_run_dir`), a run directory, a file, a symbolic link, and, without `--force`, any folder
that is not empty. With `--force` a folder is replaced only when it holds exactly what the
command writes (an earlier export; an earlier import nothing was added to): anything else is
refused with one line saying why.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from echolm.checkpoint import MODEL_STAGES
from echolm.errors import EchoError
from echolm.runlock import LOCK_NAME


def is_run_dir(folder: Path) -> bool:
    """A run directory: a stage folder (tokenizer/ or a model's) beside the run's config.json,
    summary.json or import.json. (An export has config.json but no stage folder.)"""
    return (any((folder / f).is_file() for f in ("config.json", "summary.json", "import.json"))
            and any((folder / s).is_dir() for s in ("tokenizer", *MODEL_STAGES)))


def _unlike(folder: Path, files: frozenset[str], optional: frozenset[str] = frozenset()
            ) -> str | None:
    """How `folder` differs from exactly `files` (paths relative to it; those in `optional`
    may be missing), or None."""
    dirs = {Path(f).parent.as_posix() for f in files} - {"."}
    for root, subdirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in sorted(subdirs):
            if (rel / name).as_posix() not in dirs:
                return f"it holds {(rel / name).as_posix()}/"
        for name in sorted(names):
            if rel == Path(".") and name == LOCK_NAME:  # the lock the command itself holds
                continue
            if (rel / name).as_posix() not in files:
                return f"it holds {(rel / name).as_posix()}"
    missing = sorted(f for f in files - optional if not (folder / f).is_file())
    return f"it has no {missing[0]}" if missing else None


def check_out(out: Path, force: bool, kind: str, files: frozenset[str], source: Path,
              source_is: str, optional: frozenset[str] = frozenset()) -> None:
    """Refuse an --out whose replacement could destroy anything but an earlier `kind`: the
    source (`source_is` says what it is) or a folder holding or inside it, a folder inside a
    run directory, a run directory, a file, a link; and, without `force`, anything there."""
    if out.is_symlink():
        raise EchoError(f"--out {out}: a symbolic link; give the folder itself")
    o, src = out.resolve(), source.resolve()
    if o == src:
        raise EchoError(f"--out {out}: is {source_is}; choose a new folder for the {kind}")
    if o in src.parents:
        raise EchoError(f"--out {out}: holds {source_is} ({source}); choose a new folder for "
                        f"the {kind}")
    if src in o.parents:
        raise EchoError(f"--out {out}: lies inside {source_is} ({source}); choose a folder "
                        "outside it")
    if (run := next((f for f in o.parents if is_run_dir(f)), None)) is not None:
        raise EchoError(f"--out {out}: lies inside the run directory {run}; choose a folder "
                        "outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise EchoError(f"--out {out}: is a file, not a folder; choose another --out")
    if all(p.name == LOCK_NAME for p in out.iterdir()):
        return
    why = _unlike(out, files, optional)
    if why and is_run_dir(out):
        raise EchoError(f"--out {out}: is a run directory ({why}), never replaced by the "
                        f"{kind}; choose another --out")
    if not force:
        raise EchoError(f"--out {out}: already exists and is not empty (use --force to "
                        f"replace an earlier {kind})")
    if why:
        raise EchoError(f"--out {out}: not an earlier {kind} as written ({why}); --force "
                        "replaces only that: choose another --out, or delete it yourself")


@contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `out` to fill. When the block ends it takes `out`'s
    place: an earlier `out` is moved aside first and removed only once the new one is in
    place (a kill in between leaves both, never neither complete). Removed if the block
    fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp, old = stem.with_name(stem.name + ".tmp"), stem.with_name(stem.name + ".old")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
