"""Cost of one tiled-solver iteration per problem, host memory: the fused numba kernel against the
shared Python loop (``ot.iteration.sinkhorn_iterations``) with torch's or numba's kernel products.

    python scripts/bench_iteration.py                 # w=100, s=25 spans of two 600-token clouds
    python scripts/bench_iteration.py --tokens 400 --iters 24

Why: the iteration is written once in torch for every device; on the CPU the engine runs it as a
numba kernel instead (``ot.fused``). This measures what sharing the loop would cost there:
  fused          fused.advance: each problem's iterations in one kernel call (the engine's host path)
  loop + torch   sinkhorn_iterations with ot.tiling.kernel_products (the engine's GPU path, on the CPU)
  loop + numba   sinkhorn_iterations with numba kernel products (one prange kernel per product, each
                 problem's kernel written out from the blocks in cache, as the fused kernel does)
  loop + dense   the same with every problem's kernel written out once beforehand ([P, n, n] in
                 memory), the products plain per-problem mat-vecs
All run Anderson acceleration (memory 5) for the same iterations with no early stop (tol = 0);
microseconds per problem and iteration, fastest of --repeat runs.

    python scripts/bench_iteration.py --engine        # the whole engine on the bench groups, both backends

``--engine``: what the shared loop costs the engine itself: ``group_token_weights`` on the groups of
``bench_compare.py`` (those of ``bench_weights.py``) with ``backend="numba"`` (the host default: the
fused kernels) and ``backend="torch"`` (the shared loop, the GPU path), runs interleaved, fastest of
--repeat, with the max relative difference of the weights.
"""

from __future__ import annotations

import argparse
import math
import time

import numba
import numpy as np
import torch

from shear_verl.core.ot import fused
from shear_verl.core.ot.fused import dense_kernel
from shear_verl.core.ot.anderson import ANDERSON_MEMORY, ANDERSON_RIDGE, AndersonSinkhorn
from shear_verl.core.ot.iteration import sinkhorn_iterations
from shear_verl.core.ot.tiling import kernel_products


@numba.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def _products(kernel, tiles, vec, out, transpose):  # pragma: no cover - compiled
    """out[p] = K_p vec[p] (or K_p^T vec[p]) of every problem p, its kernel written out from the blocks."""
    P, L, _ = tiles.shape
    g = kernel.shape[1]
    n = L * g
    for p in numba.prange(P):
        dense = dense_kernel(kernel, tiles[p])
        if transpose:
            out[p] = 0
            for i in range(n):
                for j in range(n):
                    out[p, j] += vec[p, i] * dense[i, j]
        else:
            for i in range(n):
                total = vec[p, 0] * 0
                for j in range(n):
                    total += dense[i, j] * vec[p, j]
                out[p, i] = total


@numba.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def _dense_products(dense, vec, out, transpose):  # pragma: no cover - compiled
    """out[p] = K_p vec[p] (or K_p^T vec[p]) from the written-out kernels dense [P, n, n]."""
    P, n, _ = dense.shape
    for p in numba.prange(P):
        if transpose:
            out[p] = 0
            for i in range(n):
                for j in range(n):
                    out[p, j] += vec[p, i] * dense[p, i, j]
        else:
            for i in range(n):
                total = vec[p, 0] * 0
                for j in range(n):
                    total += dense[p, i, j] * vec[p, j]
                out[p, i] = total


