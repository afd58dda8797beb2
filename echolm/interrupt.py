"""Stopping a command without losing its work. While a command runs (`handled()`, taken by
the CLI), Ctrl-C (SIGINT) and SIGTERM are caught here. Inside a training loop (the Trainer
`defer`s them) the step in progress finishes, the Trainer saves a checkpoint at that step and
raises `Interrupted`: the same command resumes from exactly there. A second Ctrl-C stops at
once (that step is lost; checkpoints are written atomically, so none is ever half there).
Outside a training loop a signal stops the command at once, as Python's default does."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

_state: dict = {"deferring": False, "requested": None, "received": None}


class Interrupted(KeyboardInterrupt):
    """A training loop stopped by a signal after saving a checkpoint; the message says
    which one."""


def _handler(signum: int, _frame: object) -> None:
    _state["received"] = signum
    again = _state["requested"] is not None
    if _state["deferring"] and not (again and signum == signal.SIGINT):
        if not again:
            _state["requested"] = signum
            print("\necholm: stopping after the step in progress, then saving a checkpoint "
                  "(Ctrl-C again stops at once, losing that step)", file=sys.stderr, flush=True)
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Route SIGINT and SIGTERM through this module for the block (main thread only: anywhere
    else the default handling stays)."""
    _state.update(deferring=False, requested=None, received=None)
    saved = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, _handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
        _state.update(deferring=False, requested=None, received=None)


def defer(on: bool) -> None:
    """The Trainer: a training step is (on) or is no longer (off) in progress."""
    _state["deferring"] = on


def requested() -> bool:
    """Whether a signal asked the training loop to stop after the current step."""
    return _state["requested"] is not None


def exit_code() -> int:
    """128 + the signal that stopped the command (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (_state["received"] or signal.SIGINT)
