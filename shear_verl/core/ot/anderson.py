"""Anderson acceleration of Sinkhorn's row-potential iteration, batched over problems (torch).

The tiled solver's acceleration (``AndersonSinkhorn``: the ``rows`` and ``cols`` of
``iteration.sinkhorn_iterations``); its numba twin is ``fused._advance`` (the same step per problem,
in host memory, on this object's arrays).
"""

from __future__ import annotations

import math

import torch

# Residuals kept, and the ridge added to their Gram matrix in units of its trace times the dtype's
# resolution: the least ridge that keeps the solve well-posed (condition <= 1 / (10 eps)) when the
# kept residuals become nearly parallel (the figures behind both: docs/benchmarks.md, "Tuning history").
ANDERSON_MEMORY = 5
ANDERSON_RIDGE = 10.0


class Anderson:
    """Anderson acceleration of a fixed-point iteration u <- G(u), batched over independent problems.

    Type II with the last ``memory`` differences (Walker & Ni 2011, "Anderson acceleration for
    fixed-point iterations", Sec. 3, with the residual r = G(u) - u): gamma = argmin ||r - dR gamma||
    over the kept residual differences dR, then u <- u + r - (dU + dR) gamma. A regularised least
    squares (Scieur, d'Aspremont & Bach 2016, "Regularized nonlinear acceleration": a ridge on the
    Gram matrix dR dR^T) keeps the steps finite when residuals become nearly parallel. Why here: on
    SHEAR's span problems Sinkhorn's error falls at a few slow rates that a handful of past residuals
    capture, so it takes fewer iterations than over-relaxed Sinkhorn (docs/benchmarks.md). With
    memory 0, or for problems ``fall_back`` was called on, the step is the plain iteration u + r.
    """

    def __init__(self, problems: int, size: int, memory: int, like: torch.Tensor):
        self.memory = memory
        self.d_r = like.new_zeros(problems, memory, size)  # [P, m, n] residual differences
        self.d_ur = like.new_zeros(problems, memory, size)  # [P, m, n] iterate + residual differences
        self.gram = like.new_zeros(problems, memory, memory)  # [P, m, m] d_r d_r^T
        self.plain = torch.zeros(problems, dtype=torch.bool, device=like.device)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (u, r) of the previous step
        self.steps = 0

    def step(self, u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The next iterate from u [P, n] and its residual r = G(u) - u [P, n]."""
        if self.memory == 0:
            return u + r
        if self.last is not None:
            slot = self.steps % self.memory  # the oldest difference makes room
            last_u, last_r = self.last
            d_r = torch.sub(r, last_r, out=self.d_r[:, slot])  # [P, n], written in place
            torch.sub(u, last_u, out=self.d_ur[:, slot]).add_(d_r)
            products = torch.bmm(d_r[:, None, :], self.d_r.transpose(1, 2))[:, 0]  # [P, m]
            self.gram[:, slot] = products
            self.gram[:, :, slot] = products
        self.last = (u, r)
        self.steps += 1
        # Empty slots are zero rows and columns: the ridge (and its floor, for an all-zero Gram
        # matrix) keeps the system regular and their gamma 0.
        info = torch.finfo(u.dtype)
        ridge = ANDERSON_RIDGE * info.eps * self.gram.diagonal(dim1=1, dim2=2).sum(1) + info.tiny  # [P]
        system = self.gram + torch.diag_embed(ridge[:, None].expand(-1, self.memory))  # [P, m, m]
        d_r_r = torch.bmm(r[:, None, :], self.d_r.transpose(1, 2)).transpose(1, 2)  # [P, m, 1] (row form: faster)
        gamma = torch.linalg.solve_ex(system, d_r_r)[0].masked_fill_(self.plain[:, None, None], 0.0)  # [P, m, 1]
        # u + r - gamma^T (dU + dR), fused
        return torch.baddbmm((u + r)[:, None, :], gamma.transpose(1, 2), self.d_ur, alpha=-1)[:, 0]

    def fall_back(self, problems: torch.Tensor) -> None:
        """Plain iterations from now on for the problems marked [P] (their acceleration misbehaved)."""
        self.plain |= problems

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the problems ``keep`` (indices), in that order."""
        self.d_r, self.d_ur, self.gram, self.plain = self.d_r[keep], self.d_ur[keep], self.gram[keep], self.plain[keep]
        if self.last is not None:
            self.last = (self.last[0][keep], self.last[1][keep])


class AndersonSinkhorn(Anderson):
    """Anderson acceleration of Sinkhorn's row potential u = log alpha [P, n] for k problems with
    uniform marginals a and b: the fixed-point map is G(u) = log a - log K(b / K^T e^u), i.e. a plain
    row step after an exact column step, so ``rows`` takes the residual log a - log(alpha * K beta)
    and ``cols`` is Sinkhorn's column step, whose marginal is then exact."""

    def __init__(self, problems: int, size: int, memory: int, a: float, b: float, like: torch.Tensor):
        super().__init__(problems, size, memory, like)
        self.log_a, self.b = math.log(a), b
        self.u = like.new_zeros(problems, size)  # [P, n] log row scalings

    def rows(self, alpha: torch.Tensor, k_beta: torch.Tensor) -> torch.Tensor:
        """exp of Anderson's step on u from the residual G(u) - u = log a - log(alpha * K beta)."""
        self.u = self.step(self.u, self.log_a - (alpha * k_beta).log())
        return self.u.exp()

    def cols(self, beta: torch.Tensor, k_t_alpha: torch.Tensor) -> torch.Tensor:
        """b / K^T alpha (beta unused: the step is exact)."""
        return self.b / k_t_alpha

    def select(self, keep: torch.Tensor) -> None:
        super().select(keep)
        self.u = self.u[keep]
