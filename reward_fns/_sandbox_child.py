"""In-sandbox side of ``reward_fns.code``: isolate, drop privileges, run one test, report.

Run by the grader as ``python -I -B _sandbox_child.py CONFIG_FD STATUS_FD RESULT_FD`` in a fresh
session. Standard library only, Linux only. Three processes, so that the one that runs untrusted
code is never the one that supervises it:

- L (launcher, this script's main process): creates new network / mount / pid namespaces where
  the OS permits (root, or an unprivileged user namespace), gives the sandbox its own ``/tmp``,
  forks C and relays nothing but its lifetime.
- C (supervisor; init of the new pid namespace when there is one): forks G, enforces the
  wall-clock deadline, then kills and reaps every process left in the sandbox and writes the
  trusted status record (G has no access to that file descriptor).
- G (the program): resource limits, ``no_new_privs``, unprivileged uid, runs the candidate.

Why not ``subprocess``'s ``preexec_fn``: it is unsafe in threaded parents (verl grades from a
thread pool), and dropping to another uid needs the namespace and mount setup done first.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
import resource
import signal
import stat
import sys
import threading
import traceback

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_MOVE = 8192
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_SYS_MOUNT_SETATTR = 442  # same number on x86_64 and the generic table (aarch64, riscv)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 1
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable: the sandbox instead

# Exit code of G when its own setup failed; the grader learns of it from the status record.
SETUP_FAILED = 97

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _set_readonly(path: str, readonly: bool, recursive: bool) -> bool:
    """mount_setattr(2) (Linux 5.12+): the only way to make a whole mount tree read-only at once."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else _MOUNT_ATTR_RDONLY, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    long = ctypes.c_long  # syscall(2) is variadic: pass every integer at full register width
    args = (long(_AT_FDCWD), ctypes.c_char_p(path.encode()), long(flags), ctypes.byref(attr), long(ctypes.sizeof(attr)))
    return _libc.syscall(long(_SYS_MOUNT_SETATTR), *args) == 0


