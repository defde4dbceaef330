"""Code grader for verl: run the model's program against tests in a locked-down subprocess.

verl's custom-reward signature (``custom_reward_function.path=pkg://reward_fns.code``,
``name=compute_score``; ``compute_score_batch`` has the batch signature). verl calls it from a
thread pool, so nothing here relies on signals of the calling thread.

``ground_truth`` is a JSON string (or the decoded dict), one of:

- ``{"inputs": [...], "outputs": [...]}``: stdin / expected stdout strings (Eurus-RL-Code, APPS,
  LiveCodeBench stdin problems). Outputs are compared line by line, trailing whitespace and
  trailing blank lines ignored.
- the same plus ``"fn_name"``: call-based tests (APPS / Eurus / LiveCodeBench functional). Each
  input is the list of positional arguments (or a JSON string of that list), each output the
  expected return value as JSON. A top-level function or a ``Solution`` class method is called.
  As in APPS, an expected ``[v]`` also accepts a return value ``v``.
- ``{"test": str | [str, ...], "entry_point": optional str}``: HumanEval / MBPP. Each test program
  runs after the solution in its namespace (one test per string; MBPP's ``test_list`` asserts,
  with ``test_imports`` / ``test_setup_code`` prepended by the data preparation); with
  ``entry_point`` (HumanEval), ``check(<entry_point>)`` is called afterwards.

Each test runs in a fresh subprocess (``_sandbox_child.py``) with, where the OS permits:

- resource limits: address space, CPU time, processes, file size (stdout and stderr are files, so
  this caps them too), open files; no core dumps; ``no_new_privs`` (no setuid escalation). Memory
  is bounded per process, so one run can use up to ``max_processes * memory_mb``;
- a wall-clock deadline enforced by a supervisor process the program cannot signal, after which
  every process of the run is killed; the grader also kills the session if that ever fails;
- when the grader runs as root: an unprivileged uid of its own per concurrent run (root ignores
  ``RLIMIT_NPROC``, so a fork bomb is only stopped by a uid that owns nothing else; a private uid
  also stops the program from signalling anything outside its run), plus new network, mount and
  pid namespaces: no network at all (only a down loopback); the whole filesystem read-only except
  the run's own directory, which is bound over ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
  ``/run/lock`` (needs mount_setattr, Linux >= 5.12; ``sandbox_info()["readonly_root"]``); a
  ``/proc`` showing only the run's processes; and the end of the pid namespace kills every
  process left behind, including ones that ``setsid`` away;
- when not root: an unprivileged user namespace with the same network / mount / pid namespaces
  if the kernel allows it. Otherwise (``sandbox_info()`` says what was achieved and a warning is
  logged) the network is reachable, the program can write and signal wherever the grader's user
  can, and ``RLIMIT_NPROC`` counts all of that user's processes, so it is set to the current
  count plus the allowance; a subreaper supervisor still kills every descendant at the end.
- its own temporary directory (the working directory), removed afterwards.

Not a defence against programs that attack the grading protocol itself (e.g. reading the
harness's memory to forge a record); it contains ordinary broken, slow or destructive programs.
Linux only.
"""

# No ``from __future__ import annotations``: verl may load this file by path without registering
# it in sys.modules, and dataclasses then cannot resolve string annotations (AttributeError).
import fcntl
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_GRACE_S = 5.0  # extra wall time before the grader kills a run whose supervisor did not return
_UID_BASE = int(os.environ.get("SHEAR_SANDBOX_UID_BASE", 2**30))  # sandbox uids: BASE .. BASE+1023
_UID_COUNT = 1024
_UID_LOCK_DIR = "/tmp/shear-sandbox-uids"  # flock per uid: unique across grader processes
_MAX_PARALLEL = int(os.environ.get("SHEAR_SANDBOX_PARALLEL", os.cpu_count() or 1))
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.IGNORECASE | re.DOTALL)

