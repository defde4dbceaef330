"""Batched Sinkhorn distance <P_eps, C> between uniform measures (SHEAR's W_eps, spec section 4).

Same iterations as POT's ``ot.bregman.sinkhorn_log`` (v-update, then u-update, stop when the L2
error of the column marginal is below ``tol``), so the fixed point and the returned value
``<P_eps, C>`` are POT's ``ot.sinkhorn2(a, b, C, eps, method="sinkhorn_log")``. Hand-written because
POT solves one problem per call; SHEAR needs millions of 100x100 problems per step, batched on
whatever device holds the hidden states.

Numerics (Schmitzer 2019, "Stabilized sparse scaling algorithms for entropy regularized transport
problems", log-domain stabilisation / absorption): dual potentials (u, v) live in the log domain;
every few iterations they are absorbed into the kernel K = exp(-C/eps + u + v), which is then the
current plan, and the iterations in between are plain Sinkhorn scalings (alpha, beta) by batched
mat-vecs. One exp per cycle instead of two logsumexps per iteration; nothing under/overflows
because (i) the first iteration is done with logsumexp from u = v = 0, and (ii) after an
absorption the plan's rows sum to a = 1/n, so one Sinkhorn half-step rescales any row or column by
a factor in [1/max(n,m), max(n,m)], bounded over a cycle of ``_cycle_length`` iterations.
"""

from __future__ import annotations

import math

import torch

_MAX_LOG_SCALING = 40.0  # |log alpha|, |log beta| stay below this within a cycle (float32 exp range is +-87)


def _cycle_length(n: int, m: int) -> int:
    """Iterations between absorptions so that scalings cannot leave exp(+-_MAX_LOG_SCALING)."""
    return max(1, int(_MAX_LOG_SCALING // math.log(max(n, m, 2))))


def sinkhorn_transport_cost(
    cost: torch.Tensor, epsilon: float, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT transport cost for a batch of cost matrices with uniform marginals.

    cost: [B, n, m]. Returns (values [B], capped [B] bool) where capped marks problems that hit
    ``max_iter`` before the column-marginal error fell below ``tol`` (their value is that of the
    last iterate, whose row marginals are exact).
    """
    B, n, m = cost.shape
    a, b = 1.0 / n, 1.0 / m
    values = cost.new_empty(B)
    capped = torch.zeros(B, dtype=torch.bool, device=cost.device)
    if B == 0:
        return values, capped
    neg_cost = cost * (-1.0 / epsilon)  # [B, n, m] = -C / eps

    # Iteration 1 in the log domain from u = v = 0 (POT's sinkhorn_log, first loop pass).
    v = math.log(b) - torch.logsumexp(neg_cost, dim=1)  # [B, m]
    u = math.log(a) - torch.logsumexp(neg_cost + v[:, None, :], dim=2)  # [B, n]
    iteration = 1
    active = torch.arange(B, device=cost.device)
    cycle = _cycle_length(n, m)
    while True:
        # Absorption: K is the current plan diag(e^u) e^{-C/eps} diag(e^v); its rows sum to a.
        kernel = torch.add(neg_cost, u[:, :, None]).add_(v[:, None, :]).exp_()  # [Ba, n, m]
        alpha = kernel.new_ones(kernel.shape[0], 1, n)  # row scaling, [Ba, 1, n]
        beta = kernel.new_ones(kernel.shape[0], m, 1)  # column scaling, [Ba, m, 1]
        converged = torch.zeros(kernel.shape[0], dtype=torch.bool, device=cost.device)
        for _ in range(cycle):
            k_t_alpha = torch.matmul(alpha, kernel)  # [Ba, 1, m]
            # Column marginal of diag(alpha) K diag(beta); rows are exact after the last u-step.
            err = torch.linalg.vector_norm(k_t_alpha * beta.transpose(1, 2) - b, dim=(1, 2))
            converged |= err < tol
            if iteration >= max_iter:
                break
            # v-step (beta) then u-step (alpha); converged problems keep their plan.
            beta = torch.where(converged[:, None, None], beta, b / k_t_alpha.transpose(1, 2))
            alpha = a / torch.matmul(kernel, beta).transpose(1, 2)
            iteration += 1
        finished = converged | (iteration >= max_iter)
        done = finished.nonzero().squeeze(1)
        if done.numel():
            # <P, C> = alpha^T (K * C) beta for the finished problems.
            weighted = torch.matmul(kernel[done] * (neg_cost[done] * -epsilon), beta[done])  # [Bd, n, 1]
            values[active[done]] = torch.matmul(alpha[done], weighted).flatten()
            capped[active[done]] = ~converged[done]
        keep = (~finished).nonzero().squeeze(1)
        if keep.numel() == 0:
            return values, capped
        active, neg_cost = active[keep], neg_cost[keep]
        u = u[keep] + alpha[keep, 0].log()
        v = v[keep] + beta[keep, :, 0].log()
