"""The sandbox's launcher and bootstrap (see echolm/sandbox.py and docs/sandbox.md).

Runs as ``python -I -S THIS_FILE CFG_FD STATUS_FD CONTROL_FD``, as the host's user (root on
this project's machines), once per program: reads the run's settings (marshal) from CFG_FD,
picks the strongest isolation that works, forks the program's process, enforces the
wall-clock limit and the total-memory cap, kills the program when the host closes
CONTROL_FD, reaps everything the program started and writes a report (marshal) to
STATUS_FD. Standard library only, and only cheap modules at import time: it starts once per
program, so every millisecond of import is paid thousands of times in an RL run.
"""

from __future__ import annotations

import errno
import marshal
import os
import select
import signal
import sys
import time

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_HOME = "/tmp"  # inside the namespaces; the fallback uses a fresh host directory
PYTHON_FLAGS = ("-s", "-S", "-P")  # no user site, no site-packages, no script dir on sys.path
DYNAMIC_UIDS = (61184, 65519)  # systemd's range for dynamic users: never a real account
WATCH_INTERVAL_S = 0.1  # how often the total memory of the program's processes is summed

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
# SECBIT_NOROOT, SECBIT_NO_SETUID_FIXUP, SECBIT_KEEP_CAPS off, and all three locked.
SECUREBITS_NO_ROOT = 0x01 | 0x02 | 0x04 | 0x08 | 0x20
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
SYS_MOUNT_SETATTR = 442  # the same on every architecture (Linux >= 5.12)
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = -100, 0x8000, 1, 2
LOCK_DIR = "/run/echolm-sandbox"  # root-only; one NNNNN.lock per uid in use, removed after
RO_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                               ctypes.c_ulong, ctypes.c_char_p]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.unshare.argtypes = [ctypes.c_int]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                               ctypes.c_ulong]
        libc.syscall.restype = ctypes.c_long
        _libc_handle = libc
    return _libc_handle