OUTCOMES = (
    "passed",
    "wrong_answer",
    "runtime_error",
    "memory_limit",
    "timeout",
    "output_limit",
    "crashed",  # killed by a signal other than the limits'
    "sandbox_error",  # the sandbox itself failed to set up (logged): not the program's fault
    "not_run",
)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits; a run is one test of one program."""

    timeout_s: float = 5.0  # wall clock (and CPU seconds, rounded up)
    memory_mb: int = 1024  # RLIMIT_AS
    max_processes: int = 8  # RLIMIT_NPROC of the sandbox uid; threads count
    max_output_mb: int = 16  # RLIMIT_FSIZE: stdout, stderr, any file written
    max_open_files: int = 64  # RLIMIT_NOFILE

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_processes", "max_output_mb", "max_open_files"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        if self.memory_mb < 64 or self.max_processes < 2 or self.max_open_files < 16:
            raise ValueError(
                f"SandboxLimits too small to start Python: memory_mb >= 64, max_processes >= 2, "
                f"max_open_files >= 16 needed, got {self}"
            )


@dataclass
class RunResult:
    """What one sandboxed run did. ``record`` is the harness's report (call / program modes)."""

    timed_out: bool
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    record: dict | None
    facts: dict
    output_full: bool  # stdout or stderr reached the file-size limit


# ----------------------------------------------------------------------------- parsing


def extract_code(solution_str: str) -> str:
    """The last ```python fenced block of the response, else the whole response."""
    blocks = _FENCE.findall(solution_str)
    return blocks[-1] if blocks else solution_str


def _as_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise ValueError(f"code ground_truth: each {what} must be a string (or a list of lines), got {value!r:.80}")


def _as_args(value: Any) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"code ground_truth: call-based input is not JSON: {value!r:.80}") from e
    if not isinstance(value, list):
        raise ValueError(f"code ground_truth: a call-based input must be a JSON list of arguments, got {value!r:.80}")
    return value


def parse_tests(ground_truth: str | dict) -> dict:
    """Validate ``ground_truth`` (see the module doc) and return it in normalised form."""
    if isinstance(ground_truth, (str, bytes)):
        try:
            ground_truth = json.loads(ground_truth)
        except json.JSONDecodeError as e:
            raise ValueError(f"code ground_truth must be a JSON object string, got {ground_truth!r:.80}") from e
    if not isinstance(ground_truth, dict):
        raise ValueError(f"code ground_truth must be a JSON object, got {type(ground_truth).__name__}")
    if "test" in ground_truth:
        tests = ground_truth["test"]
        tests = [tests] if isinstance(tests, str) else tests
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError("code ground_truth 'test' must be a non-empty string or list of strings")
        entry = ground_truth.get("entry_point")
        if entry is not None and not isinstance(entry, str):
            raise ValueError(f"code ground_truth 'entry_point' must be a string, got {entry!r}")
        return {"mode": "program", "tests": tests, "entry_point": entry}
    inputs, outputs = ground_truth.get("inputs"), ground_truth.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs or len(inputs) != len(outputs):
        raise ValueError(
            "code ground_truth needs non-empty 'inputs' and 'outputs' lists of equal length "
            "(or a 'test' program); got keys " + str(sorted(ground_truth))
        )
    fn_name = ground_truth.get("fn_name")
    if fn_name:
        if not isinstance(fn_name, str):
            raise ValueError(f"code ground_truth 'fn_name' must be a string, got {fn_name!r}")
        return {"mode": "call", "fn_name": fn_name, "inputs": [_as_args(i) for i in inputs], "outputs": outputs}
    return {
        "mode": "stdio",
        "inputs": [_as_text(i, "input") for i in inputs],
        "outputs": [_as_text(o, "output") for o in outputs],
    }


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _same_value(actual: Any, expected: Any) -> bool:
    if actual == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and actual == expected[0]  # APPS wraps results


# ----------------------------------------------------------------------------- sandbox


