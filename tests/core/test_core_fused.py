"""The fused kernels' own numerics (``shear_verl.core.fused``): the vectorisable float32 exp and log
against numpy's float64 ones, and their fall-back to libm where a problem's iterates leave their range.
The kernels' iterations against the torch path and POT: ``test_core_sinkhorn_pot.py``."""

import math

import numba
import numpy as np
import torch

from shear_verl.core.ot import fused
from shear_verl.core.ot.anderson import AndersonSinkhorn

FLOAT32_ULP = np.finfo(np.float32).eps  # 2^-23


@numba.njit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fused.fast_exp(x[i])


@numba.njit
def _log_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fused.fast_log(x[i])


def test_float32_exp_is_within_an_ulp_over_its_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(*fused._EXP_RANGE, 1_000_001), rng.uniform(-1, 1, 100_000)]).astype(np.float32)
    got = np.empty_like(x)
    _exp_all(x, got)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) <= FLOAT32_ULP


def test_float32_log_is_within_an_ulp_over_normal_numbers():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.exp(rng.uniform(-87.3, 88.7, 1_000_000)), rng.uniform(0.5, 2.0, 1_000_000),
                        [np.finfo(np.float32).tiny, np.finfo(np.float32).max, 1.0]]).astype(np.float32)
    got = np.empty_like(x)
    _log_all(x, got)
    want = np.log(x.astype(np.float64))
    # relative to |log x| away from 1, absolute (an ulp of the result's scale) near it
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)) <= FLOAT32_ULP


def test_float64_takes_libm():
    x = np.array([-700.0, -1.5, 0.3, 700.0])
    got = np.empty_like(x)
    _exp_all(x, got)
    np.testing.assert_array_equal(got, [math.exp(v) for v in x])
    x = np.array([1e-300, 0.7, 3.0, 1e300])
    _log_all(x, got)
    np.testing.assert_array_equal(got, [math.log(v) for v in x])


def test_a_row_that_vanishes_reaches_the_check_as_infinite():
    """A kernel row of zeros makes that row's marginal 0 whatever the scalings: log 0 = -inf must make
    u non-finite (the check then hands the problem to the stabilised solver), not the finite value the
    polynomial log would give."""
    kernel = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(2)) + 0.5  # [NB=1, g, g]
    kernel[0, 2] = 0.0
    tiles = torch.zeros(1, 1, 1, dtype=torch.long)  # one problem: the block itself
    accel = AndersonSinkhorn(1, 4, 5, 0.25, 0.25, torch.zeros(1, 4))
    u = accel.u  # [1, 4] log row scalings, updated in place by the kernel
    alpha, k_t_alpha, row = torch.ones_like(u), torch.empty_like(u), torch.empty_like(u)
    fused.advance(kernel, tiles, alpha, k_t_alpha, row, accel, 1, True, 1e-6, 1e-6)  # the first half-steps
    assert row[0, 2] == 0 and torch.isfinite(u).all()
    fused.advance(kernel, tiles, alpha, k_t_alpha, row, accel, 1, False, 1e-6, 1e-6)
    assert not torch.isfinite(u[0, 2])  # inf, or NaN by Anderson's inf * 0: either way lost at the check
