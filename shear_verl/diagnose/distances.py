"""Span distances of the diagnostic, through the SHEAR engine (no per-pair POT loop: POT is the tests' oracle)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from shear_verl.core import ShearConfig, group_token_weights
from shear_verl.core.ot import sinkhorn_transport_cost


def mean_norm(states: Sequence[torch.Tensor]) -> float:
    """n_bar: mean ||h_t|| over all tokens of the group's rollouts (Algorithm 1 lines 8-9)."""
    total = sum(float(torch.linalg.vector_norm(h.double(), dim=1).sum()) for h in states)
    return total / max(sum(h.shape[0] for h in states), 1)


def _absolute(cfg: ShearConfig, n_bar: float) -> ShearConfig:
    """cfg with eps in raw units (a relative eps is in units of the real group's n_bar)."""
    eps = cfg.epsilon * n_bar if cfg.epsilon_mode == "relative" else cfg.epsilon
    return dataclasses.replace(cfg, epsilon=float(eps), epsilon_mode="absolute", normalization="group", pooling="max")


def prefix_span_distances(query: torch.Tensor, positions: Sequence[int], opposing: Sequence[torch.Tensor],
                          cfg: ShearConfig, n_bar: float) -> list[float]:
    """Distance / n_bar of each prefix's last span query[p - w:p] to the closest span (stride
    cfg.stride) of any opposing rollout: one ``group_token_weights`` call. Each prefix span goes to
    the engine as a one-span rollout on one side, the opposing rollouts on the other; the engine
    pairs only opposite sides, so each span's token weight is exactly its minimum. The engine
    divides by the n_bar of what it is given, so eps goes in absolute and the value is rescaled to
    the real group's n_bar."""
    if not positions:
        return []
    w = cfg.span_len
    if min(positions) < w or max(positions) > query.shape[0]:
        raise ValueError(f"prefix positions must lie in [{w}, {query.shape[0]}], got {min(positions)}..{max(positions)}")
    opposing = [h for h in opposing if h.shape[0]]
    if not opposing:
        raise ValueError("prefix_span_distances needs a non-empty opposing rollout")
    spans = [query[p - w:p] for p in positions]  # each [w, d]
    states = spans + opposing
    weights = group_token_weights(states, [True] * len(spans) + [False] * len(opposing), _absolute(cfg, n_bar))
    given_n_bar = mean_norm(states)
    return [float(weights[k][0]) * given_n_bar / n_bar for k in range(len(spans))]


def pairwise_span_matrix(spans: Sequence[torch.Tensor], cfg: ShearConfig, n_bar: float,
                         chunk: int = 256) -> torch.Tensor:
    """Sinkhorn transport cost <P_eps, C> / n_bar (Euclidean C, the engine's W_eps) between every
    pair of equal-length spans (Appendix K, Fig. 11), by the engine's batched solver, ``chunk``
    pairs at a time. The engine's public entry point returns minima over the opposing side, not
    full matrices, hence its solver here. [N, N], zero diagonal, on the spans' device."""
    n = len(spans)
    x = torch.stack(list(spans)).to(getattr(torch, cfg.compute_dtype))  # [N, w, d]
    eps = _absolute(cfg, n_bar).epsilon
    out = x.new_zeros(n, n)
    rows, cols = torch.triu_indices(n, n, offset=1, device=x.device)
    for lo in range(0, rows.numel(), chunk):
        r, c = rows[lo:lo + chunk], cols[lo:lo + chunk]
        values, _ = sinkhorn_transport_cost(torch.cdist(x[r], x[c]), eps, cfg.tol, cfg.max_iter)  # [P]
        out[r, c] = out[c, r] = values / n_bar
    return out