def problems(tokens: int, w: int, s: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All span pairs of two clouds as tilings of g x g blocks (g = gcd(w, s)): (kernel blocks, tiles)."""
    g, gen = math.gcd(w, s), torch.Generator().manual_seed(seed)
    dist = torch.cdist(torch.randn(tokens, d, generator=gen), torch.randn(tokens, d, generator=gen))
    dist /= dist.mean()
    q, L = tokens // g, w // g
    blocks = dist[:q * g, :q * g].reshape(q, g, q, g).permute(0, 2, 1, 3).reshape(-1, g, g)
    starts = torch.arange(0, q - L + 1, s // g)
    i, j = torch.meshgrid(starts, starts, indexing="ij")
    r = torch.arange(L)
    tiles = (i.reshape(-1)[:, None, None] + r[None, :, None]) * q + j.reshape(-1)[:, None, None] + r[None, None, :]
    return torch.exp(-(blocks - blocks.amin()) / 0.05).contiguous(), tiles.contiguous()


def engine_backends(repeat: int, seed: int) -> None:
    """The engine's time per bench group with each backend on host memory (see the module docstring)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_compare import cases

    from shear_verl.core import ShearConfig, group_token_weights

    cfg = ShearConfig(span_len=100, stride=25, epsilon=0.05)
    named = cases(seed)
    group_token_weights(named[0][1][:2], named[0][2][:1] + [False], cfg, backend="numba")  # compile / load caches
    print(f"engine on host memory, bench groups (seed {seed}), {torch.get_num_threads()} threads, fastest of {repeat}, "
          "runs interleaved")
    print(f"{'group':<20}{'numba s':>9}{'torch s':>9}{'torch/numba':>13}{'rel.diff':>10}")
    for name, states, correct in named:
        best, weights = {"numba": math.inf, "torch": math.inf}, {}
        for _ in range(repeat):
            for backend in best:
                start = time.perf_counter()
                weights[backend] = group_token_weights(states, correct, cfg, backend=backend)
                best[backend] = min(best[backend], time.perf_counter() - start)
        diff = max(float(((t - n).abs() / n.abs()).max()) for t, n in zip(weights["torch"], weights["numba"]))
        print(f"{name:<20}{best['numba']:>9.2f}{best['torch']:>9.2f}{best['torch'] / best['numba']:>13.2f}{diff:>10.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engine", action="store_true", help="the whole engine per bench group, both backends")
    parser.add_argument("--seed", type=int, default=0, help="--engine: the bench groups' seed (bench_compare.py's)")
    args = parser.parse_args()
    if args.engine:
        engine_backends(args.repeat, args.seed)
        return
    kernel, tiles = problems(args.tokens, 100, 25, 64, seed=0)
    P, L, _ = tiles.shape
    g = kernel.shape[1]
    n = L * g
    a = 1.0 / n
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))

    def numba_products():
        tiles_np, kernel_np = tiles.numpy(), kernel.numpy()

        def apply(v, transpose):
            out = torch.empty_like(v)
            _products(kernel_np, tiles_np, v.contiguous().numpy(), out.numpy(), transpose)
            return out
        return (lambda v: apply(v, False)), (lambda v: apply(v, True))

    def dense_products():
        dense = kernel[tiles].permute(0, 1, 3, 2, 4).reshape(P, n, n).contiguous().numpy()

        def apply(v, transpose):
            out = torch.empty_like(v)
            _dense_products(dense, v.contiguous().numpy(), out.numpy(), transpose)
            return out
        return (lambda v: apply(v, False)), (lambda v: apply(v, True))

    def torch_products():
        k_mul, kt_mul = kernel_products(tiles, kernel)
        return (lambda v: k_mul(v.view(-1, L, g)).view(-1, n)), (lambda v: kt_mul(v.view(-1, L, g)).view(-1, n))

    def run_loop(products):
        k_mul, kt_mul = products()
        accel = AndersonSinkhorn(P, n, ANDERSON_MEMORY, a, a, kernel)
        alpha = torch.ones_like(accel.u)
        sinkhorn_iterations(k_mul, kt_mul, accel, alpha, None, None, args.iters, first=True)

    def run_fused():
        accel = AndersonSinkhorn(P, n, ANDERSON_MEMORY, a, a, kernel)
        alpha = torch.ones_like(accel.u)
        k_t_alpha, row = torch.empty_like(alpha), torch.empty_like(alpha)
        fused.advance(kernel, tiles, alpha, k_t_alpha, row, accel, args.iters, True, 0.0,
                      ANDERSON_RIDGE * torch.finfo(kernel.dtype).eps)

    ways = {"fused": run_fused, "loop + torch": lambda: run_loop(torch_products),
            "loop + numba": lambda: run_loop(numba_products), "loop + dense": lambda: run_loop(dense_products)}
    for way in ways.values():  # compile / warm up
        way()
    print(f"{P} problems of {n} x {n} on {g} x {g} blocks (float32), {args.iters} iterations, "
          f"{torch.get_num_threads()} threads, fastest of {args.repeat}")
    base = None
    for name, way in ways.items():
        best = math.inf
        for _ in range(args.repeat):
            start = time.perf_counter()
            way()
            best = min(best, time.perf_counter() - start)
        us = 1e6 * best / (P * args.iters)
        base = base or us
        print(f"{name:<14}{us:>8.2f} us per problem-iteration  {us / base:>5.2f}x fused")


if __name__ == "__main__":
    main()
