"""A small epsilon on LM-sized states: kernel sums underflow in float32, and the numba kernels must
hand those problems on (inf reaches the range check) rather than raise ZeroDivisionError, as they did
before the kernels used numba's numpy error model. The torch backend, which never raised, is the
reference: the same weights on the same group."""

import runpy
from pathlib import Path

import pytest
import torch

from shear_verl.core import ShearConfig, group_token_weights

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench_weights.py"


@pytest.mark.slow
def test_numba_backend_survives_float32_underflow_and_matches_torch():
    phased_group = runpy.run_path(str(BENCH))["phased_group"]  # the bench's LM-like states
    lengths, correct = [600, 620, 640, 660, 680, 700, 610, 690], [True] * 4 + [False] * 4
    states = phased_group(lengths, correct, 3584, seed=0)  # G x [T_i, 3584]
    cfg = ShearConfig(span_len=100, stride=25, metric="sinkhorn", epsilon=0.0125, epsilon_mode="relative",
                      normalization="group", pooling="max")
    fused = group_token_weights(states, correct, cfg, backend="numba")
    reference = group_token_weights(states, correct, cfg, backend="torch")
    for got, want in zip(fused, reference):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
