"""Rule reward of the tiny parity task (``shear_verl.tiny.task``), verl custom-reward signature.

The prompt asks for an even or an odd number; the answer is the first number in the response
(its first run of ASCII digits). Reward 1.0 if that number has the requested parity, else 0.0
-- binary, so that GRPO / SHEAR groups split into correct and incorrect rollouts.

Use: ``reward.custom_reward_function.path=reward_fns/tiny.py``
``reward.custom_reward_function.name=compute_score``.
"""

from __future__ import annotations

import re

PARITIES = ("even", "odd")
_NUMBER = re.compile(r"[0-9]+")  # ASCII only: str.isdigit / \d also accept other scripts' digits


def first_number(text: str) -> str | None:
    """The digits of the first number written in ``text``, or None if it has no digit."""
    match = _NUMBER.search(text)
    return match.group() if match else None


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 if the first number in the response has parity ``ground_truth`` ("even"/"odd")."""
    if ground_truth not in PARITIES:
        raise ValueError(f"tiny parity task: ground_truth must be one of {PARITIES}, got {ground_truth!r}")
    answer = first_number(solution_str)
    if answer is None:
        return 0.0
    return 1.0 if int(answer[-1]) % 2 == PARITIES.index(ground_truth) else 0.0
