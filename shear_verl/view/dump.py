"""Reading per-token credit dumps (JSON lines, one rollout a line) with line-precise errors.

The driver writes them (``algorithm.shear.dump_every``); the schema is the README's. A bad line
stops the reader with the file, the line number and the field, so a dump from a broken or older
writer is diagnosed at once instead of rendering a misleading page.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

# Per-token lists; all of length L (the response's length).
TOKEN_FIELDS = ("response_ids", "tokens", "response_mask", "weights", "grpo_advantage", "advantage")
FIELDS = ("step", "uid", "estimator", "score", "correct", *TOKEN_FIELDS, "reward_extra_info")
FIRST_ERROR_KEY = "first_error"  # reward_extra_info key: response-token index, -1 when correct


class DumpError(ValueError):
    """A malformed credit dump; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One dumped rollout. ``line`` is its 1-based line in ``path``."""

    step: int
    uid: str
    estimator: str
    score: float
    correct: bool
    response_ids: list[int]
    tokens: list[str]
    response_mask: list[int]
    weights: list[float]
    grpo_advantage: list[float]
    advantage: list[float]
    reward_extra_info: dict
    path: str = ""
    line: int = 0

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def first_error(self) -> int | None:
        """The grader's first-error token index (-1: none), or None where the grader gives none."""
        value = self.reward_extra_info.get(FIRST_ERROR_KEY)
        return None if value is None else int(value)

    def masked_weights(self) -> list[float]:
        """Weights of the tokens the loss sees (response_mask 1)."""
        return [w for w, m in zip(self.weights, self.response_mask) if m]


def group_rollouts(rollouts: Sequence[Rollout]) -> dict[int, dict[str, list[Rollout]]]:
    """{step: {uid: rollouts}}: steps ascending, groups and rollouts in dump order (a uid is a
    GRPO group within one step only)."""
    steps: dict[int, dict[str, list[Rollout]]] = {}
    for r in rollouts:
        steps.setdefault(r.step, {}).setdefault(r.uid, []).append(r)
    return dict(sorted(steps.items()))


def holds_both_outcomes(group: Sequence[Rollout]) -> bool:
    """A group SHEAR scores: at least one correct and one incorrect rollout. A single-outcome group
    has no opposing side and keeps SHEAR's fallback weight on every token."""
    return len({r.correct for r in group}) == 2


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_list(where: str, name: str, value, ok, what: str) -> None:
    if not isinstance(value, list):
        raise DumpError(f"{where}: field {name!r} must be a list of {what}, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not ok(v):
            raise DumpError(f"{where}: field {name!r}[{i}] must be {what}, got {v!r}")


def parse_rollout(obj, where: str, path: str = "", line: int = 0) -> Rollout:
    """Validate one decoded JSON line; ``where`` prefixes every error (e.g. ``dump.jsonl:3``)."""
    if not isinstance(obj, dict):
        raise DumpError(f"{where}: expected a JSON object (one rollout), got {type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise DumpError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    scalar_checks = {
        "step": (_is_int, "an int"),
        "uid": (lambda v: isinstance(v, str), "a string"),
        "estimator": (lambda v: isinstance(v, str), "a string"),
        "score": (_is_number, "a finite number"),
        "correct": (lambda v: isinstance(v, bool), "a bool"),
        "reward_extra_info": (lambda v: isinstance(v, dict), "an object"),
    }
    for name, (ok, what) in scalar_checks.items():
        if not ok(obj[name]):
            raise DumpError(f"{where}: field {name!r} must be {what}, got {obj[name]!r}")
    _check_list(where, "response_ids", obj["response_ids"], _is_int, "ints")
    _check_list(where, "tokens", obj["tokens"], lambda v: isinstance(v, str), "strings")
    _check_list(where, "response_mask", obj["response_mask"], lambda v: _is_int(v) and v in (0, 1), "0 or 1")
    for name in ("weights", "grpo_advantage", "advantage"):
        _check_list(where, name, obj[name], _is_number, "finite numbers")
    lengths = {name: len(obj[name]) for name in TOKEN_FIELDS}
    if len(set(lengths.values())) != 1:
        sizes = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise DumpError(f"{where}: per-token fields must have one length (the response's), got {sizes}")
    fe = obj["reward_extra_info"].get(FIRST_ERROR_KEY)
    # JSON writers of numpy/torch values may give 37.0 for 37: accept integral floats.
    if fe is not None and (not (_is_int(fe) or (isinstance(fe, float) and fe.is_integer())) or fe < -1):
        raise DumpError(f"{where}: field 'reward_extra_info.{FIRST_ERROR_KEY}' must be an int >= -1, got {fe!r}")
    return Rollout(**{f: obj[f] for f in FIELDS}, path=path, line=line)


def read_dump(path: str | os.PathLike) -> list[Rollout]:
    """All rollouts of one JSON-lines dump, in file order (blank lines skipped)."""
    path = Path(path)
    rollouts = []
    with path.open(encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DumpError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rollouts.append(parse_rollout(obj, where, str(path), n))
    if not rollouts:
        raise DumpError(f"{path}: no rollouts (empty dump)")
    return rollouts


def read_dumps(paths: Iterable[str | os.PathLike]) -> list[Rollout]:
    """The rollouts of several dump files, concatenated in the given order."""
    return [r for p in paths for r in read_dump(p)]
