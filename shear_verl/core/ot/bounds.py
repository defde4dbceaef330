"""Lower bounds on span-pair transport costs, for exact pruning (docs/method.md, "Exact pruning").

W_eps = <P_eps, C> >= W1 (the entropic plan is a coupling) >= any Kantorovich dual objective, so a
pair whose bound reaches the minima it could lower is skipped without changing a weight. Before any
solve: the mean bound and the nearest-neighbour bounds (Kantorovich-Rubinstein: W1(P, Q) >=
E_P f - E_Q f for any 1-Lipschitz f, uniform measures, Euclidean cost). During the tiled solver's
iterations: the dual bound of its row potentials (``raise_dual_bound``). ``RunningMinima`` holds the
minima.
"""

from __future__ import annotations

import dataclasses

import torch

from shear_verl.core.ot import fused
from shear_verl.core.ot.tiling import Tiling
from shear_verl.core.spans import window_reduce

# Hard minus soft c-transform bound, per column: between 0 and eps log n. Problems whose soft bound is
# further below their threshold than this many eps are left running without the costly hard bound
# (the measured spread: docs/benchmarks.md, "Tuning history").
HARD_BOUND_REACH = 1.5


def mean_bound(means_x: torch.Tensor, means_y: torch.Tensor) -> torch.Tensor:
    """||mean_P - mean_Q||_2 <= W1 of every span pair, from the span means [K_x, d], [K_y, d]. [K_x, K_y]

    f(x) = <u, x> with u the unit vector along mean_P - mean_Q is 1-Lipschitz, and E_P f - E_Q f is
    the distance of the means."""
    return torch.cdist(means_x, means_y)


