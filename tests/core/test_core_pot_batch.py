"""The batched solvers against POT's own batched solver, ``ot.batch.solve_batch`` (a second oracle,
beside ``ot.sinkhorn2`` one problem at a time in test_core_sinkhorn_pot.py).

POT's batched log-domain Sinkhorn runs the whole batch until its worst row marginal error is below
tol; with tight tolerances both reach the same fixed point, and <P_eps, C> is its ``value_linear``.
"""

import os

import numpy as np
import pytest
import torch
from ot.batch import solve_batch

from shear_verl.core.ot import sinkhorn_transport_cost, tiled_sinkhorn_transport_cost

DEVICE = torch.device(os.environ.get("SHEAR_TEST_DEVICE", "cpu"))


def _pot_batch(costs: torch.Tensor, epsilon: float) -> np.ndarray:
    """<P_eps, C> of every problem of costs [B, n, m] (float64, on the CPU) by ot.batch.solve_batch."""
    res = solve_batch(costs.double().cpu(), epsilon, method="log_sinkhorn", tol=1e-13, max_iter=200_000)
    return res.value_linear.numpy()


def _clouds(batch, n, m, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g, dtype=dtype)
    y = torch.randn(batch, m, d, generator=g, dtype=dtype) * 1.3 + 0.4
    return torch.cdist(x, y).to(DEVICE)  # [B, n, m]


@pytest.mark.parametrize(("n", "m", "epsilon", "block"), [(16, 16, 0.2, 64), (12, 21, 0.1, 5), (25, 9, 0.5, 1)])
def test_per_problem_solver_equals_pot_solve_batch(n, m, epsilon, block):
    # block < batch: problems leave their slots as they converge and queued ones take them (refill)
    costs = _clouds(11, n, m, 5, seed=n + m)
    values, capped = sinkhorn_transport_cost(costs, epsilon, tol=1e-12, max_iter=100_000, block=block)
    assert not capped.any()
    np.testing.assert_allclose(values.cpu().numpy(), _pot_batch(costs, epsilon), rtol=1e-8)


def test_per_problem_solver_float32_close_to_pot_solve_batch():
    costs = _clouds(9, 30, 30, 8, seed=3)
    values, capped = sinkhorn_transport_cost(costs.float(), 0.15, tol=1e-6, max_iter=100_000)
    assert values.dtype == torch.float32 and not capped.any()
    np.testing.assert_allclose(values.double().cpu().numpy(), _pot_batch(costs, 0.15), rtol=2e-5)


def _shared_blocks(t, g, L, d, seed):
    """All span pairs (L blocks of g tokens, stride g) of two clouds of t points: (blocks [NB, g, g],
    tiles [P, L, L], the same cost matrices written out [P, L g, L g])."""
    gen = torch.Generator().manual_seed(seed)
    dist = torch.cdist(torch.randn(t, d, generator=gen, dtype=torch.float64),
                       torch.randn(t, d, generator=gen, dtype=torch.float64) + 0.2)
    q = t // g
    blocks = dist.view(q, g, q, g).permute(0, 2, 1, 3).reshape(-1, g, g)
    i, j = torch.meshgrid(torch.arange(q - L + 1), torch.arange(q - L + 1), indexing="ij")
    i, j, r = i.reshape(-1), j.reshape(-1), torch.arange(L)
    tiles = (i[:, None, None] + r[None, :, None]) * q + j[:, None, None] + r[None, None, :]
    costs = torch.stack([dist[a * g:(a + L) * g, b * g:(b + L) * g] for a, b in zip(i.tolist(), j.tolist())])
    return blocks.to(DEVICE), tiles.to(DEVICE), costs


def test_tiled_solver_equals_pot_solve_batch(solver_path):
    blocks, tiles, costs = _shared_blocks(36, 4, 4, 3, seed=21)  # 36 problems of 16 x 16, up to 16 per block
    values, capped, solved, pruned = tiled_sinkhorn_transport_cost(blocks, tiles, 0.25, tol=1e-12, max_iter=100_000,
                                                                   backend=solver_path)
    assert solved.all() and not capped.any() and not pruned.any()
    np.testing.assert_allclose(values.cpu().numpy(), _pot_batch(costs, 0.25), rtol=1e-8)
