"""group_token_weights against the per-span-pair POT reference of conftest.py (all metrics and options)."""

import itertools
import os
from unittest import mock

import numpy as np
import pytest
import torch

from shear_verl.core import ShearConfig, ShearStats, group_token_weights
from shear_verl.core import span_distances as engine

DEVICE = torch.device(os.environ.get("SHEAR_TEST_DEVICE", "cpu"))  # e.g. SHEAR_TEST_DEVICE=cuda: inputs on a GPU


def _group(lengths, d, seed):
    g = torch.Generator().manual_seed(seed)
    # a per-rollout drift so spans differ and the minimum is not a tie
    return [(torch.randn(t, d, generator=g, dtype=torch.float64) * 2 + torch.randn(1, d, generator=g, dtype=torch.float64))
            .to(DEVICE) for t in lengths]


# uneven lengths, T < span_len (4, 6), an empty rollout (0)
LENGTHS = (15, 4, 11, 0, 6)
CORRECT = (True, False, True, False, False)


@pytest.mark.parametrize(("metric", "normalization", "pooling"),
                         list(itertools.product(("sinkhorn", "w1", "chamfer", "mmd", "cosine"), ("group", "rollout"),
                                                ("max", "mean"))))
def test_matches_reference(reference, metric, normalization, pooling):
    states = _group(LENGTHS, 3, seed=7)
    cfg = ShearConfig(span_len=6, stride=2, metric=metric, epsilon=0.5, normalization=normalization, pooling=pooling,
                      tol=1e-11, max_iter=100_000, compute_dtype="float64")
    stats = ShearStats()
    got = group_token_weights(states, CORRECT, cfg, stats=stats)
    want = reference.token_weights([h.cpu().numpy() for h in states], list(CORRECT), span_len=6, stride=2, metric=metric,
                                   epsilon=0.5, epsilon_mode="relative", normalization=normalization, pooling=pooling)
    assert [w.dtype for w in got] == [torch.float32] * len(LENGTHS)
    assert [w.shape[0] for w in got] == list(LENGTHS)
    for w, r in zip(got, want):
        np.testing.assert_allclose(w.cpu().numpy(), r, rtol=2e-6, atol=1e-7)  # float32 output
    assert stats.capped_solves == 0 and stats.mixed_groups == 1 and stats.fallback_rollouts == 0


@pytest.mark.parametrize("metric", ["sinkhorn", "chamfer", "mmd"])
def test_absolute_epsilon_matches_reference(reference, metric):
    states = _group((9, 13, 7), 4, seed=3)
    correct = (False, True, True)
    cfg = ShearConfig(span_len=5, stride=2, metric=metric, epsilon=1.5, epsilon_mode="absolute", tol=1e-11,
                      max_iter=100_000, compute_dtype="float64")
    got = group_token_weights(states, correct, cfg)
    want = reference.token_weights([h.cpu().numpy() for h in states], list(correct), span_len=5, stride=2, metric=metric,
                                   epsilon=1.5, epsilon_mode="absolute", normalization="group", pooling="max")
    for w, r in zip(got, want):
        np.testing.assert_allclose(w.cpu().numpy(), r, rtol=2e-6)


@pytest.mark.parametrize("correct", [(True,), (False,), (True, True, True), (False, False), (True, False)])
def test_groups_without_opposing_rollouts_keep_grpo(correct):
    lengths = (5, 0, 8)[: len(correct)] if len(correct) > 1 else (5,)
    if correct == (True, False):
        lengths = (5, 0)  # the only incorrect rollout is empty: nothing to compare with
    states = _group(lengths, 3, seed=1)
    stats = ShearStats()
    got = group_token_weights(states, correct, ShearConfig(span_len=4, stride=2), stats=stats)
    assert [w.tolist() for w in got] == [[1.0] * t for t in lengths]
    assert stats.as_dict() == {"groups": 1, "mixed_groups": 0, "rollouts": len(correct),
                               "fallback_rollouts": len(correct), "sinkhorn_solves": 0, "candidate_pairs": 0,
                               "pruned_pairs": 0, "dual_pruned_pairs": 0, "capped_solves": 0,
                               "n_bar_sum": 0.0, "epsilon_raw_sum": 0.0}


