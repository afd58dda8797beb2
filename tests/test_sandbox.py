"""The sandbox against hostile programs: each is contained, gets a non-ok status (or ok with its
bad effect prevented), and the host is unharmed. Most run in the strongest mode the machine
allows; a smaller set checks the weaker fallback mode explicitly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from echolm.errors import EchoError
from echolm.sandbox import MODES, isolation, run_many, run_python

STRONG = isolation().split(":", 1)[0] in ("namespaces", "userns")
needs_namespaces = pytest.mark.skipif(not STRONG, reason="no namespaces on this machine")


def _can_unshare() -> bool:
    """Whether a root process here may create namespaces (then the sandbox must use them)."""
    if os.geteuid() != 0:
        return False
    import ctypes

    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        os._exit(0 if libc.unshare(0x40000000 | 0x00020000 | 0x20000000) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) == 0


@contextmanager
def tcp_server():
    """A real listening TCP server on localhost; yields (port, sees_connection())."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)

    def sees_connection() -> bool:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            return False
        conn.close()
        return True

    try:
        yield srv.getsockname()[1], sees_connection
    finally:
        srv.close()


def marked_processes(marker: str) -> list[int]:
    """Host processes whose name (comm) or command line contains `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/comm").read_text() + Path(
                f"/proc/{name}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            found.append(int(name))
    return found


# ---------------------------------------------------------------------------------------
# Ordinary programs


def test_isolation_mode_reported():
    mode = isolation().split(":", 1)[0]
    assert mode in MODES
    if _can_unshare():  # root with CAP_SYS_ADMIN (this project's machines): the strong mode
        assert mode == "namespaces", isolation()


def test_prints_and_exits_zero():
    v = run_python("print('hello')\nprint(2 + 3)")
    assert v.status == "ok" and v.ok and v.exit_code == 0 and v.signal is None
    assert v.stdout == "hello\n5\n" and v.stderr == ""
    assert 0 < v.wall_s < 5 and v.cpu_s >= 0 and v.max_rss_mb > 0
    assert v.isolation.startswith(MODES)


def test_exception_gives_traceback():
    v = run_python("def f(x):\n    return 1 / x\n\nf(0)\n")
    assert v.status == "error" and v.exit_code == 1
    assert 'File "main.py", line 2, in f' in v.stderr
    assert "ZeroDivisionError: division by zero" in v.stderr
    assert "<string>" not in v.stderr  # the bootstrap's own frames are not shown
    v = run_python("def f(:\n")
    assert v.status == "error" and "SyntaxError" in v.stderr


def test_exit_codes_and_builtins():
    assert run_python("import sys; sys.exit(3)").exit_code == 3
    assert run_python("exit(0)").status == "ok"  # exit/quit exist even without site
    v = run_python("quit(4)")
    assert v.status == "error" and v.exit_code == 4 and v.detail == "exit code 4"


def test_reads_stdin():
    v = run_python("import sys\nnums = [int(x) for x in sys.stdin.read().split()]\n"
                   "print(sum(nums))", stdin="1 2 3\n4\n")
    assert v.status == "ok" and v.stdout == "10\n"
    assert run_python("print(input())").status == "error"  # empty stdin: EOFError


def test_stdlib_only_and_hash_seed_fixed():
    code = "import json, re, math, itertools, collections, hashlib\nprint(hash('abc'))"
    a, b = run_python(code), run_python(code)
    assert a.status == "ok" and a.stdout == b.stdout  # PYTHONHASHSEED=0: deterministic
    assert run_python("import numpy").status == "error"  # no site-packages


def test_program_cannot_read_its_own_file():
    v = run_python("import os\nprint(os.path.exists('main.py'), os.listdir('.'))")
    assert v.status == "ok" and v.stdout.startswith("False")


def test_many_runs_in_parallel():
    codes = [f"import sys\nprint({i} * int(sys.stdin.read()))" for i in range(8)]
    verdicts = run_many(codes, stdins=[str(i) for i in range(8)], workers=2, timeout_s=10)
    assert [v.status for v in verdicts] == ["ok"] * 8
    assert [v.stdout for v in verdicts] == [f"{i * i}\n" for i in range(8)]


def test_bad_arguments():
    with pytest.raises(EchoError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(EchoError, match="memory_mb"):
        run_python("pass", memory_mb=1)
    with pytest.raises(EchoError, match="mode"):
        run_python("pass", mode="none")
    with pytest.raises(EchoError, match="stdins"):
        run_many(["pass"], stdins=["", ""])


# ---------------------------------------------------------------------------------------
# Hostile programs


def test_no_network():
    with tcp_server() as (port, sees_connection):
        v = run_python(
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "print('CONNECTED')\n")
        assert "CONNECTED" not in v.stdout and v.status == "error"
        assert not sees_connection()


def test_no_abstract_unix_socket_to_the_host():
    name = f"\0echolm-test-{uuid.uuid4().hex}"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(name)
    srv.listen(1)
    srv.settimeout(0.2)
    try:
        v = run_python(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({name!r})\n"
                       "print('CONNECTED')\n")
        assert "CONNECTED" not in v.stdout and v.status == "error"
        with pytest.raises(TimeoutError):
            srv.accept()
    finally:
        srv.close()


def test_cannot_write_outside_its_directory(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    loose = Path(f"/tmp/echolm-sandbox-pwned-{uuid.uuid4().hex}")
    v = run_python(
        "import os\n"
        f"for path in [{str(victim)!r}, {str(loose)!r}, '/usr/pwned', '/etc/pwned',\n"
        "             os.path.expanduser('~/../pwned')]:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, type(e).__name__)\n"
        "open('mine.txt', 'w').write('fine')\n"
        "print(open('mine.txt').read())\n")
    assert victim.read_text() == "original"
    assert not loose.exists()
    assert not Path("/usr/pwned").exists() and not Path("/etc/pwned").exists()
    if STRONG:  # the private /tmp accepts writes, but they never reach the host
        assert "WROTE /usr" not in v.stdout and "WROTE /etc" not in v.stdout
    assert v.status == "ok" and v.stdout.rstrip().endswith("fine")  # its own dir works


def test_cannot_see_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    token = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("SECRET_TOKEN", token)
    secret = tmp_path / "secret.txt"
    secret.write_text(token)
    secret.chmod(0o600)
    v = run_python(
        "import os\n"
        "print(dict(os.environ))\n"
        f"for path in ['/proc/1/environ', '/proc/self/environ', '/proc/{os.getpid()}/environ',\n"
        f"             '/root/.bashrc', {str(secret)!r}, os.path.expanduser('~/.bashrc')]:\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read()[:2000])\n"
        "    except OSError as e:\n"
        "        print('refused', path, type(e).__name__)\n")
    assert v.status == "ok", v.stderr
    assert token not in v.stdout and token not in v.stderr
    assert "SECRET_TOKEN" not in v.stdout
    assert "bashrc b'" not in v.stdout  # no readable ~/.bashrc of root


def test_fork_bomb_is_bounded():
    marker = f"bomb{uuid.uuid4().hex[:8]}"
    code = ("import os\n"
            "try:\n"
            "    import ctypes\n"
            f"    ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)\n"
            "except Exception:\n"
            "    pass\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")
    t0 = time.monotonic()
    v = run_python(code, timeout_s=1.0, max_procs=16)
    assert time.monotonic() - t0 < 6
    assert v.status in ("timeout", "error", "memory", "killed")
    time.sleep(0.1)
    assert marked_processes(marker) == []  # all gone: the host's process count is back


def test_memory_bomb():
    t0 = time.monotonic()
    v = run_python("x = bytearray(8 << 30)", memory_mb=256)
    assert v.status == "memory" and "MemoryError" in v.stderr
    v = run_python("chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 24))\n",
                   memory_mb=256, timeout_s=10)
    assert v.status == "memory"
    assert time.monotonic() - t0 < 8


@needs_namespaces
def test_memory_spread_over_processes_is_capped():
    """Each child stays under the per-process limit; their sum does not."""
    code = ("import os, time\n"
            "for _ in range(6):\n"
            "    if os.fork() == 0:\n"
            "        block = b'x' * (100 << 20)\n"
            "        time.sleep(30)\n"
            "time.sleep(30)\n")
    v = run_python(code, memory_mb=300, timeout_s=8)
    assert v.status == "memory", v
    assert v.wall_s < 7


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    v = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert v.status == "timeout" and "wall-clock" in v.detail
    assert 0.95 <= v.wall_s < 1.6
    assert time.monotonic() - t0 < 4


def test_sleep_counts_wall_clock():
    v = run_python("import time\ntime.sleep(60)", timeout_s=0.5)
    assert v.status == "timeout" and v.wall_s < 1.2


def test_huge_output_is_capped():
    v = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                   max_output_bytes=10_000)
    assert v.status == "output_limit" and v.truncated
    assert v.stdout == "x" * 10_000
    v = run_python("import sys\nwhile True:\n    print('e' * 1000, file=sys.stderr)\n",
                   max_output_bytes=5_000)
    assert v.status == "output_limit" and len(v.stderr) == 5_000


def test_cannot_signal_the_host():
    me = os.getpid()
    v = run_python(
        "import os, signal\n"
        f"for pid in (os.getppid(), {me}, 1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError as e:\n"
        "        print('refused', pid, type(e).__name__)\n"
        "try:\n"
        "    os.killpg(os.getpgid(0), signal.SIGTERM)\n"
        "except OSError:\n"
        "    pass\n"
        "print('still here')\n", timeout_s=3)
    assert v.status in ("ok", "error", "killed")
    os.kill(me, 0)  # we are alive (else we would not be here)


@needs_namespaces
def test_kill_everything_stays_inside():
    """kill(-1) signals every process the caller may: inside the sandbox only."""
    v = run_python("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('done')\n")
    assert v.status in ("ok", "killed", "error")


@needs_namespaces
def test_ctypes_tricks():
    marker = f"/tmp/echolm-ctypes-{uuid.uuid4().hex}"
    with tcp_server() as (port, sees_connection):
        shell = (f"echo pwned > {marker}; id; python3 -c "
                 f"\"import socket; socket.create_connection(('127.0.0.1', {port}))\"")
        v = run_python(f"import ctypes\nprint(ctypes.CDLL(None).system({shell.encode()!r}))",
                       timeout_s=5)
        assert not Path(marker).exists()
        assert not sees_connection()
        assert "uid=0(" not in v.stdout  # the shell did not run as root
    v = run_python("import ctypes\nctypes.string_at(0)\n")
    assert v.status == "error" and v.signal == signal.SIGSEGV
    assert "SIGSEGV" in v.detail


def test_subprocess_to_shell_and_curl():
    with tcp_server() as (port, sees_connection):
        v = run_python(
            "import subprocess\n"
            "for cmd in (['sh', '-c', 'id; cat /root/.bashrc; echo hi > /tmp/x'],\n"
            f"            ['curl', '-sm', '1', 'http://127.0.0.1:{port}/'],\n"
            f"            ['wget', '-qT', '1', 'http://127.0.0.1:{port}/']):\n"
            "    try:\n"
            "        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3)\n"
            "        print(cmd[0], r.returncode, r.stdout[:200])\n"
            "    except Exception as e:\n"
            "        print('refused', cmd[0], type(e).__name__)\n", timeout_s=8)
        assert not sees_connection()
    assert "uid=0(" not in v.stdout
    assert v.status in ("ok", "error")


def test_orphan_that_outlives_the_program_is_killed():
    marker = f"{time.time() % 1000:.0f}.{uuid.uuid4().int % 10**9:09d}"  # sleep's argument
    code = ("import os, time\n"
            "try:\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            "        if os.fork() == 0:\n"
            f"            os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            "        os._exit(0)\n"
            "except OSError as e:\n"
            "    print('refused', type(e).__name__)\n"
            "time.sleep(0.3)\n"
            "print('parent done')\n")
    t0 = time.monotonic()
    v = run_python(code, timeout_s=5)
    assert time.monotonic() - t0 < 4  # did not wait for the sleeper
    assert "parent done" in v.stdout
    time.sleep(0.1)
    assert marked_processes(marker) == []


SECCOMP = "seccomp (" in isolation()
needs_seccomp = pytest.mark.skipif(not SECCOMP, reason="no seccomp filter here: " + isolation())
UNSHARE_PROBE = """\
import ctypes, errno, os, platform
libc = ctypes.CDLL(None, use_errno=True)
def call(f, *args):
    r = f(*args)
    return errno.errorcode.get(ctypes.get_errno(), '?') if r == -1 else r
