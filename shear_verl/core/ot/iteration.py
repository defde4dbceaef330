"""Sinkhorn's iteration, written once for both torch solvers (Chen et al. 2026, arXiv 2604.23318,
Algorithm 1 line 4: the W_eps of a span pair; docs/method.md, "Transport cost").

Sinkhorn-Knopp in scaling form (Cuturi 2013, "Sinkhorn distances", Algorithm 1; Peyre & Cuturi 2019,
"Computational Optimal Transport", Sec. 4.2, eq. 4.15): the plan diag(alpha) K diag(beta) with
K = exp(-C / eps), and an iteration alternates
  (1) the row (u-) step     alpha <- a / (K beta)          from the rows' marginal alpha * K beta,
  (2) the column (v-) step  beta  <- b / (K^T alpha).
The caller passes the kernel products (``k_mul``: v -> K v, ``kt_mul``: v -> K^T v; per problem,
batched: written-out kernels in ``sinkhorn``, shared blocks in ``tiling``) and the acceleration
that replaces the plain steps (``relaxation.OverRelaxation``, ``anderson.Anderson``): its ``rows``
and ``cols`` take the products and return the new scalings, so the fixed point is Sinkhorn's.

The numba kernels (``fused``) run the same iteration per problem in host memory; they do not call
this loop, whose per-iteration torch calls are what they save (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sinkhorn_iterations(k_mul: Callable, kt_mul: Callable, accel, alpha: torch.Tensor, beta: torch.Tensor,
                        k_beta: torch.Tensor, steps: int, first: bool = False) -> tuple[torch.Tensor, ...]:
    """``steps`` iterations from the scalings (alpha, beta) and K beta; ``first``: the first one
    starts at its column step (no rows' marginal yet). Returns (alpha, beta, K^T alpha, K beta): the
    iterate and both products, from which the caller reads the marginals, alpha * K beta and
    beta * K^T alpha (exact after a plain column step), without another product."""
    k_t_alpha = None
    for step in range(steps):
        if step or not first:
            alpha = accel.rows(alpha, k_beta)  # (1) row step from the rows' marginal alpha * K beta
        k_t_alpha = kt_mul(alpha)
        beta = accel.cols(beta, k_t_alpha)  # (2) column step
        k_beta = k_mul(beta)
    return alpha, beta, k_t_alpha, k_beta