def test_float32_default_close_to_reference(reference):
    """The production path (float32, default tol) against the float64 reference."""
    states = _group((40, 25, 33, 12), 8, seed=11)
    correct = (True, False, False, True)
    cfg = ShearConfig(span_len=10, stride=5, epsilon=0.2)
    got = group_token_weights([h.float() for h in states], correct, cfg)
    want = reference.token_weights([h.cpu().numpy() for h in states], list(correct), span_len=10, stride=5, metric="sinkhorn",
                                   epsilon=0.2, epsilon_mode="relative", normalization="group", pooling="max")
    for w, r in zip(got, want):
        np.testing.assert_allclose(w.cpu().numpy(), r, rtol=1e-4)


# span_len=32, stride=16: blocks of g = gcd = 16 tokens, so the pairs of full spans go to the tiled
# solver (shared blocks; the final spans of 70 and 41 are off the 16-grid, on blocks of their own);
# 20 < span_len is one short span, whose pairs go to the per-problem solver.
TILED_LENGTHS = (70, 64, 41, 96, 20, 48)
TILED_CORRECT = (True, False, True, False, False, True)


@pytest.mark.parametrize(("prune", "dtype", "epsilon", "rtol"),
                         [(False, "float64", 0.1, 2e-6), (True, "float64", 0.1, 2e-6),
                          # float32 at eps 0.08: some kernels leave float32's range and are solved in float64
                          (True, "float32", 0.08, 1e-4)])
def test_tiled_solver_matches_reference(reference, prune, dtype, epsilon, rtol, solver_path):
    states = _group(TILED_LENGTHS, 3, seed=5)
    tiled_solves, left = [], []
    solve = engine.tiled_sinkhorn_transport_cost

    def spy(*args, **kwargs):
        out = solve(*args, **kwargs)
        tiled_solves.append(int(out[2].sum()))
        left.append(int((~(out[2] | out[3])).sum()))  # neither solved nor stopped by the dual bound
        return out

    cfg = ShearConfig(span_len=32, stride=16, epsilon=epsilon, tol=1e-11 if dtype == "float64" else 1e-6,
                      max_iter=100_000, compute_dtype=dtype, prune=prune)
    stats = ShearStats()
    with mock.patch.object(engine, "tiled_sinkhorn_transport_cost", spy):
        got = group_token_weights(states, TILED_CORRECT, cfg, stats=stats, backend=solver_path)
    want = reference.token_weights([h.cpu().numpy() for h in states], list(TILED_CORRECT), span_len=32, stride=16,
                                   metric="sinkhorn", epsilon=epsilon, epsilon_mode="relative", normalization="group",
                                   pooling="max")
    for w, r in zip(got, want):
        np.testing.assert_allclose(w.cpu().numpy(), r, rtol=rtol)
    assert 0 < sum(tiled_solves) < stats.sinkhorn_solves  # both solvers took part
    assert sum(left) == 0
    assert stats.capped_solves == 0
    assert (stats.dual_pruned_pairs > 0) == prune  # pairs stopped early by the dual bound, results unchanged


@pytest.mark.parametrize("lengths", [(150, 60, 40), (30, 150, 175)])
def test_default_spans_with_one_side_shorter_than_span_len(reference, lengths):
    """Paper defaults (w=100, s=25): when every rollout of one side is shorter than w there is no pair of
    full spans for the tiled solver (this used to raise in torch.cat) and all pairs go per problem."""
    states = _group(lengths, 4, seed=13)
    correct = (True, False, False)
    got = group_token_weights([h.float() for h in states], correct, ShearConfig())
    want = reference.token_weights([h.cpu().numpy() for h in states], list(correct), span_len=100, stride=25,
                                   metric="sinkhorn", epsilon=0.05, epsilon_mode="relative", normalization="group",
                                   pooling="max")
    for w, r in zip(got, want):
        np.testing.assert_allclose(w.cpu().numpy(), r, rtol=1e-4)