def _ok(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _ok(_libc().mount(_b(src), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def _prctl(option: int, arg: int = 0, arg2: int = 0) -> None:
    _ok(_libc().prctl(option, arg, arg2, 0, 0), f"prctl {option}")


def _unshare(flags: int) -> None:
    _ok(_libc().unshare(flags), "unshare")


def main(argv: list[str]) -> None:
    cfg_fd, status_fd, control_fd = (int(a) for a in argv)
    with os.fdopen(cfg_fd, "rb") as f:
        cfg = marshal.loads(f.read())
    launcher = _Launcher(cfg, control_fd)
    try:
        report = launcher.run()
    except Exception as e:  # a setup failure: reported, never a traceback on the host
        report = {"error": f"sandbox setup failed: {type(e).__name__}: {e}"}
    finally:
        launcher.release_uid()  # before the report: when the host has it, no lock file is left
    with os.fdopen(status_fd, "wb") as f:
        f.write(marshal.dumps(report))
    os._exit(0)


class _Launcher:
    def __init__(self, cfg: dict, control_fd: int) -> None:
        self.cfg, self.control_fd = cfg, control_fd
        self.root = os.geteuid() == 0
        self.uid: int | None = None  # the sandbox's own uid, when we can switch to one
        self.mode = "fallback"
        self.notes: list[str] = []
        self.workdir: str | None = None
        self.cpu_limit = int(cfg["timeout_s"]) + 2
        self._uid_lock: tuple[int, str] | None = None  # (fd, path) of the held uid lock
        self.seccomp = _seccomp_filter(os.uname().machine)  # None: cannot filter here

    # -- setup ---------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        try:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of the program come back to us
        except OSError:
            pass
        if self.root:
            self.uid = self._reserve_uid()
        if self.seccomp is None:
            self.notes.append(f"no seccomp filter ({os.uname().machine}, {sys.byteorder}-endian"
                              " is not supported): user namespaces are not blocked")
        elif _libc().prctl(PR_GET_SECCOMP, 0, 0, 0, 0) < 0:  # kernel without CONFIG_SECCOMP
            self.seccomp = None
            self.notes.append("no seccomp in this kernel: user namespaces are not blocked")
        if cfg["mode"] == "auto":
            self._enter_namespaces()
        if self.mode == "fallback":
            import tempfile

            self.workdir = tempfile.mkdtemp(prefix="echolm-sandbox-")
            if self.uid is not None:
                if self._uid_can_run_python():
                    os.chown(self.workdir, self.uid, self.uid)
                else:
                    self.notes.append(f"interpreter {cfg['python']} not reachable by an "
                                      "unprivileged uid: running as root without "
                                      "capabilities")
                    self.uid = None
        stdin_fd = os.memfd_create("stdin")
        os.write(stdin_fd, cfg["stdin"].encode())
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: set up, drop privileges, exec; never returns
            try:
                os.close(err_r)
                self._child(stdin_fd, err_w)
            except BaseException as e:
                try:
                    os.write(err_w, f"{type(e).__name__}: {e}".encode()[:4000])
                finally:
                    os._exit(127)
        os.close(err_w)
        os.close(stdin_fd)
        failure = b""
        while chunk := os.read(err_r, 4096):  # EOF when the child's exec succeeds
            failure += chunk
        os.close(err_r)
        if failure:
            os.waitpid(pid, 0)
            self._cleanup(pid)
            return {"error": "sandbox setup failed: " + failure.decode("utf-8", "replace"),
                    "isolation": self.description()}
        # From here the program runs. Our own stdout/stderr must not keep the host's pipes
        # open: the host reads to EOF, which then means "every sandboxed process is gone".
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        t0 = time.monotonic()
        reason = self._wait(pid, t0)
        _, status, ru = os.wait4(pid, 0)
        wall = time.monotonic() - t0
        self._cleanup(pid)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        return {"exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "signal": sig, "reason": reason, "wall_s": round(wall, 4),
                "cpu_s": round(ru.ru_utime + ru.ru_stime, 4), "max_rss_kb": ru.ru_maxrss,
                "cpu_limit_s": self.cpu_limit, "isolation": self.description()}

    def _reserve_uid(self) -> int | None:
        """A uid no account and no running process has, locked for the life of this run
        (`release_uid` removes the lock file)."""
        import pwd

        lockdir = LOCK_DIR
        try:
            os.makedirs(lockdir, mode=0o700, exist_ok=True)
            st = os.lstat(lockdir)
            if st.st_uid != 0 or st.st_mode & 0o077 or not os.path.isdir(lockdir):
                raise OSError(f"{lockdir} is not a private root-owned directory")
        except OSError as e:
            self.notes.append(f"no uid lock directory ({e}); using nobody (65534)")
            return 65534
        _sweep_locks(lockdir)
        busy = {_owner(pid) for pid in _pids()}
        low, high = DYNAMIC_UIDS
        for _ in range(64):
            uid = low + int.from_bytes(os.urandom(4), "little") % (high - low + 1)
            if uid in busy:
                continue
            try:
                pwd.getpwuid(uid)
                continue
            except KeyError:
                pass
            path = f"{lockdir}/{uid}.lock"
            fd = _try_lock(path, create=True)
            if fd is None:
                continue
            self._uid_lock = (fd, path)
            return uid
        self.notes.append("no free dynamic uid; using nobody (65534)")
        return 65534

    def release_uid(self) -> None:
        """Remove the uid's lock file, then let go of the lock (in that order: see
        `_try_lock`). Once the program's processes are gone, the uid is free again."""
        if self._uid_lock is not None:
            fd, path = self._uid_lock
            self._uid_lock = None
            _unlock(fd, path)

    def _enter_namespaces(self) -> None:
        common = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if self.root:
            try:
                _unshare(common)
                self.mode = "namespaces"
                return
            except OSError as e:
                self.notes.append(f"namespaces unavailable ({e.strerror})")
        uid, gid = os.getuid(), os.getgid()
        try:
            _unshare(common | CLONE_NEWUSER)
        except OSError as e:
            self.notes.append(f"user namespaces unavailable ({e.strerror})")
            return
        for path, text in (("/proc/self/setgroups", "deny"),
                           ("/proc/self/uid_map", f"0 {uid} 1"),
                           ("/proc/self/gid_map", f"0 {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
        self.mode, self.uid = "userns", None

    def _uid_can_run_python(self) -> bool:
        """Whether the sandbox uid could exec the interpreter and read its stdlib."""
        exe = self.cfg["python"]
        landmark = os.path.join(os.path.dirname(os.__file__), "os.py")
        os.setegid(self.uid)
        os.seteuid(self.uid)
        try:
            return (os.access(exe, os.X_OK, effective_ids=True)
                    and os.access(landmark, os.R_OK, effective_ids=True))
        finally:
            os.seteuid(0)
            os.setegid(0)

    # -- the child -----------------------------------------------------------------------
    def _child(self, stdin_fd: int, err_w: int) -> None:
        cfg = self.cfg
        if self.mode == "fallback":
            workdir = self.workdir
            _write_program(os.path.join(workdir, "main.py"), cfg["code"], self.uid)
        else:
            workdir = SANDBOX_HOME
            self._build_root()
        os.setsid()  # own session and process group: kill(0) reaches only the program
        self._set_rlimits()
        if self.uid is not None:
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)  # drops every capability
        elif self.root or self.mode == "userns":
            _drop_capabilities()
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if self.seccomp is not None:  # needs no_new_privs (or root); last namespace change done
            _install_seccomp(self.seccomp)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        os.dup2(stdin_fd, 0)
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 65536)
        os.chdir(workdir)
        env = {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        audit = "1" if self.mode == "fallback" else "0"
        exe = cfg["python"]
        os.execve(exe, [exe, *PYTHON_FLAGS, "-c", _BOOTSTRAP, "main.py", audit], env)

    def _build_root(self) -> None:
        """Pid 1 of the new pid namespace: a private mount namespace whose root holds only
        read-only system directories, the interpreter, a few devices, /proc and /tmp."""
        cfg = self.cfg
        _unshare(CLONE_NEWNS)  # nested: pivot_root must not move the launcher too
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        new = "/tmp" if os.path.isdir("/tmp") else "/mnt"
        _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=0755")
        binds = [d for d in RO_DIRS if os.path.lexists(d)]
        for extra in _python_dirs(cfg["python"]):
            if not any(extra == d or extra.startswith(d + "/") for d in binds):
                binds.append(extra)
        for path in binds:
            dst = new + path
            if os.path.islink(path) and path.count("/") == 1:  # /bin -> usr/bin
                os.symlink(os.readlink(path), dst)
                continue
            os.makedirs(dst, exist_ok=True)
            _mount(path, dst, None, MS_BIND | MS_REC)
            _make_readonly(dst, path)
        os.makedirs(new + "/dev")
        for name in DEVICES:
            if os.path.exists(f"/dev/{name}"):
                open(f"{new}/dev/{name}", "w").close()
                _mount(f"/dev/{name}", f"{new}/dev/{name}", None, MS_BIND)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{new}/dev/{name}")
        os.makedirs(new + "/dev/shm")
        _mount("tmpfs", new + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
               "size=16m,nr_inodes=256,mode=1777")
        os.makedirs(new + "/proc")
        try:
            _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as e:
            self.notes.append(f"no /proc ({e.strerror})")
        os.makedirs(new + "/tmp")
        owner = self.uid if self.uid is not None else 0
        _mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700,uid={owner},gid={owner}")
        _write_program(new + "/tmp/main.py", cfg["code"], self.uid)
        os.chdir(new)
        machine = os.uname().machine
        if machine in SYS_PIVOT_ROOT:
            _ok(_libc().syscall(SYS_PIVOT_ROOT[machine], b".", b"."), "pivot_root")
            _ok(_libc().umount2(b".", MNT_DETACH), "umount old root")
        else:  # without pivot_root: chroot, which an unprivileged process cannot leave
            os.chroot(".")
        os.chdir("/")
        _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        try:
            import socket

            socket.sethostname("sandbox")
        except OSError:
            pass

    def _set_rlimits(self) -> None:
        import resource

        cfg = self.cfg
        mb = 1 << 20
        limits = [(resource.RLIMIT_CPU, self.cpu_limit, self.cpu_limit + 1),
                  (resource.RLIMIT_AS, cfg["memory_mb"] * mb, cfg["memory_mb"] * mb),
                  (resource.RLIMIT_NPROC, cfg["max_procs"], cfg["max_procs"]),
                  (resource.RLIMIT_NOFILE, cfg["max_open_files"], cfg["max_open_files"]),
                  (resource.RLIMIT_FSIZE, cfg["max_file_bytes"], cfg["max_file_bytes"]),
                  (resource.RLIMIT_CORE, 0, 0),
                  (resource.RLIMIT_MEMLOCK, 0, 0)]
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))

    # -- waiting and cleaning up -----------------------------------------------------------
    def _wait(self, pid: int, t0: float) -> str | None:
        """Wait for the program; kill it at the deadline, when the host asks (it closed the
        control pipe) or when its processes use too much memory. Returns why we killed."""
        deadline = t0 + self.cfg["timeout_s"]
        try:
            waitfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            waitfd = None
        limit_kb = self.cfg["memory_mb"] * 1024
        match = self._matcher(pid)
        next_watch = t0 + WATCH_INTERVAL_S
        fds = [self.control_fd] + ([waitfd] if waitfd is not None else [])
        reason = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                reason = "timeout"
                break
            step = min(deadline, next_watch) - now
            ready, _, _ = select.select(fds, [], [], step if waitfd is not None
                                        else min(step, 0.01))
            if waitfd in ready or (waitfd is None and os.waitid(
                    os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None):
                break
            if self.control_fd in ready:
                reason = "host"
                break
            if time.monotonic() >= next_watch:
                next_watch += WATCH_INTERVAL_S
                if sum(_rss_kb(p) for p in _pids() if match(p)) > limit_kb:
                    reason = "memory"
                    break
        if waitfd is not None:
            os.close(waitfd)
        if reason is not None:
            self._kill_program(pid)
        return reason

    def _matcher(self, pid: int):
        """Which processes are the program's: same pid namespace, else same uid, else the
        same process group (the program can leave that one by calling setsid)."""
        if self.mode != "fallback":
            try:
                ns = os.readlink(f"/proc/{pid}/ns/pid")
                return lambda p: _readlink(f"/proc/{p}/ns/pid") == ns and p != os.getpid()
            except OSError:
                pass
        if self.uid is not None:
            uid = self.uid
            return lambda p: _proc_uid(p) == uid
        return lambda p: _pgid(p) == pid

    def _kill_program(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)  # in a pid namespace this takes every process down
        except ProcessLookupError:
            pass
        if self.mode == "fallback":
            _killpg(pid)

    def _cleanup(self, pid: int) -> None:
        """Kill whatever the program left running and reap it; remove the work directory."""
        if self.mode == "fallback":
            _killpg(pid)
            if self.uid is not None:
                for _ in range(100):
                    if not any(_proc_uid(p) == self.uid for p in _pids()):
                        break
                    _kill_all_of_uid(self.uid)
                    _reap_all()
                    time.sleep(0.01)
        _reap_all()
        if self.workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    def description(self) -> str:
        c = self.cfg
        limits = (f"rlimits cpu={self.cpu_limit}s as={c['memory_mb']}MB nproc={c['max_procs']} "
                  f"nofile={c['max_open_files']} fsize={c['max_file_bytes']}B core=0; "
                  f"total-memory watchdog {c['memory_mb']}MB")
        who = (f"uid {self.uid} (unprivileged, no capabilities)" if self.uid is not None
               else "caller's uid, no capabilities" if self.mode == "userns"
               else "root without capabilities" if self.root else "caller's uid")
        if self.seccomp is not None:
            who += "; seccomp (no new user namespaces, no setns)"
        if self.mode == "fallback":
            text = (f"fallback: no namespaces; {who}; temporary work directory; audit hook "
                    f"(sockets, subprocesses, signals, ctypes, files outside the work "
                    f"directory and stdlib; bypassable); no_new_privs; {limits}")
        else:
            text = (f"{self.mode}: network (none), mount (read-only /usr /lib /etc + "
                    f"interpreter, private /tmp {c['disk_mb']}MB, fresh /proc), pid, ipc, uts "
                    f"namespaces; {who}; no_new_privs; {limits}")
        if self.notes:
            text += "; notes: " + "; ".join(self.notes)
        return text


def _python_dirs(exe: str) -> list[str]:
    """Directories the interpreter needs besides the system ones: its prefix and bin dir."""
    dirs = []
    for d in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(exe)):
        d = os.path.realpath(d)
        if d != "/" and d not in dirs:
            dirs.append(d)
    return dirs


def _make_readonly(dst: str, src: str) -> None:
    import ctypes

    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    if _libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, _b(dst), AT_RECURSIVE, ctypes.byref(attr),
                       ctypes.sizeof(attr)) == 0:
        return
    # Older kernels: remount the top mount read-only, keeping the flags that are locked.
    st = os.statvfs(src)
    keep = 0
    for st_flag, ms_flag in ((os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                             (os.ST_RELATIME, MS_RELATIME)):
        if st.f_flag & st_flag:
            keep |= ms_flag
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


def _drop_capabilities() -> None:
    """No capabilities now or after exec, even as (namespace) root."""
    _prctl(PR_SET_SECUREBITS, SECUREBITS_NO_ROOT)
    for cap in range(64):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break


def _try_lock(path: str, create: bool = False) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another launcher holds it.
    A holder removes the file before it lets go, so a lock taken on a file that was removed
    meanwhile (its inode is no longer the one at `path`) is worthless: given back."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0), 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _unlock(fd: int, path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def _sweep_locks(lockdir: str) -> None:
    """Remove lock files nobody holds: those of launchers killed before `release_uid`."""
    try:
        names = os.listdir(lockdir)
    except OSError:
        return
    for name in names:
        if name.endswith(".lock"):
            path = f"{lockdir}/{name}"
            fd = _try_lock(path)
            if fd is not None:
                _unlock(fd, path)


def _write_program(path: str, code: str, uid: int | None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(code)
    if uid is not None:
        os.chown(path, uid, uid)


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _owner(pid: int) -> int | None:
    """The owner of /proc/PID: the process's uid (root for a non-dumpable one); one stat."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _proc_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _kill_all_of_uid(uid: int) -> None:
    """kill(-1) as `uid`: every process of that uid, wherever it went (setsid, double fork)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)


# ---------------------------------------------------------------------------------------
# The seccomp filter: the program may not create user namespaces (or join namespaces).
#
# Why: an unprivileged process may normally create a user namespace and be "root" in it,
# which opens kernel code otherwise reachable only by root (mounting filesystems, netfilter,
# ...); most recent container escapes through kernel bugs start there. The program needs
# none of it, and the launcher has set up all its own namespaces before the filter goes in.
# It is a deny-list of four calls, not an allow-list: threads, subprocesses and the whole
# standard library work as before. Built by hand with struct and ctypes because the launcher
# is standard library only (no libseccomp); installed with prctl(PR_SET_SECCOMP), which an
# unprivileged process may do once no_new_privs is set. Filters are inherited by every child
# and cannot be removed.

PR_GET_SECCOMP, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 21, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
# struct seccomp_data: int nr @0, u32 arch @4, u64 instruction_pointer @8, u64 args[6] @16
SECCOMP_NR, SECCOMP_ARCH, SECCOMP_ARG0_LOW = 0, 4, 16  # ARG0_LOW: little-endian only
X32_SYSCALL_BIT = 0x40000000
# machine: AUDIT_ARCH_* and the numbers of unshare, clone, clone3, setns (they differ by
# architecture; those not listed run without the filter, and `isolation` says so)
SECCOMP_ARCHES = {"x86_64": (0xC000003E, 272, 56, 435, 308),
                  "aarch64": (0xC00000B7, 97, 220, 435, 268)}


def _seccomp_filter(machine: str) -> bytes | None:
    """The BPF program (struct sock_filter[]) for `machine`, or None where we have no table."""
    if machine not in SECCOMP_ARCHES or sys.byteorder != "little":
        return None
    import struct

    arch, unshare, clone, clone3, setns = SECCOMP_ARCHES[machine]
    # (label, opcode, k, jump-if-true label, jump-if-false label); None = next instruction
    prog = [
        # Syscalls of another ABI (i386's int 0x80 on x86_64) have other numbers, which
        # would slip past the checks below: refused, no Python program makes them.
        (None, BPF_LD_W_ABS, SECCOMP_ARCH, None, None),
        (None, BPF_JEQ_K, arch, None, "deny"),
        (None, BPF_LD_W_ABS, SECCOMP_NR, None, None),
        # x32 shares x86_64's arch value and numbers its calls with this bit set: refused.
        (None, BPF_JGE_K, X32_SYSCALL_BIT, "deny", None),
        # unshare(flags) and clone(flags, ...): only the CLONE_NEWUSER flag is refused.
        (None, BPF_JEQ_K, unshare, "flags", None),
        (None, BPF_JEQ_K, clone, "flags", None),
        # clone3 passes its flags in memory, which a filter cannot read: "not implemented"
        # makes libc fall back to clone (threads, fork, posix_spawn), whose flags we check.
        (None, BPF_JEQ_K, clone3, "enosys", None),
        # setns: entering another namespace (it needs privileges anyway; never needed).
        (None, BPF_JEQ_K, setns, "deny", None),
        (None, BPF_RET_K, SECCOMP_RET_ALLOW, None, None),
        # the kernel reads only the low 32 bits of the clone/unshare flags
        ("flags", BPF_LD_W_ABS, SECCOMP_ARG0_LOW, None, None),
        (None, BPF_JSET_K, CLONE_NEWUSER, "deny", None),
        (None, BPF_RET_K, SECCOMP_RET_ALLOW, None, None),
        ("deny", BPF_RET_K, SECCOMP_RET_ERRNO | errno.EPERM, None, None),
        ("enosys", BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS, None, None),
    ]
    where = {label: i for i, (label, *_) in enumerate(prog) if label}

    def jump(i: int, label: str | None) -> int:  # BPF jumps are relative to the next one
        return 0 if label is None else where[label] - i - 1

    return b"".join(struct.pack("=HBBI", op, jump(i, jt), jump(i, jf), k)
                    for i, (_, op, k, jt, jf) in enumerate(prog))


def _install_seccomp(program: bytes) -> None:
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


# ---------------------------------------------------------------------------------------
# The bootstrap: runs inside the sandbox as `python -s -S -P -c _BOOTSTRAP main.py AUDIT`.
# It reads and deletes main.py (so the program cannot read test code appended to it), gives
# the program `exit`/`quit` (site is not loaded), optionally installs the audit hook, and
# runs the program as __main__ with tracebacks that start at the program's own frames.

_BOOTSTRAP = r'''
import sys
def _bootstrap():
    import builtins, os
    path, audit = sys.argv[1], sys.argv[2] == "1"
    sys.argv = [path]
    with open(path, encoding="utf-8") as f:
        src = f.read()
    os.unlink(path)
    builtins.exit = builtins.quit = sys.exit
    module = type(sys)("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    def show(e):
        import linecache, traceback
        linecache.cache[path] = (len(src), None, src.splitlines(True), path)
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        sys.stderr.flush()
    try:
        code = compile(src, path, "exec")
    except SyntaxError as e:
        show(e)
        return 1
    if audit:
        _install_audit_hook(os.getcwd())
    try:
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        show(e)
        return 1
    return 0

def _install_audit_hook(workdir):
    import os
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn",
               "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.pidfd",
               "ctypes.", "pty.", "sys._current_frames", "gc.get_referrers",
               "gc.get_referents", "gc.get_objects", "os.setns", "os.unshare")
    modules = {"_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_socket", "mmap"}
    write_events = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink",
                    "os.link", "os.chmod", "os.chown", "os.truncate", "os.utime",
                    "os.chflags", "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr")
    read_roots = tuple({os.path.realpath(p) for p in (workdir, sys.prefix, sys.base_prefix,
                                                     sys.exec_prefix, sys.base_exec_prefix)})
    devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full")
    realpath, fspath, join = os.path.realpath, os.fspath, os.path.join
    def under(path, roots):
        if isinstance(path, int):
            return True  # an fd we already hold
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        p = realpath(join(workdir, path))
        return p in devices or any(p == r or p.startswith(r + "/") for r in roots)
    def hook(event, args):
        if event == "import" and args and args[0] in modules:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event.startswith(blocked) or event == "object.__setattr__" and args and (
                args[0] is hook or getattr(args[0], "__name__", "") == "under"):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[0] is not None:
            mode, flags = args[1], args[2]
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if not under(args[0], (workdir,) if writing else read_roots):
                raise PermissionError(f"sandbox: no access to {args[0]!r}")
        elif event in write_events:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not under(a, (workdir,)):
                    raise PermissionError(f"sandbox: {event} outside the work directory")
        elif event in ("os.listdir", "os.scandir", "os.chdir") and args and args[0] \
                is not None and not under(args[0], read_roots):
            raise PermissionError(f"sandbox: {event} outside the work directory")
    sys.addaudithook(hook)

sys.exit(_bootstrap())
'''


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
