"""Batched Sinkhorn distance <P_eps, C> between uniform measures (SHEAR's W_eps, docs/method.md
section "Transport cost"; Chen et al. 2026, arXiv 2604.23318, Algorithm 1 line 4).

Same iterations as POT's ``ot.bregman.sinkhorn_log`` (v-update, then u-update, stop when the L2
error of the column marginal is below ``tol``), so the fixed point and the returned value
``<P_eps, C>`` are POT's ``ot.sinkhorn2(a, b, C, eps, method="sinkhorn_log")``. Hand-written because
SHEAR needs millions of 100x100 problems per step, continuously batched in cache on whatever device
holds the hidden states (POT >= 0.9.6's ``ot.batch`` solves a batch in one pass over memory, with a
fixed iteration count or a stopping test on the whole batch; tests/core use it as an oracle).

Numerics (Schmitzer 2019, "Stabilized sparse scaling algorithms for entropy regularized transport
problems", log-domain stabilisation / absorption): dual potentials (u, v) live in the log domain;
they are absorbed into the kernel K = exp(-C/eps + u + v), which is then the current plan, and the
iterations in between are Sinkhorn scalings (alpha, beta) by batched mat-vecs. Nothing
under/overflows because (i) the first iteration is POT's log-domain one (computed with a single exp
after shifting each column's maximum to 1, or with logsumexp where a row would underflow), and
(ii) after an absorption the plan's rows sum to a = 1/n, so one half-step rescales any row or
column by at most a factor max(n,m)^omega; the scalings are checked every ``_cycle_length``
iterations (at most exp(+-_MAX_LOG_SCALING) of growth in between) and absorbed again once they
exceed exp(+-_ABSORB_LOG_SCALING), so exp never leaves float32's range.

Speed by design (the fixed point is unchanged; only the path to it and when it is reached are):
- Cache blocking with continuous batching: at most ``block`` problems are iterated at once, so their
  kernels stay in cache for all their iterations instead of streaming a large batch from memory on
  every iteration; a problem that converges leaves its slot at the next check and the next queued
  problem takes it, so the block stays full and the per-call overhead is shared.
- Adaptive over-relaxation (``relaxation.OverRelaxation``) of the iteration written once in
  ``iteration.sinkhorn_iterations``. Because a relaxed step leaves its marginal inexact, the stopping
  test requires both marginal errors < tol (POT's test is the columns only, its rows being exact).
- Mat-vecs as row-vector products (bmm of [k, 1, n] by [k, n, m]) with a transposed copy of the
  kernel for K beta (docs/benchmarks.md, "Tuning history").
"""

from __future__ import annotations

import math

import torch

from shear_verl.core.ot.iteration import sinkhorn_iterations
from shear_verl.core.ot.relaxation import DEFAULT_OMEGA, MAX_OMEGA, OverRelaxation

_MAX_LOG_SCALING = 48.0  # worst-case growth of |log alpha|, |log beta| between two checks
_ABSORB_LOG_SCALING = 30.0  # absorb when a scaling exceeds this (30 + 48 < 87, float32's exp range)
_MIN_ROW_SUM = 1e-20  # below this the one-exp first iteration falls back to logsumexp
DEFAULT_BLOCK = 64  # problems iterated together (64 x 100 x 100 float32 kernels = 2.6 MB: L2/L3-resident)


