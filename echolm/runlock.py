"""One writer per run directory: every command that writes a run holds DIR/.lock while it
runs, so two `echolm` processes never train, rank or evaluate into one run at once (their
metrics rows, checkpoints and rankings would interleave).

The lock is `flock` on the file: the kernel releases it when its holder exits, however it
exits (kill -9 included), so a stale lock never needs cleaning by hand; the next command
simply takes it. The file names its holder (pid, host, command, start time) for the one
line that tells a second writer who is in the way. Under `torchrun` rank 0 holds it for all
ranks (the others start with it and stop with it). Read-only commands (chat, explain,
export, report) take no lock; `echolm serve` takes none either: the only thing it writes is
DIR/prefs.sqlite (the ranking page), which SQLite locks by itself."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from echolm.errors import EchoError

LOCK_NAME = ".lock"


def holder(path: Path) -> str:
    """Who holds the lock file `path`, in words (what the file says about its holder)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        pid, host, command = int(info["pid"]), str(info["host"]), str(info["command"])
        started = time.strftime("%H:%M", time.localtime(float(info["started"])))
    except (OSError, ValueError, KeyError, TypeError):  # being written this instant
        return "another echolm process (just starting)"
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"pid {pid}{where} ({command}, started {started})"


def in_use(run_dir: Path) -> str | None:
    """Who holds DIR's lock now, in words, or None when no process does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder(path)
    finally:
        os.close(fd)
    return None


def _take(path: Path, run_dir: Path) -> int:
    """An open descriptor of `path` holding its flock, or EchoError naming the holder."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by programs run
        except OSError as e:
            raise EchoError(f"{path}: cannot open the run's lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EchoError(f"{run_dir} is in use by {holder(path)}; wait for it or stop "
                            "it") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file as we took it: take the new one


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str, create: bool = False) -> Iterator[None]:
    """Hold DIR/.lock for the block, or raise EchoError naming the process that holds it.
    A missing DIR is created when `create` (commands that start a run; removed again if the
    command wrote nothing, e.g. a bad --set), else the block runs unlocked (the command
    itself then says what is wrong with the folder). The file is removed on release."""
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds it for every rank
        yield
        return
    run_dir = Path(run_dir)
    made = False
    if not run_dir.is_dir():
        if not create or run_dir.exists():
            yield
            return
        run_dir.mkdir(parents=True, exist_ok=True)  # exist_ok: a rival may make it too
        made = True
    path = run_dir / LOCK_NAME
    fd = _take(path, run_dir)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": time.time()}
        os.ftruncate(fd, 0)  # what a killed holder left
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a process that opened it now retries
            if made:
                run_dir.rmdir()  # only if the command left nothing in it
        os.close(fd)  # releases the lock
