"""Over-relaxation against Anderson acceleration in the per-problem solver's loop (an experiment for
docs/benchmarks.md, "One acceleration scheme?"): one block of random span pairs of a phased bench
group (w = 100, eps = 0.05 relative, tol = 1e-6, float32), no continuous batching, absorption as in
``ot.sinkhorn`` (Anderson's history shifted when u is absorbed). Prints seconds (fastest of 3),
iterations to convergence (mean, 99 % quantile, max) and the max relative difference from the
engine's ``sinkhorn_transport_cost``.

    python scripts/bench_acceleration.py [--pairs 600]
"""
import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

from shear_verl.core.ot import sinkhorn as S
from shear_verl.core.ot import sinkhorn_transport_cost
from shear_verl.core.ot.anderson import AndersonSinkhorn
from shear_verl.core.ot.iteration import sinkhorn_iterations
from shear_verl.core.ot.relaxation import DIVERGENCE, MAX_OMEGA, OverRelaxation
from shear_verl.core.weights import group_mean_norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_weights import phased_group  # noqa: E402


class AndersonRows(AndersonSinkhorn):  # [k,1,n] / [k,m,1] shapes of the per-problem solver
    def rows(self, alpha, k_beta):
        k = alpha.shape[0]
        return super().rows(alpha.view(k, -1), k_beta.view(k, -1)).view_as(alpha)
    def checked(self, err, steps):
        last = getattr(self, "last_err", None)
        if last is not None: self.fall_back(err > DIVERGENCE * last)
        self.last_err = err
    def absorb(self, o, log_alpha):  # u = log alpha is reset to 0 at an absorption: shift the history
        self.u[o] -= log_alpha
        if self.last is not None: self.last[0][o] -= log_alpha

def solve(cost, eps, tol, max_iter, scheme):
    B, n, m = cost.shape
    a, b = 1.0 / n, 1.0 / m
    neg = cost * (-1.0 / eps)
    col_max = neg.amax(dim=1, keepdim=True); kernel = (neg - col_max).exp_()
    col_sum = kernel.sum(dim=1, keepdim=True); kernel.mul_(b / col_sum)
    row_sum = kernel.sum(dim=2, keepdim=True); kernel.mul_(a / row_sum)
    v = math.log(b) - (col_max + col_sum.log())[:, 0]; u = math.log(a) - row_sum.log()[:, :, 0]
    kernel_t = kernel.transpose(1, 2).contiguous()
    products = S._dense_products(kernel, kernel_t)
    accel = OverRelaxation(B, 1.7, a, b, kernel) if scheme == "relax" else AndersonRows(B, n, 5, a, b, kernel)
    cycle = S._cycle_length(n, m, MAX_OMEGA) if scheme == "relax" else 8
    alpha, beta, k_beta = kernel.new_ones(B, 1, n), kernel.new_ones(B, m, 1), kernel.new_full((B, 1, n), a)
    iters = 1; done_at = torch.full((B,), -1); values = cost.new_empty(B); first = True
    active = torch.ones(B, dtype=torch.bool)
    while iters < max_iter and active.any():
        alpha, beta, k_t_alpha, k_beta = sinkhorn_iterations(*products, accel, alpha, beta, k_beta, cycle, first=first and scheme != "relax")
        first = False; iters += cycle
        err = torch.maximum(torch.linalg.vector_norm(k_t_alpha * beta - b, dim=(1, 2)), torch.linalg.vector_norm(k_beta * alpha - a, dim=(1, 2)))
        accel.checked(err, cycle)
        new = active & (err < tol)
        if new.any():
            d = new.nonzero().squeeze(1)
            values[d] = (kernel[d] * neg[d] * alpha[d].transpose(1, 2) * beta[d].transpose(1, 2)).sum((1, 2)) * -eps
            done_at[d] = iters; active &= ~new
        la, lb = alpha.log(), beta.log()
        big = torch.maximum(la.abs().amax((1, 2)), lb.abs().amax((1, 2)))
        o = (big > 30).nonzero().squeeze(1)
        if o.numel():
            u[o] += la[o, 0]; v[o] += lb[o, :, 0]
            kernel[o] = (neg[o] + u[o, :, None] + v[o, None, :]).exp(); kernel_t[o] = kernel[o].transpose(1, 2)
            if scheme != "relax": accel.absorb(o, la[o, 0])
            alpha[o], beta[o] = 1.0, 1.0; k_beta[o] = S._k_beta(kernel_t[o], beta[o])
    return values, done_at


def span_pairs(count: int, seed: int = 0) -> torch.Tensor:
    """Cost matrices [count, 100, 100] of random (correct, incorrect) span pairs of a phased group."""
    rng = random.Random(seed)
    correct = [True] * 4 + [False] * 4
    states = phased_group([rng.randint(300, 1500) for _ in correct], correct, 256, 123)
    xs = [h / group_mean_norm(states) for h in states]
    out = []
    for _ in range(count):
        i, j = rng.randrange(4), 4 + rng.randrange(4)
        s, t = rng.randrange(xs[i].shape[0] - 100), rng.randrange(xs[j].shape[0] - 100)
        out.append(torch.cdist(xs[i][s:s + 100], xs[j][t:t + 100]))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=600)
    args = parser.parse_args()
    c = span_pairs(args.pairs)
    engine, _ = sinkhorn_transport_cost(c, 0.05, 1e-6, 2000)
    for scheme in ("relax", "anderson"):
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            vals, it = solve(c.clone(), 0.05, 1e-6, 2000, scheme)
            best = min(best, time.perf_counter() - start)
        rel = float(((vals - engine).abs() / engine).max())
        print(f"{scheme:<9} {best:6.2f} s  iterations mean {it.float().mean():.1f} p99 {int(it.float().quantile(0.99))} "
              f"max {int(it.max())}  unconverged {int((it < 0).sum())}  rel. diff from the engine {rel:.1e}", flush=True)


if __name__ == "__main__":
    main()
