"""The batched log-domain Sinkhorn solver against POT (the independent reference)."""

import os

import numpy as np
import ot
import pytest
import torch

from shear_verl.core.ot import RunningMinima, sinkhorn_transport_cost, tiled_sinkhorn_transport_cost, w1_dual_bound
from shear_verl.core.ot.anderson import Anderson
from shear_verl.core.ot.relaxation import adapt_relaxation
from shear_verl.core.ot.tiling import DENSE_BELOW, Tiling, kernel_products

DEVICE = torch.device(os.environ.get("SHEAR_TEST_DEVICE", "cpu"))  # e.g. SHEAR_TEST_DEVICE=cuda: inputs on a GPU


def _costs(batch, n, m, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g, dtype=dtype)
    y = torch.randn(batch, m, d, generator=g, dtype=dtype) + 0.5
    return torch.cdist(x, y).to(DEVICE)  # [B, n, m], Euclidean ground cost


@pytest.mark.parametrize(("n", "m", "epsilon"), [(12, 12, 0.5), (10, 17, 0.2), (30, 7, 1.0), (1, 9, 0.3)])
def test_equals_pot_sinkhorn_log_float64(n, m, epsilon):
    costs = _costs(6, n, m, 4, seed=n * m)
    values, capped = sinkhorn_transport_cost(costs, epsilon, tol=1e-12, max_iter=100_000)
    assert not capped.any()
    for c, v in zip(costs, values):
        ref = ot.sinkhorn2(ot.unif(n), ot.unif(m), c.cpu().numpy(), epsilon, method="sinkhorn_log",
                           stopThr=1e-13, numItermax=200_000)
        assert abs(float(v) - ref) <= 1e-6 * ref


def test_float32_close_to_pot():
    costs = _costs(8, 20, 20, 6, seed=1)
    values, capped = sinkhorn_transport_cost(costs.float(), 0.3, tol=1e-6, max_iter=10_000)
    assert values.dtype == torch.float32 and not capped.any()
    ref = [ot.sinkhorn2(ot.unif(20), ot.unif(20), c.cpu().numpy(), 0.3, method="sinkhorn_log", stopThr=1e-13) for c in costs]
    np.testing.assert_allclose(values.double().cpu().numpy(), ref, rtol=1e-5)


def test_tends_to_exact_w1_as_epsilon_shrinks():
    costs = _costs(3, 8, 8, 3, seed=2)
    exact = np.array([ot.emd2(ot.unif(8), ot.unif(8), c.cpu().numpy()) for c in costs])
    gaps = []
    for epsilon in (0.5, 0.1, 0.05):  # smaller eps needs far more iterations, in POT too
        values, capped = sinkhorn_transport_cost(costs, epsilon, tol=1e-9, max_iter=100_000)
        assert not capped.any()
        assert (values.cpu().numpy() >= exact - 1e-9).all()  # <P_eps, C> of a coupling is >= W1
        gaps.append(np.abs(values.cpu().numpy() - exact).max())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.02 * exact.min()


def test_reports_capped_problems_instead_of_hiding_them():
    costs = _costs(4, 10, 10, 3, seed=3)
    _, capped = sinkhorn_transport_cost(costs, 0.05, tol=1e-12, max_iter=3)
    assert capped.all()
    _, capped = sinkhorn_transport_cost(costs, 0.5, tol=1e-6, max_iter=100_000)
    assert not capped.any()


def test_empty_batch():
    values, capped = sinkhorn_transport_cost(torch.zeros(0, 5, 5, device=DEVICE), 0.1, 1e-6, 100)
    assert values.shape == (0,) and capped.shape == (0,)


def _pot(costs, epsilon):
    n, m = costs.shape[1:]
    return np.array([ot.sinkhorn2(ot.unif(n), ot.unif(m), c.double().cpu().numpy(), epsilon, method="sinkhorn_log",
                                  stopThr=1e-13, numItermax=200_000) for c in costs])


@pytest.mark.parametrize("omega", [1.0, 1.3, 1.7, 1.95])
def test_over_relaxation_keeps_the_fixed_point(omega):
    costs = _costs(7, 15, 11, 5, seed=4)
    values, capped = sinkhorn_transport_cost(costs, 0.1, tol=1e-12, max_iter=100_000, omega=omega)
    assert not capped.any()
    np.testing.assert_allclose(values.cpu().numpy(), _pot(costs, 0.1), rtol=1e-6)


