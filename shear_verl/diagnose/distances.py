"""Span distances of the diagnostic, through the SHEAR engine's public API."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ot
import torch

from shear_verl.core import ShearConfig, group_token_weights


def mean_norm(states: Sequence[torch.Tensor]) -> float:
    """n_bar: mean ||h_t|| over all tokens of the group's rollouts (Algorithm 1 lines 8-9)."""
    total = sum(float(torch.linalg.vector_norm(h.double(), dim=1).sum()) for h in states)
    return total / max(sum(h.shape[0] for h in states), 1)


def prefix_span_distances(query: torch.Tensor, positions: Sequence[int], opposing: Sequence[torch.Tensor],
                          cfg: ShearConfig, n_bar: float) -> list[float]:
    """Distance / n_bar of each prefix's last span query[p - w:p] to the closest span of any opposing
    rollout. Each prefix span goes to the engine as a one-span 'correct' rollout facing the opposing
    rollouts as 'incorrect' ones; the engine only pairs opposite outcomes, so every weight of a
    query is exactly that span's minimum. The engine divides by the n_bar of what it is given, so
    eps is passed absolute (cfg.epsilon x the real group's n_bar) and the value rescaled to it."""
    if not positions:
        return []
    w = cfg.span_len
    spans = [query[p - w:p] for p in positions]  # each [w, d]
    eps = cfg.epsilon * n_bar if cfg.epsilon_mode == "relative" else cfg.epsilon
    engine_cfg = ShearConfig(**{**cfg.__dict__, "epsilon": float(eps), "epsilon_mode": "absolute",
                                "normalization": "group"})
    states = spans + list(opposing)
    weights = group_token_weights(states, [True] * len(spans) + [False] * len(opposing), engine_cfg)
    given_n_bar = mean_norm(states)
    return [float(weights[k][0]) * given_n_bar / n_bar for k in range(len(spans))]


def pairwise_span_matrix(spans: Sequence[torch.Tensor], epsilon: float, n_bar: float) -> np.ndarray:
    """Sinkhorn transport cost <P_eps, C> / n_bar between every pair of spans (Appendix K, Fig. 11).
    The engine computes minima over opposing sets, not full matrices, so POT's log-domain Sinkhorn
    (Euclidean cost, the engine's W_eps) gives this one; eps in raw units."""
    x = [s.double().cpu().numpy() for s in spans]
    n = len(x)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            cost = ot.dist(x[i], x[j], metric="euclidean")
            a, b = ot.unif(len(x[i])), ot.unif(len(x[j]))
            out[i, j] = out[j, i] = float(ot.sinkhorn2(a, b, cost, epsilon, method="sinkhorn_log",
                                                       numItermax=5000, stopThr=1e-9)) / n_bar
    return out
