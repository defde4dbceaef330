"""Pure helpers of the diagnostic: prefix enumeration, continuation success, shift events, AUC bins."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

from shear_verl.analysis import auc


def prefix_positions(num_tokens: int, span_len: int, start: int, stride: int, answer_start: int | None = None) -> list[int]:
    """Prefix lengths p = start, start + stride, ... <= num_tokens whose last span [p - span_len, p)
    holds no token of the final answer (tokens >= answer_start) and is a full span (p >= span_len)."""
    if span_len < 1 or stride < 1 or start < 1:
        raise ValueError(f"span_len, stride and start must be >= 1, got {span_len}, {stride}, {start}")
    end = num_tokens if answer_start is None else min(num_tokens, answer_start)
    return [p for p in range(max(start, span_len), end + 1, stride)]


def continuation_success(outcomes: Sequence[bool]) -> float:
    """Share of correct completions of one prefix (the estimate of its success probability)."""
    if len(outcomes) == 0:
        raise ValueError("continuation_success needs at least one completion")
    return float(np.mean(np.asarray(outcomes, dtype=np.float64)))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties: average ranks); None when undefined (< 3 points or constant)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman: x and y differ in length ({a.size} vs {b.size})")
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def shift_events(positions: Sequence[int], success: Sequence[float], distance: Sequence[float],
                 min_shift: float) -> list[dict]:
    """Local shift events of one rollout: consecutive prefixes whose success changes by >= min_shift
    (1/k with k continuations: at least one completion changed outcome)."""
    out = []
    for j in range(1, len(positions)):
        ds = success[j] - success[j - 1]
        if abs(ds) >= min_shift - 1e-12:
            out.append({"position": int(positions[j]), "delta_success": float(ds),
                        "delta_distance": float(distance[j] - distance[j - 1])})
    return out


def binned_auc(distance: Sequence[float], success: Sequence[float], correct: Sequence[bool], bins: int) -> list[dict]:
    """Spans cut into ``bins`` distance quantile bins; per bin the AUC of continuation success between
    spans of correct and incorrect rollouts (None when a side is empty) and the mean success of each."""
    d, s, c = (np.asarray(v) for v in (distance, success, correct))
    if not (d.size == s.size == c.size):
        raise ValueError("binned_auc: distance, success and correct must have the same length")
    if d.size == 0:
        return []
    edges = np.quantile(d.astype(np.float64), np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        pos, neg = s[m & c.astype(bool)], s[m & ~c.astype(bool)]
        rows.append({
            "bin": b, "low": float(edges[b]), "high": float(edges[b + 1]), "spans": int(m.sum()),
            "auc": auc(pos, neg) if pos.size and neg.size else None,
            "success_correct": float(pos.mean()) if pos.size else None,
            "success_incorrect": float(neg.mean()) if neg.size else None,
            "success_all": float(s[m].mean()) if m.any() else None,
        })
    return rows


