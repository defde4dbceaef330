"""Sinkhorn for problems whose cost matrices share blocks (the engine's main solver).

``tiled_sinkhorn_transport_cost`` solves problems whose cost matrices share blocks (SHEAR's
overlapping spans): each block's kernel is built once and multiplied by all the scaling vectors that
need it as one small GEMM, instead of one copied kernel per problem. It accelerates Sinkhorn with
Anderson's method (``Anderson``) instead of over-relaxation: each iteration's exact column step gives
the row potential's residual, and a least-squares combination of the last few residuals takes out
the slow modes (fewer iterations than over-relaxation on SHEAR's span problems: docs/benchmarks.md).
The iteration is ``iteration.sinkhorn_iterations`` on the torch backend.

On tensors in host memory the tiled solver's loops (its iterations and the dual bound's c-transforms)
run as numba kernels (``fused``) instead of ~30 batched torch operations per iteration: each problem
runs its iterations up to the next check at once, its kernel written out in the core's cache, and
stops at the iteration it converges. The iterations are the same (checked to rounding against the
torch path, which GPU tensors take).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from shear_verl.core.ot import fused
from shear_verl.core.ot.anderson import ANDERSON_MEMORY, ANDERSON_RIDGE, AndersonSinkhorn
from shear_verl.core.ot.backend import check_backend, default_backend
from shear_verl.core.ot.bounds import RunningMinima, raise_dual_bound
from shear_verl.core.ot.iteration import sinkhorn_iterations
from shear_verl.core.ot.relaxation import DIVERGENCE
from shear_verl.core.ot.tiling import Tiling, kernel_products


def tiled_sinkhorn_transport_cost(
    blocks: torch.Tensor, tiles: torch.Tensor, epsilon: float, tol: float, max_iter: int,
    memory: int = ANDERSON_MEMORY, check_every: int = 8, minima: RunningMinima | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sinkhorn_transport_cost`` for problems that share cost blocks: same fixed point and stopping
    test (both marginal errors < tol: each iterate's columns are exact, its rows are tested), one
    kernel for all problems, and Anderson acceleration (``Anderson``, last ``memory`` residuals; 0 =
    POT's plain iterations) instead of over-relaxation, with the same safeguard.

    blocks: [NB, g, g] costs; tiles: [P, L, L] block ids, problem p's cost is the block matrix
    blocks[tiles[p]] ([L g, L g], uniform marginals). Why: SHEAR's span cost matrices are windows of
    one token-distance matrix per rollout pair, tilings of its gcd(w, s)-blocks for the spans on that
    grid; each block's Gibbs kernel is then computed once and multiplied by all the scaling vectors
    that need it (``tiling.Tiling``), not copied and streamed once per span pair.

    The shared kernel exp(-(C - min C)/eps) cannot be stabilised per problem (``sinkhorn_transport_cost``
    absorbs each problem's potentials into its own kernel), so a problem is only taken here when its
    kernel entries stay far inside the dtype's range: (C - min C)/eps <= 0.45 * -log(tiny), and its
    scalings are checked to stay inside exp(+-0.9 * log(max)) (every ``check_every`` iterations).
    float32's range holds costs spread over 39 eps: on a trained LM's span problems (spread up to
    ~1.6 in units of the mean norm) that fails below eps ~ 0.04 relative, which the paper's raw
    eps ~ 4.5 reaches if the model's mean hidden-state norm exceeds ~110. Such problems are solved
    again with the same shared blocks in float64 (range 318 eps), a third of them at a time (float64
    doubles every tensor), values returned in the blocks' dtype. A problem outside float64's range
    too is not solved: ``solved`` is False and the caller gives it to ``sinkhorn_transport_cost``.

    minima (optional): the caller needs only row and column minima of the problems' values. At every
    check a running problem whose W1 dual bound from its current row scalings (f = eps log alpha,
    ``bounds.raise_dual_bound``) reaches the max of its row's and its column's best is stopped (``pruned``):
    W_eps >= W1 >= the bound, so it cannot change either. A few Sinkhorn iterations already give
    potentials close enough to the optimal ones for this bound to be near W1, far tighter than bounds
    from the costs alone. The problems solved here lower the minima at the end (``_tiled_sinkhorn``).
    backend: "numba" or "torch" (``backend``); None: ``default_backend`` for the blocks' device.
    Returns (values [P], capped [P] bool, solved [P] bool, pruned [P] bool); values are NaN where
    not solved or pruned.
    """
    backend = check_backend(default_backend(blocks) if backend is None else backend, blocks)
    values, capped, solved, pruned = _tiled_sinkhorn(blocks, tiles, epsilon, tol, max_iter, memory, check_every, minima,
                                                   backend)
    rest = (~(solved | pruned)).nonzero().squeeze(1)
    if rest.numel() == 0 or blocks.dtype == torch.float64:
        return values, capped, solved, pruned
    for part in rest.split(-(-tiles.shape[0] // 3)):
        used, local = torch.unique(tiles[part], return_inverse=True)
        sub = None if minima is None else RunningMinima(minima.rows[part], minima.cols[part], minima.best_rows,
                                                        minima.best_cols)
        v, capped[part], solved[part], pruned[part] = _tiled_sinkhorn(blocks[used].double(), local, epsilon, tol,
                                                                      max_iter, memory, check_every, sub,
                                                                      backend)
        values[part] = v.to(values.dtype)
    return values, capped, solved, pruned


def _tiled_sinkhorn(
    blocks: torch.Tensor, tiles: torch.Tensor, epsilon: float, tol: float, max_iter: int, memory: int,
    check_every: int, minima: RunningMinima | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tiled_sinkhorn_transport_cost`` in the blocks' dtype, without the float64 retry."""
    P, L, _ = tiles.shape
    g = blocks.shape[1]
    n = L * g
    device, dtype = blocks.device, blocks.dtype
    values = blocks.new_full((P,), math.nan)
    capped = torch.zeros(P, dtype=torch.bool, device=device)
    solved = torch.zeros(P, dtype=torch.bool, device=device)
    pruned = torch.zeros(P, dtype=torch.bool, device=device)
    if P == 0:
        return values, capped, solved, pruned
    a = b = 1.0 / n
    info = torch.finfo(dtype)
    exponent_limit = 0.45 * -math.log(info.tiny)
    scaling_limit = 0.9 * math.log(info.max)
    shift = blocks.amin()
    exponent = (blocks - shift) / epsilon  # [NB, g, g], >= 0
    in_range = exponent.amax(dim=(1, 2))[tiles].amax(dim=(1, 2)) <= exponent_limit  # [P]
    kernel_all = torch.exp(exponent.neg_())  # exp(-(C - min C)/eps): a constant factor, absorbed by the scalings
    del exponent

    active = in_range.nonzero().squeeze(1)  # problems still iterating
    if active.numel() == 0:
        return values, capped, solved, pruned
    on_host = backend == "numba"
    active_tiles = tiles[active]
    if not on_host:
        k_mul, kt_mul = _flat(*kernel_products(active_tiles, kernel_all), L, g)
    accel = AndersonSinkhorn(active.shape[0], n, memory, a, b, blocks)  # holds u = log alpha [P_act, n]
    alpha = torch.ones_like(accel.u)
    k_t_alpha, row = torch.empty_like(alpha), torch.empty_like(alpha)  # [P_act, n] K^T alpha, alpha * K beta
    k_beta = torch.empty_like(alpha)  # [P_act, n] K beta (torch backend)
    last_err = blocks.new_full((active.shape[0],), math.inf)
    lower = blocks.new_full((active.shape[0],), -math.inf)  # [P_act] W1 lower bounds (with minima)
    hard = torch.zeros(active.shape[0], dtype=torch.bool, device=device)  # hard bound taken
    plan_alpha, plan_beta = blocks.new_empty(P, n), blocks.new_empty(P, n)  # [P, n] scalings of the solved problems
    iters = 0
    while True:
        # Iterate to the next check (``iteration.sinkhorn_iterations``; the first starts at the column
        # step from alpha = 1): Anderson's step on u = log alpha, then Sinkhorn's exact column step.
        steps = 1 if iters == 0 else min(check_every - iters % check_every, max_iter - iters)
        if on_host:  # the same iterations per problem, each stopping once converged (``fused``)
            fused.advance(kernel_all, active_tiles, alpha, k_t_alpha, row, accel, steps, iters == 0, tol,
                          ANDERSON_RIDGE * info.eps)
        else:
            alpha, _, k_t_alpha, k_beta = sinkhorn_iterations(k_mul, kt_mul, accel, alpha, None, k_beta, steps,
                                                              first=iters == 0)
            row = alpha * k_beta
        iters += steps
        if iters % check_every == 0 or iters >= max_iter:
            beta = b / k_t_alpha  # [P_act, n]
            err = torch.linalg.vector_norm(row - a, dim=1)  # [P_act]; the columns are exact
            # A problem whose error more than doubled since the last check iterates plainly from now
            # on (plain Sinkhorn's convergence is guaranteed; smaller growth is the acceleration's
            # normal non-monotone path).
            accel.fall_back(err > DIVERGENCE * last_err)
            last_err = err
            scale = torch.maximum(accel.u.abs().amax(dim=1), beta.log().abs().amax(dim=1))
            lost = ~(scale <= scaling_limit)  # also NaN: left to the stabilised solver
            conv = (err < tol) & ~lost
            done = conv | lost | (iters >= max_iter)
            fin = (done & ~lost).nonzero().squeeze(1)
            plan_alpha[active[fin]], plan_beta[active[fin]] = alpha[fin], beta[fin]
            capped[active[fin]] = ~conv[fin]
            solved[active[fin]] = True
            if minima is not None:
                threshold = minima.threshold(active)  # [P_act]
                raise_dual_bound(blocks, active_tiles, alpha.view(-1, L, g), k_t_alpha.view(-1, L, g), epsilon,
                                  shift, threshold, lower, hard, ~done, backend)
                cut = ~done & (lower >= threshold)
                pruned[active[cut]] = True
                done = done | cut
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                active = active[keep]
                if active.numel() == 0:
                    break
                alpha, k_t_alpha, row, k_beta = alpha[keep], k_t_alpha[keep], row[keep], k_beta[keep]
                last_err, lower, hard = last_err[keep], lower[keep], hard[keep]
                accel.select(keep)
                active_tiles = tiles[active]
                if not on_host:
                    k_mul, kt_mul = _flat(*kernel_products(active_tiles, kernel_all), L, g)
    # <P, C> = sum_ij alpha_i K_ij beta_j C_ij of all solved problems at once, by the block products on K * C,
    # and only then do they lower the minima. At the checks, problems finish a few at a time and a tiling of
    # those few shares few blocks (several times the cost per problem); lowering the minima there stopped
    # few more problems and cost more time than it saved (docs/benchmarks.md, "Tuning history").
    ids = solved.nonzero().squeeze(1)
    if ids.numel():
        if on_host:
            values[ids] = fused.transport_costs(kernel_all * blocks, tiles[ids], plan_alpha[ids], plan_beta[ids])
        else:
            tiling = Tiling(tiles[ids])
            weighted = kernel_all[tiling.used] * blocks[tiling.used]
            values[ids] = (plan_alpha[ids] * tiling.k_mul(plan_beta[ids].view(-1, L, g), weighted).view(-1, n)).sum(1)
        if minima is not None:
            minima.update(ids, values[ids])
    return values, capped, solved, pruned


def _flat(k_mul: Callable, kt_mul: Callable, L: int, g: int) -> tuple[Callable, Callable]:
    """The block products ([P, L, g] -> [P, L, g]) on flat vectors [P, L g]."""
    return (lambda v: k_mul(v.view(-1, L, g)).view(-1, L * g)), (lambda v: kt_mul(v.view(-1, L, g)).view(-1, L * g))