class _UidPool:
    """Sandbox uids for root: one per concurrent run, unique across processes via ``flock``."""

    def __init__(self):
        self._free: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def acquire(self) -> tuple[int, int]:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's locks are not ours
                self._free, self._pid = [], os.getpid()
            if self._free:
                return self._free.pop()
            os.makedirs(_UID_LOCK_DIR, mode=0o700, exist_ok=True)
            start = secrets.randbelow(_UID_COUNT)
            for k in range(_UID_COUNT):
                uid = _UID_BASE + (start + k) % _UID_COUNT
                fd = os.open(os.path.join(_UID_LOCK_DIR, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return uid, fd
                except BlockingIOError:
                    os.close(fd)
        raise RuntimeError(f"all {_UID_COUNT} sandbox uids from {_UID_BASE} are in use (see {_UID_LOCK_DIR})")

    def release(self, slot: tuple[int, int]) -> None:
        with self._lock:
            self._free.append(slot)


_UIDS = _UidPool()
_PARALLEL = threading.BoundedSemaphore(_MAX_PARALLEL)
_INFO: dict | None = None
_INFO_LOCK = threading.Lock()


def _proc_status(pid: str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def _tasks_of_uid(uid: int) -> tuple[int, list[int]]:
    """Threads of ``uid`` (what RLIMIT_NPROC counts) and its live (non-zombie) processes."""
    threads, pids = 0, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = _proc_status(pid)
        except (OSError, ValueError):
            continue
        if uid in (int(u) for u in st["Uid"].split()):
            threads += int(st.get("Threads", "1"))
            if not st.get("State", "").strip().startswith("Z"):
                pids.append(int(pid))
    return threads, pids


def _kill_uid(uid: int) -> int:
    """Kill every process of a sandbox uid (only needed when there was no pid namespace)."""
    killed = 0
    for _ in range(100):
        _, pids = _tasks_of_uid(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def _rmtree(path: str) -> None:
    def retry(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=retry)


def run_in_sandbox(code: str, mode: str, limits: SandboxLimits, stdin: bytes = b"", **job: Any) -> RunResult:
    """Run ``code`` once in a fresh sandboxed subprocess.

    ``mode``: ``"stdio"`` (program reads ``stdin``), ``"call"`` (``fn_name``, ``args``: the return
    value comes back in ``record["result"]`` as JSON) or ``"program"`` (``test``, optional
    ``entry_point``: ``record["result"] == "passed"`` when the test program ran through).
    """
    root = os.geteuid() == 0
    nonce = secrets.token_hex(16)
    with _PARALLEL:
        slot = _UIDS.acquire() if root else None
        sandbox = tempfile.mkdtemp(prefix="shear-sbx-")
        try:
            if slot is not None:
                os.chown(sandbox, slot[0], slot[0])
                nproc = limits.max_processes
            else:
                nproc = _tasks_of_uid(os.getuid())[0] + limits.max_processes
            cfg = {
                "mode": mode,
                "code": code,
                "nonce": nonce,
                "uid": None if slot is None else slot[0],
                "limits": {
                    "wall_s": float(limits.timeout_s),
                    "cpu_s": math.ceil(limits.timeout_s),
                    "memory_bytes": int(limits.memory_mb * 2**20),
                    "file_bytes": int(limits.max_output_mb * 2**20),
                    "open_files": int(limits.max_open_files),
                    "nproc": int(nproc),
                },
                **job,
            }
            with (
                tempfile.TemporaryFile() as cfg_f,
                tempfile.TemporaryFile() as status_f,
                tempfile.TemporaryFile() as result_f,
                tempfile.TemporaryFile() as in_f,
                tempfile.TemporaryFile() as out_f,
                tempfile.TemporaryFile() as err_f,
            ):
                cfg_f.write(json.dumps(cfg).encode())
                cfg_f.seek(0)
                in_f.write(stdin)
                in_f.seek(0)
                fds = (cfg_f.fileno(), status_f.fileno(), result_f.fileno())
                env = {
                    "PATH": "/usr/local/bin:/usr/bin:/bin",
                    "LANG": "C.UTF-8",
                    "LC_ALL": "C.UTF-8",
                    **{k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
                }
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", _CHILD, *map(str, fds)],
                    stdin=in_f if mode == "stdio" else subprocess.DEVNULL,
                    stdout=out_f,
                    stderr=err_f,
                    pass_fds=fds,
                    cwd=sandbox,
                    env=env,
                    start_new_session=True,
                )
                try:
                    proc.wait(timeout=limits.timeout_s + _GRACE_S)
                except subprocess.TimeoutExpired:
                    logger.warning("sandbox supervisor did not return in time; killing its session")
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                status_f.seek(0)
                result_f.seek(0)
                out_f.seek(0)
                err_f.seek(0)
                status = _last_record(status_f.read())
                records = [r for r in map(_json_or_none, result_f.read().splitlines()) if r and r.get("nonce") == nonce]
                stdout, stderr = out_f.read(), err_f.read()
                cap = cfg["limits"]["file_bytes"]
            if slot is not None and not (status or {}).get("pid_namespace"):
                if killed := _kill_uid(slot[0]):
                    logger.warning("killed %d leftover sandbox processes of uid %d", killed, slot[0])
        finally:
            _rmtree(sandbox)
            if slot is not None:
                _UIDS.release(slot)
    status = status or {"timed_out": True, "exit": None, "signal": None}
    return RunResult(
        timed_out=status["timed_out"],
        exit_code=status["exit"],
        signal=status["signal"],
        stdout=stdout,
        stderr=stderr,
        record=records[-1] if records else None,
        facts={k: v for k, v in status.items() if k not in ("timed_out", "exit", "signal")},
        output_full=max(len(stdout), len(stderr)) >= cap,
    )


def _json_or_none(line: bytes) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _last_record(data: bytes) -> dict | None:
    lines = data.splitlines()
    return _json_or_none(lines[-1]) if lines else None


def sandbox_info() -> dict:
    """What isolation this machine gives (network / pid namespace, private /tmp), probed once.

    Raises RuntimeError when the sandbox cannot run a trivial program at all (e.g. the sandbox
    uid cannot read the Python installation and mount namespaces are not permitted).
    """
    global _INFO
    with _INFO_LOCK:
        if _INFO is None:
            run = run_in_sandbox("print('ok')", "stdio", SandboxLimits(timeout_s=30.0))
            if run.exit_code != 0 or run.stdout.strip() != b"ok":
                raise RuntimeError(
                    "the code sandbox cannot run a trivial program (exit "
                    f"{run.exit_code}, signal {run.signal}, timed out {run.timed_out}): "
                    f"{run.stderr.decode(errors='replace')[-2000:]}\nIf it says the sandbox uid cannot "
                    "read the interpreter, install Python in a world-readable place or run the "
                    "grader where mount namespaces are permitted."
                )
            _INFO = dict(run.facts, root=os.geteuid() == 0)
            if not (_INFO["network_isolated"] and _INFO["pid_namespace"]):
                logger.warning("code sandbox has partial isolation on this machine: %s", _INFO)
        return _INFO


# ----------------------------------------------------------------------------- grading


def _outcome(run: RunResult) -> str | None:
    """The outcome a run has whatever its output was; None when the output decides."""
    if not run.facts.get("setup_ok", True) and not run.timed_out:
        logger.error("code sandbox setup failed: %s", run.stderr.decode(errors="replace")[-2000:])
        return "sandbox_error"
    if run.timed_out or run.signal == signal.SIGXCPU:
        return "timeout"
    if run.signal == signal.SIGXFSZ or run.output_full:
        return "output_limit"
    if run.signal is not None:
        return "crashed"
    if run.record is not None and run.record.get("error") == "MemoryError":
        return "memory_limit"
    return None


def _grade_one(code: str, tests: dict, i: int, limits: SandboxLimits) -> str:
    mode = tests["mode"]
    if mode == "stdio":
        run = run_in_sandbox(code, mode, limits, stdin=tests["inputs"][i].encode())
    elif mode == "call":
        run = run_in_sandbox(code, mode, limits, fn_name=tests["fn_name"], args=tests["inputs"][i])
    else:
        run = run_in_sandbox(code, mode, limits, test=tests["tests"][i], entry_point=tests["entry_point"])
    if (fixed := _outcome(run)) is not None:
        return fixed
    if mode == "stdio":
        if run.exit_code != 0:
            return "runtime_error"
        actual = run.stdout.decode("utf-8", errors="replace")
        return "passed" if _lines(actual) == _lines(tests["outputs"][i]) else "wrong_answer"
    if run.record is None or "result" not in run.record:
        error = (run.record or {}).get("error")
        return "wrong_answer" if error == "AssertionError" and mode == "program" else "runtime_error"
    if mode == "program":
        return "passed"
    return "passed" if _same_value(json.loads(run.record["result"]), tests["outputs"][i]) else "wrong_answer"


def _result(outcomes: list[str], partial_credit: bool, reason: str) -> dict:
    passed = sum(o == "passed" for o in outcomes)
    fraction = passed / len(outcomes)
    return {
        "score": fraction if partial_credit else float(passed == len(outcomes)),
        "acc": float(passed == len(outcomes)),
        "pass_fraction": fraction,
        "passed": passed,
        "total": len(outcomes),
        "outcomes": json.dumps(outcomes),  # a string: verl stacks reward extras into numpy arrays
        "reason": reason,
    }


def compute_score(
    data_source: str,
    solution_str: Any,
    ground_truth: str | dict,
    extra_info: dict | None = None,
    *,
    partial_credit: bool = False,
    timeout_s: float = SandboxLimits.timeout_s,
    memory_mb: int = SandboxLimits.memory_mb,
    max_processes: int = SandboxLimits.max_processes,
    max_output_mb: int = SandboxLimits.max_output_mb,
    max_open_files: int = SandboxLimits.max_open_files,
    **kwargs: Any,
) -> dict:
    """Grade one response against its tests (verl's custom-reward signature).

    ``score`` is 1.0 when every test passes (SHEAR and GRPO want a binary outcome), or the pass
    fraction with ``partial_credit=True``; ``pass_fraction``, ``passed``, ``total`` and
    ``outcomes`` (JSON list, one of OUTCOMES per test) are always returned. Tests run in order;
    after the first timeout the rest are ``not_run`` (a program that loops once loops again).
    Limits can be set from verl's ``custom_reward_function.reward_kwargs``.
    Raises ValueError for a malformed ``ground_truth`` (a data bug); never raises for junk
    responses.
    """
    tests = parse_tests(ground_truth)
    limits = SandboxLimits(timeout_s, memory_mb, max_processes, max_output_mb, max_open_files)
    n = len(tests["tests"] if tests["mode"] == "program" else tests["inputs"])
    if not isinstance(solution_str, str):
        return _result(["not_run"] * n, partial_credit, f"solution_str must be str, got {type(solution_str).__name__}")
    code = extract_code(solution_str)
    if not code.strip():
        return _result(["not_run"] * n, partial_credit, "no code in the response")
    sandbox_info()
    outcomes: list[str] = []
    for i in range(n):
        outcomes.append(_grade_one(code, tests, i, limits))
        if outcomes[-1] == "timeout":
            outcomes += ["not_run"] * (n - i - 1)
            break
    failed = [f"test {i}: {o}" for i, o in enumerate(outcomes) if o != "passed"]
    reason = f"all {n} tests passed" if not failed else f"{n - len(failed)}/{n} passed; first failure {failed[0]}"
    return _result(outcomes, partial_credit, reason)


def compute_score_batch(
    data_sources: list[str],
    solution_strs: list[Any],
    ground_truths: list[str | dict],
    extra_infos: list[dict | None] | None = None,
    max_workers: int | None = None,
    **kwargs: Any,
) -> list[dict]:
    """Many responses in parallel (verl's batch-reward signature); each test still runs alone in
    its own sandbox, and at most ``SHEAR_SANDBOX_PARALLEL`` (default: CPU count) run at once."""
    extra_infos = extra_infos if extra_infos is not None else [None] * len(solution_strs)
    with ThreadPoolExecutor(max_workers or _MAX_PARALLEL) as pool:
        return list(
            pool.map(
                lambda a: compute_score(*a, **kwargs),
                zip(data_sources, solution_strs, ground_truths, extra_infos, strict=True),
            )
        )
