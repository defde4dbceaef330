"""Rule reward of the tiny counting task (``shear_verl.tiny.counting``), verl custom-reward signature.

The prompt asks for the first ``n`` terms of an arithmetic progression ("Count by 7 from 123, 20
terms."); the response is correct iff it is exactly those terms, separated by single spaces.
Besides the score the grader returns ``first_error``: the index of the first response token that
departs from the expected text (-1 when correct) -- the known divergence point of the task.

Token index = character index on the matching prefix: the tiny tokenizer pre-tokenizes like Qwen2,
which writes every digit and every lone space as a token of its own, and the expected text has
only digits and single spaces; so the first ``first_error`` characters are exactly the first
``first_error`` tokens (tested against the real tokenizer). A response that stops early (a correct
but truncated prefix) has ``first_error == len(response)``, one past its last character.

Use: ``reward.custom_reward_function.path=reward_fns/counting.py``
``reward.custom_reward_function.name=compute_score``.
"""

from __future__ import annotations

import json


def expected_terms(start: int, step: int, n_terms: int) -> list[int]:
    """The first ``n_terms`` terms from ``start``: start, start + step, start + 2 step, ..."""
    if n_terms < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    return [start + step * i for i in range(n_terms)]


def expected_text(start: int, step: int, n_terms: int) -> str:
    return " ".join(str(t) for t in expected_terms(start, step, n_terms))


def first_error(response: str, expected: str) -> int:
    """Index of the first character of ``response`` that differs from ``expected``; -1 if equal.

    A strict prefix of ``expected`` errs at ``len(response)`` (the term it fails to write); a
    response that goes on past ``expected`` errs at ``len(expected)`` (its first extra character).
    """
    for i, (got, want) in enumerate(zip(response, expected)):
        if got != want:
            return i
    if len(response) == len(expected):
        return -1
    return min(len(response), len(expected))


def parse_ground_truth(ground_truth) -> tuple[int, int, int]:
    """(start, step, n_terms) from the dataset's ground truth (a JSON string or a mapping)."""
    raw = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    try:
        return int(raw["start"]), int(raw["step"]), int(raw["n_terms"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"tiny counting task: ground_truth must hold start, step and n_terms, got {ground_truth!r}"
        ) from err


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """``{"score": 1.0 | 0.0, "first_error": token index or -1}`` (see the module docstring)."""
    start, step, n_terms = parse_ground_truth(ground_truth)
    error = first_error(solution_str, expected_text(start, step, n_terms))
    return {"score": 1.0 if error < 0 else 0.0, "first_error": error}