def _cycle_length(n: int, m: int, omega: float = 1.0) -> int:
    """Iterations between checks so that scalings cannot grow by more than exp(+-_MAX_LOG_SCALING)."""
    return max(1, int(_MAX_LOG_SCALING // (omega * math.log(max(n, m, 2)))))


def _k_t_alpha(kernel: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """K^T alpha per problem: [k, n, m], [k, 1, n] -> [k, m, 1], as the row product alpha^T K."""
    return torch.bmm(alpha, kernel).transpose(1, 2)


def _k_beta(kernel_t: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """K beta per problem from K^T ([k, m, n], contiguous), [k, m, 1] -> [k, 1, n], as beta^T K^T."""
    return torch.bmm(beta.transpose(1, 2), kernel_t)


def _dense_products(kernel: torch.Tensor, kernel_t: torch.Tensor) -> tuple:
    """(beta -> K beta, alpha -> K^T alpha) of the written-out kernels [k, n, m] and their transposes."""
    return (lambda beta: _k_beta(kernel_t, beta)), (lambda alpha: _k_t_alpha(kernel, alpha))


def sinkhorn_transport_cost(
    cost: torch.Tensor, epsilon: float, tol: float, max_iter: int, block: int = DEFAULT_BLOCK,
    omega: float = DEFAULT_OMEGA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT transport cost for a batch of cost matrices with uniform marginals.

    cost: [B, n, m]. omega: starting over-relaxation factor (1 = POT's plain iterations throughout).
    Returns (values [B], capped [B] bool) where capped marks problems that hit ``max_iter`` before
    both marginal errors fell below ``tol``.
    """
    B, n, m = cost.shape
    device, dtype = cost.device, cost.dtype
    values = cost.new_empty(B)
    capped = torch.zeros(B, dtype=torch.bool, device=device)
    if B == 0:
        return values, capped
    a, b = 1.0 / n, 1.0 / m
    log_a, log_b = math.log(a), math.log(b)
    cycle = _cycle_length(n, m, max(omega, MAX_OMEGA) if omega > 1 else omega)  # the largest adapted factor

    def start(problems: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-C/eps, the first log-domain iteration (POT's first loop pass from u = 0) and the kernel =
        the plan it gives, whose rows sum to a."""
        neg = cost[problems] * (-1.0 / epsilon)  # [k, n, m]
        # v = log b - lse_i(-C/eps), then u = log a - lse_j(-C/eps + v), and K = exp(-C/eps + u + v),
        # with one exp instead of three: E = exp(-C/eps - colmax) has column maxima 1, so its
        # column sums s give v, and the row sums r of F = E b / s give u; K = F a / r.
        col_max = neg.amax(dim=1, keepdim=True)  # [k, 1, m]
        kernel = (neg - col_max).exp_()  # E
        col_sum = kernel.sum(dim=1, keepdim=True)  # [k, 1, m], >= 1
        kernel.mul_(b / col_sum)  # F = exp(-C/eps + v)
        row_sum = kernel.sum(dim=2, keepdim=True)  # [k, n, 1]
        kernel.mul_(a / row_sum)  # K = exp(-C/eps + u + v)
        v = log_b - (col_max + col_sum.log())[:, 0]  # [k, m]
        u = log_a - row_sum.log()[:, :, 0]  # [k, n]
        # A row whose entries are all tiny in E (a point far from every column's nearest point, at
        # the scale of eps) would lose precision or underflow: those problems take the log domain.
        bad = (row_sum.amin(dim=(1, 2)) < _MIN_ROW_SUM).nonzero().squeeze(1)
        if bad.numel():
            v[bad] = log_b - torch.logsumexp(neg[bad], dim=1)
            u[bad] = log_a - torch.logsumexp(neg[bad] + v[bad, None, :], dim=2)
            kernel[bad] = torch.add(neg[bad], u[bad, :, None]).add_(v[bad, None, :]).exp_()
        return neg, u, v, kernel

    # The block: `slot` problems iterated together; a finished problem's slot takes the next one.
    slot = torch.arange(min(block, B), device=device)  # problem in each slot
    queue = slot.shape[0]  # next problem not yet started
    neg, u, v, kernel = start(slot)
    k = slot.shape[0]
    kernel_t = kernel.transpose(1, 2).contiguous()  # [k, m, n]
    products = _dense_products(kernel, kernel_t)
    accel = OverRelaxation(k, omega, a, b, kernel)
    # The scalings (alpha, beta) [k, 1, n], [k, m, 1] of the plan diag(alpha) K diag(beta); K beta = a
    # [k, 1, n] makes the first row step leave alpha = 1 exactly (a / a = 1): it starts at the column step.
    alpha, beta, k_beta = kernel.new_ones(k, 1, n), kernel.new_ones(k, m, 1), kernel.new_full((k, 1, n), a)
    iters = torch.ones(k, dtype=torch.long, device=device)  # the log-domain step counts as one
    while True:
        # Run to the next check: `cycle` iterations, or fewer if a problem reaches max_iter sooner.
        steps = max(1, min(cycle, max_iter - int(iters.max())))
        alpha, beta, k_t_alpha, k_beta = sinkhorn_iterations(*products, accel, alpha, beta, k_beta, steps)
        iters += steps
        # Marginal errors of diag(alpha) K diag(beta): columns (POT's test), and rows, which are
        # exact after a plain u-step but not after an over-relaxed one.
        err = torch.maximum(torch.linalg.vector_norm(k_t_alpha * beta - b, dim=(1, 2)),
                            torch.linalg.vector_norm(k_beta * alpha - a, dim=(1, 2)))
        conv = err < tol
        done = conv | (iters >= max_iter)
        accel.checked(err, steps)
        if bool(done.any()):
            d = done.nonzero().squeeze(1)
            ids = slot[d]
            # <P, C> = sum_ij alpha_i K_ij beta_j C_ij for the finished problems.
            plan_cost = (kernel[d] * neg[d]).mul_(alpha[d].transpose(1, 2)).mul_(beta[d].transpose(1, 2))
            values[ids] = plan_cost.sum(dim=(1, 2)) * -epsilon
            capped[ids] = ~conv[d]
            refill = min(d.shape[0], B - queue)
            if refill:  # the next queued problems take the first freed slots
                r = d[:refill]
                problems = torch.arange(queue, queue + refill, device=device)
                queue += refill
                neg[r], u[r], v[r], kernel[r] = start(problems)
                kernel_t[r] = kernel[r].transpose(1, 2)
                slot[r], alpha[r], beta[r], k_beta[r], iters[r] = problems, 1.0, 1.0, a, 1
                accel.restart(r)
            if refill < d.shape[0]:  # queue exhausted: drop the slots left empty
                keep = torch.ones_like(done)
                keep[d[refill:]] = False
                if not bool(keep.any()):
                    break
                keep = keep.nonzero().squeeze(1)
                slot, neg, u, v, kernel, kernel_t = slot[keep], neg[keep], u[keep], v[keep], kernel[keep], kernel_t[keep]
                alpha, beta, k_beta, iters = alpha[keep], beta[keep], k_beta[keep], iters[keep]
                accel.select(keep)
                products = _dense_products(kernel, kernel_t)
        # Absorb scalings that grew large into the kernel (log-domain stabilisation).
        log_alpha, log_beta = alpha.log(), beta.log()
        big = torch.maximum(log_alpha.abs().amax(dim=(1, 2)), log_beta.abs().amax(dim=(1, 2)))
        over = (big > _ABSORB_LOG_SCALING) | ~torch.isfinite(big)
        if bool(over.any()):
            o = over.nonzero().squeeze(1)
            u[o] += log_alpha[o, 0]
            v[o] += log_beta[o, :, 0]
            kernel[o] = torch.add(neg[o], u[o, :, None]).add_(v[o, None, :]).exp_()
            kernel_t[o] = kernel[o].transpose(1, 2)
            alpha[o], beta[o] = 1.0, 1.0
            k_beta[o] = _k_beta(kernel_t[o], beta[o])  # the same plan's rows, for the next row step
    return values, capped