def _sor_rate(eta, omega):
    """Young's SOR eigenvalue for omega below the optimum: sqrt(lambda) = (omega mu + sqrt(omega^2 mu^2
    - 4 (omega - 1))) / 2 with mu^2 = eta, the plain (Gauss-Seidel, here Sinkhorn) rate."""
    mu = eta ** 0.5
    return ((omega * mu + (omega**2 * eta - 4 * (omega - 1)) ** 0.5) / 2) ** 2


def test_adapt_relaxation_sets_youngs_optimal_factor():
    eta = torch.tensor([0.95, 0.9, 0.999, 0.5], dtype=torch.float64)  # plain Sinkhorn's local rates
    omega = torch.tensor([1.6, 1.3, 1.6, 1.6], dtype=torch.float64)[:, None, None]
    rate = torch.tensor([_sor_rate(e, w) if w < 2 / (1 + (1 - e) ** 0.5) else w - 1
                         for e, w in zip(eta.tolist(), omega.view(-1).tolist())], dtype=torch.float64)
    last = torch.full((4,), 1e-2, dtype=torch.float64)
    new = adapt_relaxation(omega, last * rate**8, last, 8).view(-1)
    optimal = 2 / (1 + (1 - eta).sqrt())
    torch.testing.assert_close(new[:2], optimal[:2])  # 1.634, 1.520
    assert new[2] == 1.9  # omega* = 1.94, capped
    assert new[3] == 1.6  # 1.6 is above omega* = 1.17 already: kept (the error falls at omega - 1)


def test_adapt_relaxation_falls_back_to_plain_sinkhorn_for_good():
    omega = torch.tensor([1.6, 1.6, 1.0, 1.6], dtype=torch.float64)[:, None, None]
    last = torch.tensor([1e-3, 1e-3, 1e-3, float("inf")], dtype=torch.float64)
    err = torch.tensor([2.5e-3, 1.5e-3, 1e-4, 1e-3], dtype=torch.float64)  # diverging; oscillating; plain; first check
    assert adapt_relaxation(omega, err, last, 8).view(-1).tolist() == [1.0, 1.6, 1.0, 1.6]


@pytest.mark.parametrize("block", [1, 3, 64])
def test_blocking_and_refill_give_the_same_values(block):
    costs = _costs(10, 9, 13, 3, seed=5)  # 10 problems through blocks of 1 and 3 (refilled) or one block
    values, capped = sinkhorn_transport_cost(costs, 0.2, tol=1e-12, max_iter=100_000, block=block)
    assert not capped.any()
    np.testing.assert_allclose(values.cpu().numpy(), _pot(costs, 0.2), rtol=1e-6)


def test_far_outlier_rows_do_not_underflow_float32():
    # A point 40 units away from everything at eps = 0.2: exp(-C/eps) underflows float32 by far,
    # so the first iteration must take the log domain for that problem.
    costs = _costs(3, 10, 10, 3, seed=7)
    costs[1, 4] += 40.0
    values, capped = sinkhorn_transport_cost(costs.float(), 0.2, tol=1e-6, max_iter=100_000)
    assert torch.isfinite(values).all() and not capped.any()
    np.testing.assert_allclose(values.double().cpu().numpy(), _pot(costs, 0.2), rtol=1e-5)