NEWUSER, NEWNS, SIGCHLD = 0x10000000, 0x00020000, 17
clone, clone3 = {'x86_64': 56, 'aarch64': 220}[platform.machine()], 435
print('status', open('/proc/self/status').read().split('Seccomp:')[1].split()[0])
print('unshare(0)', call(libc.unshare, 0))
print('unshare(NEWUSER)', call(libc.unshare, NEWUSER))
print('unshare(NEWUSER|NEWNS)', call(libc.unshare, NEWUSER | NEWNS))
print('clone(NEWUSER)', call(libc.syscall, clone, NEWUSER | SIGCHLD, 0, 0, 0, 0))
print('clone3', call(libc.syscall, clone3, 0, 88))
fd = os.open('/proc/self/ns/user', os.O_RDONLY)
print('setns', call(libc.setns, fd, 0))
print('ns unchanged', os.readlink('/proc/self/ns/user') == os.readlink('/proc/1/ns/user'))
"""


@needs_seccomp
def test_no_user_namespaces_inside():
    """A hostile program tries every way to a new user namespace (ctypes, since
    os.unshare needs Python 3.12): all refused with EPERM by the filter, which is in force
    (Seccomp: 2); clone3, whose flags a filter cannot read, says ENOSYS."""
    v = run_python(UNSHARE_PROBE, timeout_s=5)
    assert v.status == "ok", v
    assert v.stdout.splitlines() == [
        "status 2", "unshare(0) 0", "unshare(NEWUSER) EPERM", "unshare(NEWUSER|NEWNS) EPERM",
        "clone(NEWUSER) EPERM", "clone3 ENOSYS", "setns EPERM", "ns unchanged True"], v.stdout
    # and the util-linux tool, as a subprocess of the program
    v = run_python("import subprocess\n"
                   "try:\n"
                   "    r = subprocess.run(['unshare', '-U', 'id'], capture_output=True, "
                   "text=True)\n"
                   "    print(r.returncode, r.stderr.strip())\n"
                   "except FileNotFoundError:\n"
                   "    print('no unshare')\n", timeout_s=5)
    assert v.status == "ok", v
    if shutil.which("unshare"):  # the sandbox sees the host's /usr
        assert v.stdout == "1 unshare: unshare failed: Operation not permitted\n", v.stdout
    assert "seccomp (" in run_python("pass", mode="fallback").isolation


@needs_seccomp
def test_filter_keeps_threads_fork_and_subprocess():
    v = run_python("import os, subprocess, threading\n"
                   "from concurrent.futures import ThreadPoolExecutor\n"
                   "with ThreadPoolExecutor(4) as pool:\n"
                   "    print(sum(pool.map(lambda x: x * x, range(100))))\n"
                   "pid = os.fork()\n"
                   "if pid == 0:\n"
                   "    os._exit(7)\n"
                   "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
                   "print(subprocess.run(['sh', '-c', 'echo $((6 * 7))'], capture_output=True,"
                   " text=True).stdout.strip())\n", timeout_s=5)
    assert (v.status, v.stdout) == ("ok", "328350\n7\n42\n"), v


def test_no_uid_lock_files_left():
    """Each run locks its uid with a file in the launcher's lock directory; none is left
    after the run, stale ones (a launcher killed mid-run) are swept, held ones are not."""
    from echolm._sandbox_launcher import LOCK_DIR

    if "; uid " not in isolation():  # only root hands out a fresh uid per run (and locks it)
        pytest.skip("no fresh uid per run here (not root): no lock files: " + isolation())
    import fcntl

    lockdir = Path(LOCK_DIR)
    stale = lockdir / f"stale-{uuid.uuid4().hex}.lock"
    held = lockdir / f"held-{uuid.uuid4().hex}.lock"
    stale.write_text("")
    fd = os.open(held, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        verdicts = run_many(["print(1)"] * 4, workers=2)
        assert all(v.status == "ok" for v in verdicts), verdicts
        uids = {v.isolation.split("; uid ", 1)[1].split()[0] for v in verdicts}
        assert len(uids) >= 2  # fresh uids: not one shared (then nothing would be locked)
        assert [u for u in uids if (lockdir / f"{u}.lock").exists()] == []
        assert not stale.exists()  # nobody held it: swept
        assert held.exists()  # someone holds it: left alone
    finally:
        os.close(fd)
        held.unlink()


# ---------------------------------------------------------------------------------------
# The weaker fallback mode (forced): what it still stops


def test_fallback_mode_blocks_the_obvious(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    token = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("SECRET_TOKEN", token)
    loose = Path(f"/tmp/echolm-fallback-pwned-{uuid.uuid4().hex}")
    assert run_python("print(1)", mode="fallback").isolation.startswith("fallback")
    with tcp_server() as (port, sees_connection):
        programs = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"open({str(loose)!r}, 'w').write('x')",
            "print(open('/root/.bashrc').read())",
            "import subprocess\nsubprocess.run(['true'])",
            "import os\nos.system('true')",
            "import ctypes",
            "import os\nos.fork()",
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        ]
        verdicts = run_many(programs, mode="fallback", timeout_s=5)
        assert [v.status for v in verdicts] == ["error"] * len(programs), verdicts
        assert all("PermissionError: sandbox:" in v.stderr for v in verdicts)
        assert not sees_connection()
    assert not loose.exists()
    v = run_python("import os\nprint(dict(os.environ))\nopen('a.txt', 'w').write('ok')\n"
                   "print(open('a.txt').read())", mode="fallback")
    assert v.status == "ok" and token not in v.stdout and v.stdout.endswith("ok\n")
    v = run_python("while True:\n    pass", mode="fallback", timeout_s=0.5)
    assert v.status == "timeout"
    assert run_python("x = bytearray(4 << 30)", mode="fallback").status == "memory"


# ---------------------------------------------------------------------------------------
# The command line


def test_cli_sandbox(tmp_path: Path, echolm_cli):
    good = tmp_path / "good.py"
    good.write_text("print('hi from the sandbox')\n")
    r = echolm_cli("sandbox", good, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "ok" and out["stdout"] == "hi from the sandbox\n"
    assert out["isolation"].split(":")[0] in MODES
    bad = tmp_path / "loop.py"
    bad.write_text("while True:\n    pass\n")
    r = echolm_cli("sandbox", bad, "--timeout", "0.5", "--memory-mb", "128", timeout=60)
    assert r.returncode == 1 and "timeout" in r.stderr
    r = echolm_cli("sandbox", tmp_path / "missing.py", timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.py" in r.stderr
    assert "Traceback" not in r.stderr
