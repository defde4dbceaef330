"""Does the credit land where rollouts diverge? Separation scores of per-token credit.

``divergence_auc``: on an incorrect rollout whose first error is known (a grader's
``first_error``) in a group that also holds a correct rollout, the probability that a token at
or after the error carries more weight than a token before it (ties count half) -- the
Mann-Whitney AUC of the two sets of weights. 1.0: every token from the error on outweighs every
token before it; 0.5: no separation. With ``span_len``, the tokens just before the error that
share a span with it (the ``span_len - 1`` before it) are left out of the "before" set: under
max-pooling they inherit the error span's distance by construction, so leaving them out
measures the separation the spans can resolve.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata

from shear_verl.view import group_rollouts, holds_both_outcomes


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(X > Y) + P(X = Y) / 2 for X from ``positive``, Y from ``negative`` (Mann-Whitney U / nm)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"auc needs both sets non-empty, got {pos.size} positive and {neg.size} negative")
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks: ties count half
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def divergence_auc(weights: Sequence[float], mask: Sequence[int], first_error: int,
                   span_len: int | None = None) -> float | None:
    """AUC of the masked weights at/after ``first_error`` against those before it (None if one set
    is empty, e.g. an error at token 0 or past the end)."""
    w = np.asarray(weights, dtype=np.float64)
    m = np.asarray(mask).astype(bool)
    if w.shape != m.shape:
        raise ValueError(f"weights and mask differ in length: {w.shape} vs {m.shape}")
    if first_error < 0:
        return None
    t = np.arange(w.size)
    before_end = first_error - (span_len - 1 if span_len else 0)
    after, before = w[m & (t >= first_error)], w[m & (t < before_end)]
    if after.size == 0 or before.size == 0:
        return None
    return auc(after, before)


def dump_divergence(rollouts: Iterable, span_len: int | None = None) -> dict[int, dict]:
    """Per step of credit-dump rollouts (:class:`shear_verl.view.Rollout`): mean ``divergence_auc``
    over the incorrect ones with a known first error inside the response, and their number. Only
    groups holding both outcomes count: a single-outcome group has no opposing side, SHEAR gives it
    its fallback weight on every token, and its AUC (0.5) would say nothing about the distances."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for step, groups in group_rollouts(list(rollouts)).items():
        for r in (r for g in groups.values() if holds_both_outcomes(g) for r in g):
            if r.correct or r.first_error is None:
                continue
            value = divergence_auc(r.weights, r.response_mask, r.first_error, span_len)
            if value is not None:
                per_step[step].append(value)
    return {step: {"divergence_auc": float(np.mean(v)), "rollouts": len(v)} for step, v in sorted(per_step.items())}
