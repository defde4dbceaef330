"""Adaptive over-relaxation of Sinkhorn's steps, batched over problems (the per-problem solver's
acceleration; ``anderson`` is the tiled solver's, docs/benchmarks.md compares them).

Thibault, Chizat, Dossal & Papadakis 2017, "Overrelaxed Sinkhorn-Knopp algorithm for regularized
optimal transport": u <- u + omega (u_sinkhorn - u), the same for v, i.e. in scaling form
alpha <- alpha (a / (alpha K beta))^omega: the same fixed point as Sinkhorn (omega = 1), reached in
fewer iterations for omega in (1, 2). Each problem's factor is raised at every check towards the
SOR optimum its observed convergence rate implies (``adapt_relaxation``).
"""

from __future__ import annotations

import math

import torch

DEFAULT_OMEGA = 1.7  # starting factor (1 = plain Sinkhorn throughout)
# The largest factor ``adapt_relaxation`` sets, and the growth of the marginal error between two checks
# taken for divergence (growth below it is the oscillation of a factor above the optimum). Anderson
# acceleration falls back to plain Sinkhorn on the same growth. Chosen on a trained LM's span problems:
# docs/benchmarks.md, "Tuning history".
MAX_OMEGA = 1.9
DIVERGENCE = 2.0


def adapt_relaxation(relax: torch.Tensor, err: torch.Tensor, last_err: torch.Tensor, steps: int) -> torch.Tensor:
    """Each problem's over-relaxation factor for its next iterations ([k, 1, 1]) from its marginal
    errors at its last two checks ([k]), ``steps`` iterations apart.

    Near the fixed point over-relaxed Sinkhorn behaves like SOR on a 2-cyclic system (Young 1954;
    Thibault et al. 2017, Sec. 3): with plain Sinkhorn's local rate eta, a factor omega below the
    optimum omega* = 2 / (1 + sqrt(1 - eta)) contracts the error by lambda > omega - 1 per iteration,
    (lambda + omega - 1)^2 = lambda omega^2 eta. The observed lambda thus gives eta, and omega is raised
    to omega* (at most ``MAX_OMEGA``): problems with nearly degenerate plans (eta near 1) need
    factors near 2, where a fixed factor leaves a long tail of slow problems. A problem whose error
    grew more than ``DIVERGENCE`` times since its last check continues with omega = 1 for good: plain
    Sinkhorn, whose convergence is guaranteed. A factor of 1 is never raised (omega = 1 from the start
    runs POT's plain iterations).
    """
    ratio = (err / last_err)[:, None, None]  # [k, 1, 1]; 0 at a problem's first check (last_err = inf)
    rate = ratio.clamp(min=1e-30).pow(1.0 / steps)  # lambda per iteration
    eta = ((rate + relax - 1).square() / (rate * relax.square())).clamp(max=1.0)
    optimal = (2 / (1 + torch.sqrt(1 - eta))).clamp(max=MAX_OMEGA)
    raise_to = (ratio > 0) & (ratio < 1) & (rate > relax - 1) & (relax > 1)  # the formula's range
    relax = torch.where(raise_to, torch.maximum(relax, optimal), relax)
    return torch.where(ratio > DIVERGENCE, 1.0, relax)


class OverRelaxation:
    """Over-relaxed row and column steps (``iteration.sinkhorn_iterations``' ``rows`` and ``cols``) of
    k problems with marginals a and b (scalars: uniform), alpha [k, 1, n], beta [k, m, 1]."""

    def __init__(self, problems: int, omega: float, a: float, b: float, like: torch.Tensor):
        self.omega, self.a, self.b = omega, a, b
        self.relax = like.new_full((problems, 1, 1), omega)  # [k, 1, 1] each problem's factor
        self.last_err = like.new_full((problems,), math.inf)  # [k] marginal error at the last check

    def rows(self, alpha: torch.Tensor, k_beta: torch.Tensor) -> torch.Tensor:
        """alpha (a / (alpha * K beta))^omega; K beta [k, 1, n]."""
        return alpha * (self.a / (alpha * k_beta)).pow_(self.relax)

    def cols(self, beta: torch.Tensor, k_t_alpha: torch.Tensor) -> torch.Tensor:
        """beta (b / (beta * K^T alpha))^omega; K^T alpha [k, m, 1]."""
        return beta * (self.b / (beta * k_t_alpha)).pow_(self.relax)

    def checked(self, err: torch.Tensor, steps: int) -> None:
        """The marginal errors err [k] at a check, ``steps`` iterations after the last: adapt the factors."""
        self.relax = adapt_relaxation(self.relax, err, self.last_err, steps)
        self.last_err = err

    def restart(self, slots: torch.Tensor) -> None:
        """New problems in the slots (indices): the starting factor, no check yet."""
        self.relax[slots], self.last_err[slots] = self.omega, math.inf

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the problems ``keep`` (indices), in that order."""
        self.relax, self.last_err = self.relax[keep], self.last_err[keep]