def _blocked_ancestor(path: str) -> str | None:
    """Top-most directory on ``path`` that an unrelated uid cannot search (no o+x), if any."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    current = ""
    for part in parts:
        current = f"{current}/{part}"
        try:
            if not os.stat(current).st_mode & stat.S_IXOTH:
                return current
        except OSError:
            return None
    return None


def _expose_interpreter(sandbox: str) -> None:
    """Keep the interpreter importable for the sandbox uid when it lives under a private directory.

    Example: pyenv under ``/root`` (mode 0700). In our private mount namespace the private
    directory is replaced by an empty tmpfs into which only the interpreter's directories are
    bind-mounted back at their original paths, so ``sys.path`` stays valid and the rest of the
    private directory stays hidden.
    """
    needed = {p for p in sys.path if os.path.isdir(p)}
    needed.add(os.path.dirname(os.path.realpath(sys.executable)))
    by_ancestor: dict[str, list[str]] = {}
    for p in needed:
        top = _blocked_ancestor(p)
        if top is not None:
            by_ancestor.setdefault(top, []).append(os.path.realpath(p))
    for i, (top, paths) in enumerate(sorted(by_ancestor.items())):
        paths = [p for p in sorted(set(paths)) if not any(p.startswith(q + "/") for q in paths if q != p)]
        stages = []
        for j, p in enumerate(paths):
            stage = os.path.join(sandbox, f".stage{i}_{j}")
            os.mkdir(stage, 0o700)
            _mount(p, stage, None, _MS_BIND | _MS_REC)
            stages.append(stage)
        _mount("tmpfs", top, "tmpfs", 0, "mode=755")
        for p, stage in zip(paths, stages):
            os.makedirs(p, 0o755, exist_ok=True)
            _mount(stage, p, None, _MS_MOVE)
            os.rmdir(stage)


def _isolate_namespaces(cfg: dict) -> dict:
    """L: new net/mount/pid namespaces, a read-only filesystem with a private /tmp.

    Returns what was achieved. The read-only root matters because the sandbox uid can still write
    wherever "others" may (e.g. ``/run/lock``): everything but the sandbox directory, bound over
    ``_PRIVATE_DIRS``, becomes read-only in this mount namespace only.
    """
    flags = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID
    facts = {
        "network_isolated": False,
        "pid_namespace": False,
        "private_tmp": False,
        "readonly_root": False,
        "user_namespace": False,
    }
    if os.geteuid() == 0 and _unshare(flags):
        pass
    elif _unshare(flags | _CLONE_NEWUSER):
        facts["user_namespace"] = True
    else:
        return facts
    facts["network_isolated"] = facts["pid_namespace"] = True
    sandbox = os.getcwd()
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    if cfg["uid"] is not None:
        _expose_interpreter(sandbox)
    private = [d for d in _PRIVATE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    for target in private:
        _mount("/proc/self/cwd", target, None, _MS_BIND)  # the sandbox, even once /tmp is covered
    os.chdir("/tmp")  # the sandbox, now under the path programs expect to write to
    facts["private_tmp"] = True
    if _set_readonly("/", True, recursive=True):
        facts["readonly_root"] = all(_set_readonly(d, False, recursive=False) for d in private)
        if not facts["readonly_root"]:
            raise OSError(ctypes.get_errno(), "could not make the sandbox directory writable again")
    return facts


def _limit(which: int, soft: int, hard: int | None = None) -> None:
    """setrlimit that never asks for more than the current hard limit (non-root cannot raise it)."""
    _, cur_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(which, (soft, hard))


def _set_limits(cfg: dict) -> None:
    lim = cfg["limits"]
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1)  # SIGXCPU, then SIGKILL
    _limit(resource.RLIMIT_AS, lim["memory_bytes"])
    _limit(resource.RLIMIT_FSIZE, lim["file_bytes"])  # caps stdout/stderr too: they are files
    _limit(resource.RLIMIT_NOFILE, lim["open_files"])
    # Root ignores RLIMIT_NPROC, hence the unprivileged uid; without one the count is the calling
    # user's, so the grader passes its current process count plus the allowance.
    _limit(resource.RLIMIT_NPROC, lim["nproc"])


def _drop_privileges(cfg: dict, supervisor: int) -> None:
    """G: limits, no setuid escalation, sandbox uid, die with the supervisor."""
    _set_limits(cfg)
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    uid = cfg["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; die on the output limit
    # Set after setuid: a credential change clears the parent-death signal.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:
        os._exit(SETUP_FAILED)
    for p in sys.path:
        if os.path.isdir(p) and not os.access(p, os.R_OK | os.X_OK):
            raise PermissionError(f"sandbox uid cannot read the interpreter's path {p}")
    os.environ["HOME"] = os.environ["TMPDIR"] = os.getcwd()  # the sandbox


def _resolve_callable(ns: dict, fn_name: str):
    if callable(ns.get(fn_name)):
        return ns[fn_name]
    if isinstance(ns.get("Solution"), type):  # LeetCode / LiveCodeBench style
        return getattr(ns["Solution"](), fn_name)
    raise NameError(f"no function or Solution method named {fn_name!r}")


def _run_program(cfg: dict, result_fd: int) -> int:
    """G: run the candidate the way the mode asks; return the exit code."""
    nonce = cfg.pop("nonce")
    mode, code = cfg["mode"], cfg["code"]
    sys.argv = ["solution.py"]
    ns = {"__name__": "__main__" if mode == "stdio" else "__solution__", "__builtins__": builtins}
    exit_code = 0
    try:
        exec(compile(code, "solution.py", "exec"), ns)
        record = None
        if mode == "call":
            value = _resolve_callable(ns, cfg["fn_name"])(*cfg["args"])
            record = {"result": json.dumps(value)}
        elif mode == "program":
            exec(compile(cfg["test"], "test.py", "exec"), ns)
            if cfg.get("entry_point"):
                ns["check"](ns[cfg["entry_point"]])
            record = {"result": "passed"}
        if record is not None:
            record["nonce"] = nonce
            os.write(result_fd, (json.dumps(record) + "\n").encode())
    except SystemExit as e:
        exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - the candidate's failure, reported as its status
        traceback.print_exc()
        exit_code = 1
        try:
            os.write(result_fd, (json.dumps({"nonce": nonce, "error": type(e).__name__}) + "\n").encode())
        except OSError:
            pass
    for t in threading.enumerate():  # what interpreter shutdown would do for non-daemon threads
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - e.g. output limit hit while flushing
            exit_code = exit_code or 1
    return exit_code


class _Deadline(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Deadline


def _kill_rest() -> None:
    """C: kill and reap every process still in the sandbox."""
    while True:
        if os.getpid() == 1:  # init of our pid namespace: -1 reaches exactly the namespace
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:  # no pid namespace: we are a subreaper, orphans are re-parented to us
            try:
                with open(f"/proc/self/task/{os.getpid()}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                kids = []
            for pid in kids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _supervise(cfg: dict, status_fd: int, result_fd: int, facts: dict) -> None:
    """C: run G under the wall-clock deadline and write the trusted status record.

    G writes one byte to ``setup_w`` and closes it before any candidate code runs, so
    ``setup_ok`` tells a sandbox failure apart from a program that exits with any code.
    """
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    supervisor = os.getpid()
    if supervisor == 1:  # a /proc of our own pid namespace: other processes are not even visible
        try:
            _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
            facts["private_proc"] = True
        except OSError:
            facts["private_proc"] = False
    setup_r, setup_w = os.pipe()
    g = os.fork()
    if g == 0:
        os.close(status_fd)
        os.close(setup_r)
        try:
            _drop_privileges(cfg, supervisor)
        except BaseException as e:  # noqa: BLE001 - a setup failure is not the candidate's
            sys.stderr.write(f"sandbox setup failed: {type(e).__name__}: {e}\n")
            sys.stderr.flush()
            os._exit(SETUP_FAILED)
        os.write(setup_w, b"1")
        os.close(setup_w)
        os._exit(_run_program(cfg, result_fd))
    os.close(result_fd)
    os.close(setup_w)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cfg["limits"]["wall_s"])
    status = {"timed_out": False, "exit": None, "signal": None, **facts}
    try:
        while True:
            pid, wstatus = os.waitpid(-1, 0)
            if pid == g:
                break
        signal.setitimer(signal.ITIMER_REAL, 0)
        if os.WIFSIGNALED(wstatus):
            status["signal"] = os.WTERMSIG(wstatus)
        else:
            status["exit"] = os.waitstatus_to_exitcode(wstatus)
    except _Deadline:
        status["timed_out"] = True
    signal.setitimer(signal.ITIMER_REAL, 0)
    _kill_rest()
    os.set_blocking(setup_r, False)
    try:
        status["setup_ok"] = os.read(setup_r, 1) == b"1"
    except BlockingIOError:
        status["setup_ok"] = False
    os.write(status_fd, (json.dumps(status) + "\n").encode())


def main() -> None:
    config_fd, status_fd, result_fd = (int(a) for a in sys.argv[1:4])
    with os.fdopen(config_fd, "rb") as f:
        cfg = json.loads(f.read())
    facts = _isolate_namespaces(cfg)
    launcher = os.getpid()
    c = os.fork()
    if c == 0:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getpid() != 1 and os.getppid() != launcher:
            os._exit(0)
        try:
            _supervise(cfg, status_fd, result_fd, facts)
        finally:
            os._exit(0)
    os.close(status_fd)
    os.close(result_fd)
    os.waitpid(c, 0)


if __name__ == "__main__":
    main()
