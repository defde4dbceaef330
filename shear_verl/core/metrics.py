"""Span-to-span distances of one (rollout, opposing rollout) pair (Algorithm 1 line 4 and Sec. 5.4).

All functions take the token-to-token Euclidean distance matrix of the pair, computed once, and
the span layout of both rollouts; spans are windows of it, never copies of the hidden states.
``sinkhorn`` and ``w1`` are solved per span pair (see ``span_distances``, which prunes them); the
ablation metrics below are cheap enough to evaluate on every span pair at once.
"""

from __future__ import annotations

import ot
import torch

from shear_verl.core.ot.bounds import mean_nearest_neighbour


def chamfer(dist: torch.Tensor, starts_x: list[int], n: int, starts_y: list[int], m: int, stride: int) -> torch.Tensor:
    """Chamfer distance: the average of the two directed mean nearest-neighbour distances. [K_x, K_y]"""
    x_to_y, y_to_x = mean_nearest_neighbour(dist, starts_x, n, starts_y, m, stride)
    return 0.5 * (x_to_y + y_to_x)


def _span_index(starts: list[int], size: int, device: torch.device) -> torch.Tensor:
    """Token indices of every span. [K, size]"""
    return torch.tensor(starts, device=device)[:, None] + torch.arange(size, device=device)


def _cross_blocks(dist: torch.Tensor, starts_a: list[int], size_a: int, starts_b: list[int], size_b: int) -> torch.Tensor:
    """Blocks dist[span_a, span_b] of every span pair. [Ka, Kb, na, nb]"""
    rows = _span_index(starts_a, size_a, dist.device)  # [Ka, na]
    cols = _span_index(starts_b, size_b, dist.device)  # [Kb, nb]
    return dist[rows[:, None, :, None], cols[None, :, None, :]]


def _self_blocks(dist: torch.Tensor, starts: list[int], size: int) -> torch.Tensor:
    """Blocks dist[span, span] of every span. [K, n, n]"""
    idx = _span_index(starts, size, dist.device)  # [K, n]
    return dist[idx[:, :, None], idx[:, None, :]]


def _median(values: torch.Tensor) -> torch.Tensor:
    """Median over the last dim, averaging the two middle values for even counts (numpy's median)."""
    s = values.sort(dim=-1).values
    c = s.shape[-1]
    return 0.5 * (s[..., (c - 1) // 2] + s[..., c // 2])


_MIN_SIGMA = 1e-12  # RBF bandwidth floor: spans whose cross distances are mostly 0 would divide by 0


def mmd(dist: torch.Tensor, dist_xx: torch.Tensor, dist_yy: torch.Tensor, starts_x: list[int], n: int,
        starts_y: list[int], m: int, block_bytes: int) -> torch.Tensor:
    """sqrt of the biased (V-statistic) MMD^2 with RBF kernel exp(-||x-y||^2 / (2 sigma^2)). [K_x, K_y]

    sigma is the median of the pair's cross distances (Gretton et al. 2012's median heuristic), so it
    differs per span pair and the within-span kernels are recomputed per pair. dist_xx: [T_x, T_x],
    dist_yy: [T_y, T_y]. Rows of x spans are processed in chunks of about ``block_bytes``.
    """
    kx, ky = len(starts_x), len(starts_y)
    out = dist.new_empty(kx, ky)
    yy = _self_blocks(dist_yy, starts_y, m).reshape(ky, m * m).square()  # [Ky, m*m]
    per_row = ky * (n * m + n * n + m * m) * dist.element_size() * 3
    chunk = max(1, block_bytes // max(per_row, 1))
    for lo in range(0, kx, chunk):
        rows = starts_x[lo:lo + chunk]
        xy = _cross_blocks(dist, rows, n, starts_y, m).reshape(len(rows), ky, n * m)  # [c, Ky, n*m]
        gamma = 0.5 / _median(xy).clamp_min(_MIN_SIGMA).square()  # [c, Ky] = 1 / (2 sigma^2)
        xx = _self_blocks(dist_xx, rows, n).reshape(len(rows), 1, n * n).square()  # [c, 1, n*n]
        k_xy = torch.exp(-gamma[..., None] * xy.square()).mean(-1)  # [c, Ky]
        k_xx = torch.exp(-gamma[..., None] * xx).mean(-1)  # [c, Ky]
        k_yy = torch.exp(-gamma[..., None] * yy[None]).mean(-1)  # [c, Ky]
        out[lo:lo + len(rows)] = (k_xx + k_yy - 2.0 * k_xy).clamp_min(0.0).sqrt()
    return out


def cosine(means_x: torch.Tensor, means_y: torch.Tensor) -> torch.Tensor:
    """1 - cos(mean_x, mean_y) for every span pair, from the span means [K_x, d] and [K_y, d]. [K_x, K_y]"""
    return 1.0 - torch.nn.functional.cosine_similarity(means_x[:, None, :], means_y[None, :, :], dim=-1)


def exact_w1(costs: torch.Tensor) -> torch.Tensor:
    """Exact W1 between uniform measures for a batch of cost matrices [B, n, m], by POT's network simplex.

    Only for the small-size ablation metric "w1": ``ot.emd2`` runs on the CPU one problem at a time.
    """
    b, n, m = costs.shape
    a_w = costs.new_full((n,), 1.0 / n)
    b_w = costs.new_full((m,), 1.0 / m)
    values = [ot.emd2(a_w, b_w, c) for c in costs]
    return torch.stack(values).to(costs) if values else costs.new_empty(0)
