"""Math answer grader for verl: the last ``\\boxed{}`` answer, equivalence by math-verify.

verl's custom-reward signature (``custom_reward_function.path=pkg://reward_fns.math``,
``name=compute_score``). Returns ``score`` (1.0 / 0.0) with ``acc`` (same), ``pred`` (the parsed
answer, for verl's majority-vote metrics) and ``reason``; the key set never changes, because verl
stacks each key over the batch into a numpy array.

Time limit. verl calls reward functions from a thread pool (and in Ray actors), where
math-verify's own timeout (``signal.alarm``) raises, and a signal could not interrupt sympy
inside C code anyway (``\\boxed{9^{9^{9^{9}}}}`` hangs there). So math-verify runs with its
timeouts disabled in a small pool of persistent worker processes, and each call gets a deadline:
a worker that misses it is killed and replaced in the background (and the answer scores 0), and
a forked watchdog kills a worker whose grader died (see ``_start_watchdog``). The workers are plain
subprocesses speaking JSON lines over pipes, written here by hand: ``multiprocessing`` / pebble
pools would pickle the worker function by module name, which breaks when verl loads this file by
path, and would fork a multi-threaded process.
"""

from __future__ import annotations

import atexit
import json
import numbers
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

DEFAULT_TIMEOUT_S = 5.0  # per answer: parse both sides and compare
MAX_ANSWER_CHARS = 1000  # longer boxed answers score 0 unparsed: no real answer is that long
_STARTUP_TIMEOUT_S = 120.0  # importing sympy in a new worker, not counted against the deadline
_NUM_WORKERS = int(os.environ.get("SHEAR_MATH_WORKERS", min(4, os.cpu_count() or 1)))
_WORKER_MEMORY_BYTES = int(os.environ.get("SHEAR_MATH_WORKER_MEMORY_MB", 4096)) * 2**20
_MAX_PRED_CHARS = 200


def last_boxed_answer(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` / ``\fbox{...}`` (balanced braces), or None.

    ``\{`` and ``\}`` are literal braces, not groups. ``\boxed 5`` (no braces) reads to the next
    ``$`` or line end. A last box that never closes (a truncated response) gives None.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if text.startswith(" ", i):
        rest = text[i + 1 :]
        end = min((k for k in (rest.find("$"), rest.find("\n")) if k >= 0), default=len(rest))
        return rest[:end].strip() or None
    if not text.startswith("{", i):
        return None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


# ----------------------------------------------------------------------------- worker side


def _start_watchdog() -> None:
    """Fork a watchdog that kills this worker once the grader is gone.

    A worker stuck in sympy holds the GIL inside C and never reads the EOF a dead grader leaves,
    so neither its own loop nor a thread can notice; PR_SET_PDEATHSIG would fire when the grader
    *thread* that started it ends (verl grades from pool threads). The watchdog is a separate
    process: it waits for POLLHUP on the request pipe (every writer closed: grader dead or done)
    without reading from it, and signals through a pidfd, so a reused pid is never hit.
    """
    pidfd = os.pidfd_open(os.getpid())
    if os.fork():
        os.close(pidfd)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # hold no write end of the reply pipe: the grader must see a dead worker's EOF
    os.dup2(null, 2)
    poller = select.poll()
    poller.register(0, 0)  # POLLHUP is always reported
    poller.poll()
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(0)


def _serve() -> None:
    """Worker loop: one JSON request per line on stdin, one JSON reply per line."""
    import resource

    _start_watchdog()
    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse(f"\\boxed{{{request['gold']}}}", extraction_config=config, parsing_timeout=None)
            pred = parse(f"\\boxed{{{request['pred']}}}", extraction_config=config, parsing_timeout=None)
            reply = {
                "correct": bool(verify(gold, pred, timeout_seconds=None)),
                "pred": str(pred[0])[:_MAX_PRED_CHARS] if pred else "",
                "parsed": bool(pred),
            }
        except BaseException as e:  # noqa: BLE001 - e.g. MemoryError, RecursionError
            reply = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ----------------------------------------------------------------------------- caller side


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__), "--serve"],  # -P: no shadowing of stdlib math
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the trainer is not sent to the workers
        )
        self._buffer = b""
        if self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S) != {"ready": True}:
            self.kill()
            raise RuntimeError(
                f"math grader worker failed to start with {sys.executable}: is math-verify installed "
                "(pip install math-verify)? Run `python -P reward_fns/math.py --serve` to see the error."
            )

    def _read_line(self, deadline: float) -> dict | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def ask(self, request: dict, timeout_s: float) -> dict | None:
        """The reply, or None when the deadline passed or the worker died (then it is unusable)."""
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self._read_line(time.monotonic() + timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:  # BrokenPipeError flushing a request the worker never read
                pass


class _WorkerPool:
    """At most ``size`` busy workers; a worker serves one call at a time. A worker killed on a
    deadline is replaced in the background, so the next call does not pay the sympy import."""

    def __init__(self, size: int):
        self._size = size
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self.pid = os.getpid()

    def ask(self, request: dict, timeout_s: float) -> dict | None:
        with self._slots:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is not None and worker.proc.poll() is not None:  # died while idle (OOM killer)
                worker.kill()
                worker = None
            worker = worker or _Worker()
            reply = worker.ask(request, timeout_s)
            if reply is None:
                worker.kill()
                threading.Thread(target=self._add_idle_worker, daemon=True).start()
            else:
                self._keep(worker)
            return reply

    def _keep(self, worker: _Worker) -> None:
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(worker)
                return
        worker.kill()

    def _add_idle_worker(self) -> None:
        try:
            self._keep(_Worker())
        except RuntimeError:  # the next call reports it
            pass

    def close(self) -> None:
        with self._lock:
            workers, self._idle = self._idle, []
        for worker in workers:
            worker.kill()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():  # new, or inherited through fork: not ours
            _POOL = _WorkerPool(_NUM_WORKERS)
            atexit.register(_POOL.close)
        return _POOL


def _result(correct: bool, pred: str, reason: str) -> dict:
    return {"score": float(correct), "acc": float(correct), "pred": pred, "reason": reason}


def compute_score(
    data_source: str,
    solution_str: Any,
    ground_truth: str | int | float,
    extra_info: dict | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> dict:
    """Grade one response (verl's custom-reward signature); never raises for a junk response.

    ``timeout_s`` (settable through verl's ``custom_reward_function.reward_kwargs``) bounds
    parsing and comparing one answer. Raises ValueError for a ground truth that is not a
    string or number, or a non-positive ``timeout_s`` (configuration errors).
    """
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, numbers.Real)):  # numpy too
        raise ValueError(f"math ground_truth must be a string or number, got {type(ground_truth).__name__}")
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not isinstance(solution_str, str):
        return _result(False, "", f"solution_str must be str, got {type(solution_str).__name__}")
    answer = last_boxed_answer(solution_str)
    if answer is None:
        return _result(False, "", "no complete \\boxed{} answer")
    if len(answer) > MAX_ANSWER_CHARS:
        return _result(False, "", f"boxed answer longer than {MAX_ANSWER_CHARS} characters")
    reply = _pool().ask({"gold": str(ground_truth), "pred": answer}, timeout_s)
    if reply is None:
        return _result(False, "", f"timed out after {timeout_s} s (or the grader worker died)")
    if "error" in reply:
        return _result(False, "", f"math-verify failed: {reply['error']}")
    if not reply["parsed"]:
        return _result(False, "", "boxed answer could not be parsed")
    return _result(reply["correct"], reply["pred"], "equivalent" if reply["correct"] else "not equivalent")


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