def mean_nearest_neighbour(dist: torch.Tensor, starts_x: list[int], n: int, starts_y: list[int], m: int,
                           stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed mean nearest-neighbour distances between every span of x and every span of y.

    dist: [T_x, T_y]. Returns (x_to_y, y_to_x), both [K_x, K_y]:
    x_to_y[k, l] = mean over x in span k of min over y in span l of ||x - y||.
    """
    nn_x = window_reduce(dist, 1, starts_y, m, stride, "amin")  # [T_x, K_y]
    x_to_y = window_reduce(nn_x, 0, starts_x, n, stride, "mean")  # [K_x, K_y]
    nn_y = window_reduce(dist, 0, starts_x, n, stride, "amin")  # [K_x, T_y]
    y_to_x = window_reduce(nn_y, 1, starts_y, m, stride, "mean")  # [K_x, K_y]
    return x_to_y, y_to_x


def nearest_neighbour_bound(dist: torch.Tensor, starts_x: list[int], n: int, starts_y: list[int], m: int,
                            stride: int) -> torch.Tensor:
    """max of the two directed mean nearest-neighbour distances <= W1 of every span pair. [K_x, K_y]

    f(x) = distance from x to the support of Q is 1-Lipschitz and 0 on Q, so E_P f - E_Q f is the
    mean nearest-neighbour distance from P to Q (and symmetrically); read off the pair's token
    distances dist [T_x, T_y], usually much tighter than the mean bound."""
    x_to_y, y_to_x = mean_nearest_neighbour(dist, starts_x, n, starts_y, m, stride)
    return torch.maximum(x_to_y, y_to_x)


def w1_dual_bound(blocks: torch.Tensor, tiles: torch.Tensor, f: torch.Tensor,
                  transposed: bool = False, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Lower bound on W1 (hence on <P_eps, C>) of every problem tiles [P, L, L] (costs: the block
    matrix of blocks [NB, g, g]) from any row potential f [P, L, g]; ``transposed``: of the
    transposed problems (costs C^T, f on the original columns); ``backend``: see ``backend``.

    Kantorovich duality with a c-transform (Peyre & Cuturi 2019, "Computational Optimal Transport",
    Sec. 3.1 and Prop. 3.1): f^c(y) = min_x C(x, y) - f(x) makes f(x) + f^c(y) <= C(x, y), so
    mean f + mean f^c <= W1 for uniform marginals whatever f is, with equality at an optimal f.
    Invariant to a constant added to f.
    Returns (bound [P], f^c [P, L, g]): f^c is the row potential of the transposed problems, whose
    bound mean f^cc + mean f^c is at least as tight (``_raise_dual_bound``).
    """
    if backend == "numba":
        f_c = fused.c_transform(blocks, tiles, f, transposed)
    else:
        tiling = Tiling(tiles.transpose(1, 2) if transposed else tiles)
        costs = blocks[tiling.used]  # [nb, g, g]
        f_c = tiling.c_transform(f, costs if transposed else costs.transpose(1, 2).contiguous())  # [P, L, g]
    return f.mean(dim=(1, 2)) + f_c.mean(dim=(1, 2)), f_c


@dataclasses.dataclass
class RunningMinima:
    """Problems that are entries (rows[p], cols[p]) of a matrix of which the caller only needs the row
    and column minima, with the minima known so far (updated in place as problems are solved). A
    problem whose value is proved >= both minima of its row and column cannot change either."""

    rows: torch.Tensor  # [P] row of each problem
    cols: torch.Tensor  # [P] column of each problem
    best_rows: torch.Tensor  # [R]
    best_cols: torch.Tensor  # [C]

    def threshold(self, problems: torch.Tensor) -> torch.Tensor:
        """The value a problem must reach to be skippable: max of its row's and its column's best. [k]"""
        return torch.maximum(self.best_rows[self.rows[problems]], self.best_cols[self.cols[problems]])

    def update(self, problems: torch.Tensor, values: torch.Tensor) -> None:
        # float64 values into float32 bests: rounding is monotone, so a value >= a rounded best (the
        # only kind the dual bound stops) still rounds to >= it and could not have lowered it.
        values = values.to(self.best_rows.dtype)
        self.best_rows.scatter_reduce_(0, self.rows[problems], values, "amin")
        self.best_cols.scatter_reduce_(0, self.cols[problems], values, "amin")


def raise_dual_bound(blocks: torch.Tensor, tiles: torch.Tensor, alpha: torch.Tensor,
                      k_t_alpha: torch.Tensor, epsilon: float, shift: torch.Tensor, threshold: torch.Tensor,
                      lower: torch.Tensor, hard: torch.Tensor, running: torch.Tensor, backend: str) -> None:
    """Raise the W1 lower bounds ``lower`` [P] of the running problems with f = eps log alpha (in place).

    ``w1_dual_bound`` (mean f + mean f^c) is a pass over every problem's costs, several Sinkhorn
    iterations' worth, so the soft c-transform comes first: -eps log sum_x exp((f(x) - C(x, y)) / eps)
    <= f^c(y), and it is free (-eps log(K^T alpha) + shift, the product the next half-step uses). The
    hard bound is computed once per problem (it barely moves after the first check), and only for
    problems still below their threshold whose soft bound is within ``HARD_BOUND_REACH`` eps of it
    (``hard`` marks them): speed only, a problem not stopped is solved. Those it leaves short get a
    second c-transform, back to the rows: f^cc >= f, so mean f^cc + mean f^c is at least as tight
    (alternating c-transforms never lower the dual objective, and a third would return f^c: Peyre &
    Cuturi 2019, Sec. 5.1, eq. 5.3). On a trained LM's span problems at eps = 0.05 it took a third
    off the first bound's gap to W1, and 1.6-4.7 points off the share of pairs solved (none on the
    synthetic states), at no cost in time.
    """
    f = epsilon * alpha.log()  # [P, L, g] row potentials, up to a constant
    soft = f.mean(dim=(1, 2)) - epsilon * k_t_alpha.log().mean(dim=(1, 2)) + shift  # [P]
    # Only where every K^T alpha is a normal number with full precision (not rounded to 0 or subnormal).
    exact = k_t_alpha.amin(dim=(1, 2)) >= torch.finfo(k_t_alpha.dtype).tiny / torch.finfo(k_t_alpha.dtype).eps
    torch.maximum(lower, torch.where(running & exact, soft, lower), out=lower)
    near = (running & ~hard & (lower < threshold) & (lower + HARD_BOUND_REACH * epsilon >= threshold))
    near = near.nonzero().squeeze(1)
    if near.numel():
        bound, f_c = w1_dual_bound(blocks, tiles[near], f[near], backend=backend)
        lower[near] = torch.maximum(lower[near], bound)
        hard[near] = True
        short = (lower[near] < threshold[near]).nonzero().squeeze(1)
        if short.numel():  # the transposed problems (rows y, costs C^T) with f^c as their row potential
            again = near[short]
            bound, _ = w1_dual_bound(blocks, tiles[again], f_c[short], transposed=True, backend=backend)
            lower[again] = torch.maximum(lower[again], bound)
