"""Run untrusted (model-generated) Python with limits: `run_python(code)` -> `Verdict`.

Each run goes through a small *launcher*: a fresh interpreter (this very file, loaded by path
with ``python -I -S``) that sets up the isolation, forks the sandboxed child, enforces the
wall-clock limit, watches total memory, reaps every process the program made, and reports
back on a pipe. The host side (`run_python`) only starts the launcher and reads the
program's stdout/stderr with a cap. Nothing here imports anything outside the standard
library at module level, because the launcher runs this file without site-packages.

Isolation, strongest first; the launcher picks the first that works and says which in
`Verdict.isolation` (see docs/sandbox.md):

``namespaces``  (root with CAP_SYS_ADMIN: this project's machines) new network namespace (no
    interfaces but a down loopback: no network at all), mount namespace with a new root that
    holds only /usr, /bin, /lib*, /etc and the interpreter, all read-only, a fresh /proc,
    /dev with null/zero/full/random/urandom and a private size-capped tmpfs as /tmp (the
    working directory, HOME and TMPDIR); pid namespace (the program is pid 1 there: when it
    ends every process it left is killed by the kernel); ipc and uts namespaces; a fresh
    unprivileged uid per run (61184-65519, the range systemd reserves for dynamic users), so
    RLIMIT_NPROC counts only this run's processes and no file of any real user is writable;
    no capabilities, no_new_privs.
``userns``  (not root, unprivileged user namespaces allowed) the same namespaces inside a new
    user namespace, running as the caller's own uid with every capability dropped.
``fallback``  (no namespaces) rlimits, a fresh uid when root (if the interpreter is reachable
    by it), a temporary working directory, and an audit hook that refuses sockets,
    subprocesses, signals, ctypes and file access outside the working directory and the
    standard library. Audit hooks are a speed bump, not a wall: see docs/sandbox.md.

Always: a separate session and process group, rlimits on CPU time, address space, processes,
open files, file size and core dumps, a scrubbed environment (PATH, LANG, HOME, TMPDIR,
PYTHONHASHSEED=0, PYTHONDONTWRITEBYTECODE), stdout/stderr capped (the program is killed when
it writes more), the launcher kills the program if the host goes away, and a seccomp filter
refuses new user namespaces and setns (x86_64 and aarch64; `isolation` says when it is not
in force).
"""

from __future__ import annotations

import marshal
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed", "sandbox_error")
MODES = ("namespaces", "userns", "fallback")
_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")


@dataclass
class Verdict:
    """What happened to one program.

    status: ok (exit 0) | error (non-zero exit, or killed by a signal such as SIGSEGV) |
        timeout (wall-clock or CPU limit) | memory (MemoryError, or the memory watchdog) |
        output_limit (wrote more than the cap to stdout or stderr) | killed (SIGKILL that we
        did not send, e.g. the kernel's OOM killer) | sandbox_error (the sandbox itself could
        not run the program; see `detail`).
    """

    status: str
    exit_code: int | None  # None when the program ended by a signal or never started
    signal: int | None  # the signal that ended it, if any
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    max_rss_mb: float
    isolation: str  # "namespaces: ..." / "userns: ..." / "fallback: ...", what was in force
    detail: str = ""  # why, for non-ok statuses
    truncated: bool = False  # stdout or stderr was cut at max_output_bytes

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def mode(self) -> str:
        return self.isolation.split(":", 1)[0]

    def to_dict(self) -> dict:
        return asdict(self)


def _user_error(message: str) -> Exception:
    from echolm.errors import EchoError  # lazily: the launcher runs without the package

    return EchoError(message)


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 65536,
    max_procs: int = 16,
    max_file_bytes: int = 16 << 20,
    max_open_files: int = 64,
    disk_mb: int = 64,
    mode: str = "auto",
) -> Verdict:
    """Run `code` as a Python program in the sandbox and say what happened.

    `timeout_s` is wall-clock from the program's start (CPU time is capped a second above
    it); `memory_mb` is the address-space limit of each process and the cap on the sum of
    their resident memory; `max_procs` caps processes+threads; `max_file_bytes` caps any file
    written; `disk_mb` is the size of the private /tmp. `mode` is "auto" (strongest available)
    or "fallback" (force the weakest mode, for tests). Only the standard library can be
    imported. Bad arguments raise EchoError; a program's failure never raises.
    """
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise _user_error("sandbox: code and stdin must be strings")
    for name, value, low in (("timeout_s", timeout_s, 0.01), ("memory_mb", memory_mb, 32),
                             ("max_output_bytes", max_output_bytes, 1), ("max_procs", max_procs, 1),
                             ("max_file_bytes", max_file_bytes, 0),
                             ("max_open_files", max_open_files, 8), ("disk_mb", disk_mb, 1)):
        if not isinstance(value, int | float) or value < low:
            raise _user_error(f"sandbox: {name} must be a number >= {low}, got {value!r}")
    if mode not in ("auto", "fallback"):
        raise _user_error(f"sandbox: mode must be auto or fallback, got {mode!r}")
    cfg = {"code": code, "stdin": stdin, "timeout_s": float(timeout_s),
           "memory_mb": int(memory_mb), "max_procs": int(max_procs),
           "max_file_bytes": int(max_file_bytes), "max_open_files": int(max_open_files),
           "disk_mb": int(disk_mb), "mode": mode, "python": _interpreter()}
    return _Host(cfg, int(max_output_bytes)).run()