def _grid_tiling(t_x, t_y, g, L, d, seed, dtype=torch.float64):
    """SHEAR's case: all span pairs (span = L blocks of g tokens, stride g) of two point clouds, as
    tilings of the g x g blocks of their distance matrix; and the same cost matrices written out."""
    gen = torch.Generator().manual_seed(seed)
    dist = torch.cdist(torch.randn(t_x, d, generator=gen, dtype=dtype), torch.randn(t_y, d, generator=gen, dtype=dtype) + 0.3)
    nq = t_y // g
    blocks = dist.view(t_x // g, g, nq, g).permute(0, 2, 1, 3).reshape(-1, g, g)  # [NB, g, g]
    p, q = torch.meshgrid(torch.arange(t_x // g - L + 1), torch.arange(nq - L + 1), indexing="ij")
    p, q, r = p.reshape(-1), q.reshape(-1), torch.arange(L)
    tiles = (p[:, None, None] + r[None, :, None]) * nq + q[:, None, None] + r[None, None, :]  # [P, L, L]
    costs = torch.stack([dist[i * g:(i + L) * g, j * g:(j + L) * g] for i, j in zip(p.tolist(), q.tolist())])
    return blocks.to(DEVICE), tiles.to(DEVICE), costs.to(DEVICE)


@pytest.mark.parametrize("memory", [0, 5])
def test_tiled_equals_pot_on_shared_blocks(memory, solver_path):
    blocks, tiles, costs = _grid_tiling(40, 48, 4, 3, 3, seed=8)  # 64 problems sharing up to 9 each
    values, capped, solved, pruned = tiled_sinkhorn_transport_cost(blocks, tiles, 0.3, tol=1e-12, max_iter=100_000,
                                                                   memory=memory, backend=solver_path)
    assert solved.all() and not capped.any() and not pruned.any()
    np.testing.assert_allclose(values.cpu().numpy(), _pot(costs, 0.3), rtol=1e-6)


def _iterations(blocks, tiles, memory, backend):
    """Least max_iter at which every problem converges (checked after every iteration), by bisection
    on the public ``capped`` flags."""
    lo, hi = 1, 1
    while tiled_sinkhorn_transport_cost(blocks, tiles, 0.3, tol=1e-12, max_iter=hi, memory=memory, check_every=1,
                                        backend=backend)[1].any():
        lo, hi = hi, 2 * hi
    while lo < hi:
        mid = (lo + hi) // 2
        capped = tiled_sinkhorn_transport_cost(blocks, tiles, 0.3, tol=1e-12, max_iter=mid, memory=memory,
                                               check_every=1, backend=backend)[1]
        lo, hi = (mid + 1, hi) if capped.any() else (lo, mid)
    return lo


def test_tiled_acceleration_takes_fewer_iterations(solver_path):
    # memory 0 is POT's plain iterations; Anderson's reach the same values (above) in under half.
    blocks, tiles, _ = _grid_tiling(40, 48, 4, 3, 3, seed=8)
    plain, accelerated = (_iterations(blocks, tiles, memory, solver_path) for memory in (0, 5))
    assert 0 < accelerated < 0.5 * plain


@pytest.mark.parametrize("memory", [0, 5])
def test_fused_kernels_run_the_torch_paths_iterations(memory):
    """Checked after every iteration, both paths stop each problem at the same iteration with the same
    iterate (float64: equal to rounding, where one iteration more or less moves a value by ~tol); the
    fused kernel's scalings also come back unchanged when a problem has converged."""
    blocks, tiles, _ = _grid_tiling(40, 48, 4, 3, 3, seed=15)
    fused, _, fused_solved, _ = tiled_sinkhorn_transport_cost(blocks, tiles, 0.2, tol=1e-8, max_iter=10_000,
                                                              memory=memory, check_every=1, backend="numba")
    batched, _, solved, _ = tiled_sinkhorn_transport_cost(blocks, tiles, 0.2, tol=1e-8, max_iter=10_000,
                                                          memory=memory, check_every=1, backend="torch")
    assert fused_solved.all() and solved.all()
    np.testing.assert_allclose(fused.cpu().numpy(), batched.cpu().numpy(), rtol=1e-12)
    # one iteration apart they differ by far more
    shorter, _, _, _ = tiled_sinkhorn_transport_cost(blocks, tiles, 0.2, tol=1e-7, max_iter=10_000,
                                                     memory=memory, check_every=1, backend="torch")
    assert np.abs(shorter.cpu().numpy() / batched.cpu().numpy() - 1).max() > 1e-10


def test_anderson_solves_a_linear_fixed_point_like_gmres():
    # On u <- M u + c, type II Anderson with memory >= n is GMRES on (I - M) u = c (Walker & Ni 2011,
    # Sec. 4): solved to rounding in about n + 1 steps, where the plain iteration's error still falls
    # only by rho^k per step.
    n = 6
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    m = q @ torch.diag(torch.linspace(0.5, 0.97, n, dtype=torch.float64)) @ q.T  # [n, n], rho = 0.97
    c = torch.randn(n, dtype=torch.float64, generator=gen)
    fixed = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - m, c)
    accel = Anderson(1, n, n, c[None])
    u, plain = torch.zeros(1, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for _ in range(n + 2):
        u = accel.step(u, (u @ m.T + c) - u)
        plain = m @ plain + c
    assert torch.linalg.vector_norm(u[0] - fixed) < 1e-6 * torch.linalg.vector_norm(fixed)
    assert torch.linalg.vector_norm(plain - fixed) > 0.5 * torch.linalg.vector_norm(fixed)


def test_anderson_falls_back_to_plain_iterations():
    gen = torch.Generator().manual_seed(4)
    u, r = torch.randn(3, 5, dtype=torch.float64, generator=gen), torch.randn(3, 5, dtype=torch.float64, generator=gen)
    accel = Anderson(3, 5, 4, u)
    for _ in range(3):
        u_next = accel.step(u, r)
        u, r = u_next, 0.5 * r + 0.1 * torch.randn(3, 5, dtype=torch.float64, generator=gen)
    accel.fall_back(torch.tensor([False, True, False]))
    u_next = accel.step(u, r)
    torch.testing.assert_close(u_next[1], u[1] + r[1])  # plain step for the problem that fell back
    assert not torch.allclose(u_next[[0, 2]], u[[0, 2]] + r[[0, 2]])  # accelerated for the others
    accel.select(torch.tensor([1, 2]))
    assert accel.plain.tolist() == [True, False] and accel.d_r.shape[0] == 2


@pytest.mark.parametrize("step", [1, 20])  # 80 problems: through Tiling; 4: written out (2 P L^2 <= 120 blocks)
def test_kernel_products_equal_the_written_out_matrices(step):
    blocks, tiles, costs = _grid_tiling(40, 48, 4, 3, 3, seed=13)  # 120 blocks
    tiles, kernels = tiles[::step], torch.exp(-costs[::step] / 0.5)  # [P, 12, 12]
    assert (tiles.shape[0] > DENSE_BELOW) == (step == 1)  # both ways of ``kernel_products``
    k_mul, kt_mul = kernel_products(tiles, torch.exp(-blocks / 0.5))
    v = torch.rand(tiles.shape[0], 3, 4, dtype=torch.float64).to(DEVICE)
    torch.testing.assert_close(k_mul(v).flatten(1), torch.einsum("pij,pj->pi", kernels, v.flatten(1)))
    torch.testing.assert_close(kt_mul(v).flatten(1), torch.einsum("pij,pi->pj", kernels, v.flatten(1)))


def test_tiled_equals_pot_on_written_out_kernels(solver_path):
    blocks, tiles, costs = _grid_tiling(40, 48, 4, 3, 3, seed=14)
    values, capped, solved, _ = tiled_sinkhorn_transport_cost(blocks, tiles[::20], 0.3, tol=1e-12, max_iter=100_000, backend=solver_path)
    assert solved.all() and not capped.any()
    np.testing.assert_allclose(values.cpu().numpy(), _pot(costs[::20], 0.3), rtol=1e-6)


def test_tiled_float32_solves_out_of_range_kernels_in_float64(solver_path):
    blocks, tiles, costs = _grid_tiling(24, 24, 4, 2, 3, seed=9, dtype=torch.float32)
    blocks[0, 1, 2] += 30.0  # (C - min C) / eps = 150 > 39: exp leaves float32 for the problems using block 0
    costs = torch.stack([blocks[t].permute(0, 2, 1, 3).reshape(8, 8) for t in tiles])
    uses_block_0 = (tiles == 0).flatten(1).any(1)
    values, capped, solved, _ = tiled_sinkhorn_transport_cost(blocks, tiles, 0.2, tol=1e-6, max_iter=100_000, backend=solver_path)
    # the problems using block 0 are outside float32's range (150 > 39 eps): solved all the same, in float64
    assert solved.all() and not capped.any() and values.dtype == torch.float32 and uses_block_0.any()
    np.testing.assert_allclose(values.double().cpu().numpy(), _pot(costs, 0.2), rtol=1e-5)


def test_tiled_leaves_kernels_out_of_float64_range_to_the_stabilised_solver(solver_path):
    blocks, tiles, costs = _grid_tiling(24, 24, 4, 2, 3, seed=9, dtype=torch.float32)
    blocks[0, 1, 2] += 100.0  # (C - min C) / eps = 500 > 318: beyond float64's range too
    uses_block_0 = (tiles == 0).flatten(1).any(1)
    values, capped, solved, pruned = tiled_sinkhorn_transport_cost(blocks, tiles, 0.2, tol=1e-6, max_iter=100_000, backend=solver_path)
    assert (solved == ~uses_block_0).all() and uses_block_0.any() and not capped.any() and not pruned.any()
    np.testing.assert_allclose(values[solved].double().cpu().numpy(), _pot(costs[solved], 0.2), rtol=1e-5)


def test_tiled_reports_capped_problems(solver_path):
    blocks, tiles, _ = _grid_tiling(16, 16, 4, 2, 3, seed=10)
    _, capped, solved, _ = tiled_sinkhorn_transport_cost(blocks, tiles, 0.05, tol=1e-12, max_iter=3, backend=solver_path)
    assert capped.all() and solved.all()


def test_tiled_packs_any_number_of_users_per_block(solver_path):
    # 1, 2, 3, 5, 9 or 20 users of a block: every slot bucket of the packed layout (1 to 32 slots),
    # including problems repeated and a block used at several positions of one problem.
    blocks, tiles, costs = _grid_tiling(16, 20, 4, 2, 3, seed=11)
    repeat = torch.tensor([0] * 20 + [1] * 4 + [5] * 2 + [7], device=DEVICE)
    odd = torch.tensor([[[3, 3], [3, 0]]], device=DEVICE)  # block 3 at three positions of one problem
    tiles = torch.cat([tiles[repeat], odd])
    costs = torch.cat([costs[repeat], blocks[odd[0]].permute(0, 2, 1, 3).reshape(1, 8, 8)])
    tiling = Tiling(tiles)
    assert sorted({size for _, _, size, _ in tiling.buckets}) == [1, 2, 4, 8, 32]
    values, capped, solved, _ = tiled_sinkhorn_transport_cost(blocks, tiles, 0.3, tol=1e-12, max_iter=100_000, backend=solver_path)
    assert solved.all() and not capped.any()
    np.testing.assert_allclose(values.cpu().numpy(), _pot(costs, 0.3), rtol=1e-6)


def _exact_w1(costs):
    return np.array([ot.emd2(ot.unif(c.shape[0]), ot.unif(c.shape[1]), c.cpu().numpy()) for c in costs])


def test_w1_dual_bound_is_w1_at_the_optimal_potentials_and_below_it_otherwise(solver_path):
    blocks, tiles, costs = _grid_tiling(24, 32, 4, 3, 3, seed=12)  # 24 problems of 12 x 12
    w1 = _exact_w1(costs)
    # POT's exact dual potentials (network simplex): the c-transforms keep them optimal.
    f_opt = torch.stack([torch.as_tensor(ot.emd(ot.unif(12), ot.unif(12), c.cpu().numpy(), log=True)[1]["u"]) for c in costs]).to(DEVICE)
    bound, _ = w1_dual_bound(blocks, tiles, f_opt.view(-1, 3, 4), backend=solver_path)
    np.testing.assert_allclose(bound.cpu().numpy(), w1, rtol=1e-9)
    # Any other potential, e.g. random or shifted by a constant: still a lower bound.
    f_rand = torch.randn(tiles.shape[0], 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE)
    assert (w1_dual_bound(blocks, tiles, f_rand, backend=solver_path)[0].cpu().numpy() <= w1 + 1e-12).all()
    shifted, _ = w1_dual_bound(blocks, tiles, f_opt.view(-1, 3, 4) + 7.0, backend=solver_path)
    np.testing.assert_allclose(shifted.cpu().numpy(), w1, rtol=1e-9)


def test_w1_dual_bound_of_the_transposed_problems_tightens_it_once(solver_path):
    """The second c-transform (``bounds.raise_dual_bound``): the same bound on the transposed problems with f^c as
    their row potential is >= the first and still <= W1 (POT's exact W1); a third returns the second."""
    blocks, tiles, costs = _grid_tiling(24, 32, 4, 3, 3, seed=14)
    w1 = _exact_w1(costs)
    f = torch.randn(tiles.shape[0], 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    first, f_c = w1_dual_bound(blocks, tiles, f, backend=solver_path)
    second, f_cc = w1_dual_bound(blocks, tiles, f_c, transposed=True, backend=solver_path)
    third, _ = w1_dual_bound(blocks, tiles, f_cc, backend=solver_path)
    assert (second >= first - 1e-12).all() and (second > first + 1e-3).any()
    assert (second.cpu().numpy() <= w1 + 1e-12).all()
    np.testing.assert_allclose(third.cpu().numpy(), second.cpu().numpy(), rtol=1e-12)
    # f^c and f^cc written out: min_x C(x, y) - f(x), min_y C(x, y) - f^c(y)
    np.testing.assert_allclose(f_c.reshape(-1, 12).cpu().numpy(), (costs - f.reshape(-1, 12, 1)).amin(1).cpu().numpy(), rtol=1e-12)
    dense_f_c = f_c.reshape(-1, 12)
    np.testing.assert_allclose(f_cc.reshape(-1, 12).cpu().numpy(), (costs - dense_f_c[:, None, :]).amin(2).cpu().numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiled_minima_stop_only_problems_proven_above_both_bests(dtype, solver_path):
    blocks, tiles, costs = _grid_tiling(40, 48, 4, 3, 3, seed=13, dtype=dtype)
    ref = _pot(costs.double(), 0.3)
    P = tiles.shape[0]
    # Each problem is its own row and column; the known bests are the median, +inf for every 5th.
    known = torch.full((P,), float(np.median(ref)), dtype=dtype, device=DEVICE)
    known[::5] = float("inf")
    minima = RunningMinima(torch.arange(P, device=DEVICE), torch.arange(P, device=DEVICE), known.clone(), known.clone())
    values, capped, solved, pruned = tiled_sinkhorn_transport_cost(blocks, tiles, 0.3, tol=1e-7, max_iter=100_000,
                                                                   minima=minima, backend=solver_path)
    assert pruned.any() and not (solved & pruned).any() and (solved | pruned).all() and not capped.any()
    assert not pruned[::5].any()
    assert (ref[pruned.cpu().numpy()] >= known[pruned].double().cpu().numpy()).all()  # W_eps really is >= both bests
    assert torch.isnan(values[pruned]).all()
    np.testing.assert_allclose(values[solved].double().cpu().numpy(), ref[solved.cpu().numpy()], rtol=1e-5)
    torch.testing.assert_close(minima.best_rows[solved], torch.minimum(known, values)[solved])  # lowered by solves


def test_tiled_minima_are_lowered_by_the_problems_it_solves(solver_path):
    """All problems in one row and column, one best known at the start (a problem's POT value, a little
    above the minimum): problems proved above it stop, the others are solved and lower the minima to the
    exact minimum at the end."""
    blocks, tiles, costs = _grid_tiling(40, 48, 4, 3, 3, seed=14)
    ref = _pot(costs, 0.3)
    P = tiles.shape[0]
    start = float(np.sort(ref)[P // 10])
    minima = RunningMinima(torch.zeros(P, dtype=torch.long, device=DEVICE), torch.zeros(P, dtype=torch.long, device=DEVICE),
                           torch.full((1,), start, dtype=torch.float64, device=DEVICE),
                           torch.full((1,), start, dtype=torch.float64, device=DEVICE))
    values, _, solved, pruned = tiled_sinkhorn_transport_cost(blocks, tiles, 0.3, tol=1e-9, max_iter=100_000,
                                                              minima=minima, backend=solver_path)
    assert pruned.any() and (solved | pruned).all() and solved[int(np.argmin(ref))]
    assert float(minima.best_rows[0]) == pytest.approx(ref.min(), rel=1e-6)
    assert float(minima.best_cols[0]) == pytest.approx(ref.min(), rel=1e-6)
    assert (ref[pruned.cpu().numpy()] >= start).all()
    np.testing.assert_allclose(values[solved].cpu().numpy(), ref[solved.cpu().numpy()], rtol=1e-6)