def run_many(codes: Sequence[str], *, stdins: Sequence[str] | None = None, workers: int = 2,
             **kwargs) -> list[Verdict]:
    """`run_python` over many programs, `workers` at a time; verdicts in the input's order."""
    from concurrent.futures import ThreadPoolExecutor

    stdins = list(stdins) if stdins is not None else [""] * len(codes)
    if len(stdins) != len(codes):
        raise _user_error(f"sandbox: {len(codes)} programs but {len(stdins)} stdins")
    if workers < 1:
        raise _user_error(f"sandbox: workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda cs: run_python(cs[0], stdin=cs[1], **kwargs),
                             zip(codes, stdins, strict=True)))


_ISOLATION: dict[str, str] = {}


def isolation() -> str:
    """The isolation in force on this machine (runs one tiny program; cached)."""
    if "auto" not in _ISOLATION:
        _ISOLATION["auto"] = run_python("pass", timeout_s=10).isolation
    return _ISOLATION["auto"]


def _interpreter() -> str:
    """The real interpreter binary (not a venv's symlink): the program gets the bare stdlib."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


# ---------------------------------------------------------------------------------------
# Host side: start the launcher, read the program's output with a cap, build the Verdict.

# Imported (not run as a script) so that its cached bytecode is used; echolm/ is appended
# to sys.path, after the standard library, so no module of ours can shadow a stdlib one.
_STUB = ("import sys;sys.path.append(sys.argv[1]);import _sandbox_launcher as m;"
         "m.main(sys.argv[2:])")


class _Host:
    def __init__(self, cfg: dict, cap: int) -> None:
        self.cfg, self.cap = cfg, cap

    def run(self) -> Verdict:
        import selectors

        t_start = time.monotonic()
        cfg_fd = os.memfd_create("echolm-sandbox-config")  # close-on-exec; passed explicitly
        data = marshal.dumps(self.cfg)
        view = memoryview(data)
        while view:
            view = view[os.write(cfg_fd, view):]
        os.lseek(cfg_fd, 0, os.SEEK_SET)
        status_r, status_w = os.pipe()
        control_r, control_w = os.pipe()  # closing control_w asks the launcher to kill
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _STUB, os.path.dirname(_LAUNCHER),
                 str(cfg_fd), str(status_w), str(control_r)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(cfg_fd, status_w, control_r), start_new_session=True,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
        except BaseException:
            for fd in (status_r, control_w):
                os.close(fd)
            raise
        finally:
            for fd in (cfg_fd, status_w, control_r):
                os.close(fd)
        out, err, status = bytearray(), bytearray(), bytearray()
        bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
        over = truncated = False
        hung = False
        # The launcher enforces the time limit itself; this backstop only catches a launcher
        # that hangs (a bug), so that the host never waits forever.
        backstop = t_start + self.cfg["timeout_s"] + 30
        sel = selectors.DefaultSelector()
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        try:
            while sel.get_map():
                left = backstop - time.monotonic()
                if left <= 0:
                    hung = True
                    _killpg(proc.pid)
                    break
                for key, _ in sel.select(timeout=min(left, 1.0)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    buf = bufs[key.fd]
                    if key.fd == status_r:
                        buf += chunk
                        continue
                    room = self.cap - len(buf)
                    if len(chunk) > room:
                        truncated = True
                        if not over:
                            over = True
                            os.close(control_w)  # the launcher kills the program
                            control_w = -1
                    buf += chunk[:max(room, 0)]
        finally:
            sel.close()
            if control_w >= 0:
                os.close(control_w)
            os.close(status_r)
            proc.stdout.close()
            proc.stderr.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid)
                proc.wait()
        stdout = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        try:
            rep = marshal.loads(bytes(status)) if status else {}
        except (EOFError, ValueError, TypeError):
            rep = {}
        if hung or "error" in rep or "exit_code" not in rep:
            why = ("launcher hung" if hung else rep.get("error")
                   or f"launcher exited {proc.returncode} without a report")
            return Verdict("sandbox_error", None, None, stdout, stderr,
                           round(time.monotonic() - t_start, 4), 0.0, 0.0,
                           rep.get("isolation", "unknown"), why, truncated)
        return self._verdict(rep, stdout, stderr, over, truncated)

    def _verdict(self, rep: dict, stdout: str, stderr: str, over: bool,
                 truncated: bool) -> Verdict:
        code, sig, reason = rep["exit_code"], rep["signal"], rep["reason"]
        cpu = rep["cpu_s"]
        last = stderr.rstrip().rsplit("\n", 1)[-1] if stderr.strip() else ""
        if over:
            status, detail = "output_limit", f"output over {self.cap} bytes: killed"
        elif reason == "timeout":
            status, detail = "timeout", f"wall-clock limit of {self.cfg['timeout_s']:g}s"
        elif sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                       and cpu >= rep["cpu_limit_s"] - 0.05):
            status, detail = "timeout", f"CPU-time limit of {rep['cpu_limit_s']}s"
        elif reason == "memory":
            status, detail = "memory", (f"the program's processes used more than "
                                        f"{self.cfg['memory_mb']} MB in all: killed")
        elif code != 0 and (last.startswith("MemoryError") or "MemoryError" in last
                            or (sig is not None and "Cannot allocate memory" in stderr)):
            status, detail = "memory", f"out of memory (limit {self.cfg['memory_mb']} MB)"
        elif code == 0:
            status, detail = "ok", ""
        elif sig == signal.SIGKILL:
            status, detail = "killed", "killed by SIGKILL (not by the sandbox)"
        elif sig is not None:
            status, detail = "error", f"killed by signal {sig} ({signal.Signals(sig).name})"
        else:
            status, detail = "error", f"exit code {code}"
        return Verdict(status, code, sig, stdout, stderr, rep["wall_s"], cpu,
                       round(rep["max_rss_kb"] / 1024, 1), rep["isolation"], detail, truncated)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
