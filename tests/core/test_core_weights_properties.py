"""Invariances, exact pruning, chunking, input validation and configuration of the weight engine."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from shear_verl.core import ShearConfig, ShearStats, group_token_weights, shear_advantages

DEVICE = torch.device(os.environ.get("SHEAR_TEST_DEVICE", "cpu"))  # e.g. SHEAR_TEST_DEVICE=cuda: inputs on a GPU


def _drifting_group(lengths, d, seed, dtype=torch.float64):
    """States that drift along the response (a random walk plus token noise), so span means differ
    and the pruning bound has something to prune."""
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(t, d, generator=g, dtype=dtype) * 0.6).cumsum(0) + torch.randn(t, d, generator=g, dtype=dtype))
            .to(DEVICE) for t in lengths]


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=2, max_size=5), flags=st.lists(st.booleans(), min_size=5, max_size=5),
       seed=st.integers(0, 2**16), metric=st.sampled_from(["sinkhorn", "w1"]))
def test_pruned_equals_brute_force(lengths, flags, seed, metric):
    correct = flags[: len(lengths)]
    states = _drifting_group(lengths, 3, seed)
    cfg = ShearConfig(span_len=6, stride=2, metric=metric, epsilon=0.3, tol=1e-10, max_iter=100_000,
                      compute_dtype="float64")
    pruned_stats, brute_stats = ShearStats(), ShearStats()
    pruned = group_token_weights(states, correct, cfg, stats=pruned_stats)
    brute = group_token_weights(states, correct, dataclasses.replace(cfg, prune=False), stats=brute_stats)
    for p, b in zip(pruned, brute):
        torch.testing.assert_close(p, b, rtol=1e-6, atol=0)
    assert brute_stats.sinkhorn_solves == brute_stats.candidate_pairs == pruned_stats.candidate_pairs
    assert pruned_stats.sinkhorn_solves + pruned_stats.pruned_pairs == pruned_stats.candidate_pairs


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(0, 110), min_size=2, max_size=5), flags=st.lists(st.booleans(), min_size=5, max_size=5),
       seed=st.integers(0, 2**16))
def test_pruned_equals_brute_force_on_tiled_spans(lengths, flags, seed):
    """span_len 32, stride 16: full span pairs go to the tiled solver, which also stops candidates
    early once the W1 dual bound of their iterates reaches the best of both their spans."""
    correct = flags[: len(lengths)]
    states = _drifting_group(lengths, 3, seed)
    cfg = ShearConfig(span_len=32, stride=16, epsilon=0.3, tol=1e-10, max_iter=100_000, compute_dtype="float64")
    pruned_stats = ShearStats()
    pruned = group_token_weights(states, correct, cfg, stats=pruned_stats)
    brute = group_token_weights(states, correct, dataclasses.replace(cfg, prune=False))
    for p, b in zip(pruned, brute):
        torch.testing.assert_close(p, b, rtol=1e-6, atol=0)
    assert pruned_stats.sinkhorn_solves + pruned_stats.pruned_pairs == pruned_stats.candidate_pairs
    assert pruned_stats.dual_pruned_pairs <= pruned_stats.pruned_pairs


def test_pruning_prunes_on_drifting_states():
    states = _drifting_group((60, 50, 70, 40), 4, seed=0, dtype=torch.float32)
    stats = ShearStats()
    group_token_weights(states, (True, False, True, False), ShearConfig(span_len=8, stride=2, epsilon=0.2), stats=stats)
    assert stats.pruned_pairs > 0.5 * stats.candidate_pairs


@pytest.mark.parametrize("metric", ["sinkhorn", "w1", "chamfer", "mmd", "cosine"])
def test_invariant_to_hidden_state_scale(metric):
    states = _drifting_group((20, 13, 17), 5, seed=2)
    correct = (True, False, False)
    cfg = ShearConfig(span_len=6, stride=3, metric=metric, epsilon=0.2, tol=1e-11, max_iter=100_000,
                      compute_dtype="float64")
    base = group_token_weights(states, correct, cfg)
    for factor in (1e-3, 37.0):
        scaled = group_token_weights([h * factor for h in states], correct, cfg)
        for b, s in zip(base, scaled):
            torch.testing.assert_close(s, b, rtol=1e-5, atol=1e-7)


def test_equivariant_to_permuting_rollouts():
    states = _drifting_group((20, 0, 13, 17, 9), 5, seed=3)
    correct = [True, False, False, True, False]
    cfg = ShearConfig(span_len=6, stride=3, epsilon=0.2, tol=1e-11, max_iter=100_000, compute_dtype="float64")
    base = group_token_weights(states, correct, cfg)
    perm = [3, 0, 4, 2, 1]
    permuted = group_token_weights([states[p] for p in perm], [correct[p] for p in perm], cfg)
    for k, p in enumerate(perm):
        torch.testing.assert_close(permuted[k], base[p], rtol=1e-6, atol=0)


@pytest.mark.parametrize("metric", ["sinkhorn", "chamfer", "mmd"])
def test_memory_budget_chunking_does_not_change_weights(metric):
    states = _drifting_group((50, 41, 64, 30), 6, seed=4, dtype=torch.float32)
    correct = (True, False, True, False)
    cfg = ShearConfig(span_len=10, stride=3, metric=metric, epsilon=0.2)
    roomy = group_token_weights(states, correct, cfg)
    tight = group_token_weights(states, correct, dataclasses.replace(cfg, memory_budget_mb=0.02))  # ~20 kB
    for r, t in zip(roomy, tight):
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-7)


def test_output_follows_input_device_and_dtype():
    states = [h.to(torch.bfloat16) for h in _drifting_group((12, 9), 4, seed=5, dtype=torch.float32)]
    got = group_token_weights(states, (True, False), ShearConfig(span_len=4, stride=2))
    assert all(w.dtype == torch.float32 and w.device == states[0].device for w in got)
    assert all(bool((w > 0).all()) for w in got)


def test_stats_accumulate_over_groups():
    stats = ShearStats()
    cfg = ShearConfig(span_len=4, stride=2)
    group_token_weights(_drifting_group((9, 7), 3, seed=6), (True, False), cfg, stats=stats)
    first = stats.as_dict()
    group_token_weights(_drifting_group((5, 6), 3, seed=7), (True, True), cfg, stats=stats)
    assert stats.groups == 2 and stats.mixed_groups == 1 and stats.rollouts == 4 and stats.fallback_rollouts == 2
    assert first["candidate_pairs"] == 4 * 3  # spans start at 0,2,4,5 and at 0,2,3
    assert stats.candidate_pairs == first["candidate_pairs"]
    merged = ShearStats().merge(stats).merge(stats)
    assert merged.groups == 4 and merged.candidate_pairs == 2 * stats.candidate_pairs


@pytest.mark.parametrize("mode, eps", [("relative", 0.05), ("absolute", 4.5)])
def test_stats_report_n_bar_and_raw_epsilon_of_mixed_groups(mode, eps):
    cfg = ShearConfig(span_len=4, stride=2, epsilon=eps, epsilon_mode=mode)
    stats = ShearStats()
    groups = [_drifting_group((9, 7), 3, seed=6), _drifting_group((6, 8, 5), 3, seed=8)]
    for states, correct in zip(groups, [(True, False), (False, True, True)]):
        group_token_weights(states, correct, cfg, stats=stats)
    group_token_weights(_drifting_group((5, 6), 3, seed=7), (True, True), cfg, stats=stats)  # no opposing side
    n_bars = [torch.cat([h.double() for h in g]).norm(dim=1).mean().item() for g in groups]  # over all tokens
    assert stats.mixed_groups == 2
    assert stats.n_bar_sum == pytest.approx(sum(n_bars), rel=1e-5)
    expect = sum(eps * n for n in n_bars) if mode == "relative" else 2 * eps
    assert stats.epsilon_raw_sum == pytest.approx(expect, rel=1e-5)


# --- bad input -------------------------------------------------------------------------------------

def _ok():
    return [torch.randn(5, 3), torch.randn(4, 3)]


@pytest.mark.parametrize(("states", "correct", "message"), [
    (_ok(), [True], "2 hidden-state tensors but 1 correctness flags"),
    ([torch.randn(5, 3), torch.randn(4, 2)], [True, False], "rollout 1: hidden size d=2"),
    ([torch.randn(5, 3), torch.randn(4, 3, 1)], [True, False], r"rollout 1: hidden states must be 2-D"),
    ([torch.randn(5)], [True], r"rollout 0: hidden states must be 2-D"),
    ([torch.randn(5, 3), torch.ones(4, 3, dtype=torch.long)], [True, False], "rollout 1: .*floating-point"),
    ([torch.randn(5, 3), torch.tensor([[0.0, float("nan"), 1.0]])], [True, False], "rollout 1: .*NaN or inf"),
    ([torch.tensor([[float("inf"), 0.0, 1.0]]), torch.randn(4, 3)], [True, False], "rollout 0: .*NaN or inf"),
])
def test_bad_input_is_named(states, correct, message):
    with pytest.raises(ValueError, match=message):
        group_token_weights(states, correct, ShearConfig(span_len=4, stride=2))


def test_empty_group_and_empty_rollouts():
    assert group_token_weights([], [], ShearConfig()) == []
    got = group_token_weights([torch.zeros(0, 3), torch.randn(4, 3)], [True, False], ShearConfig())
    assert got[0].shape == (0,) and got[1].tolist() == [1.0] * 4


# --- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "message"), [
    ("metric", "wasserstein", "metric='wasserstein' is not supported; use one of 'sinkhorn', 'w1'"),
    ("epsilon_mode", "raw", "epsilon_mode='raw'.*'relative', 'absolute'"),
    ("normalization", "token", "normalization='token'.*'group', 'rollout'"),
    ("pooling", "sum", "pooling='sum'.*'max', 'mean'"),
    ("compute_dtype", "float16", "compute_dtype='float16'"),
    ("span_len", 0, "span_len=0 must be an integer >= 1"),
    ("stride", 200, "stride=200 must be <= span_len=100"),
    ("epsilon", -1.0, "epsilon=-1.0 must be a finite number > 0"),
    ("tol", float("nan"), "tol=nan"),
    ("max_iter", 0, "max_iter=0"),
    ("prune", "yes", "prune='yes' must be True or False"),
    ("memory_budget_mb", 0, "memory_budget_mb=0"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        ShearConfig(**{field: value})


def test_config_from_mapping():
    raw = OmegaConf.create({"span_len": 50, "epsilon": 1, "metric": "mmd", "correct_threshold": 0.5})
    cfg = ShearConfig.from_mapping(raw, ignore=("correct_threshold",))
    assert cfg == ShearConfig(span_len=50, epsilon=1.0, metric="mmd") and isinstance(cfg.epsilon, float)
    with pytest.raises(ValueError, match=r"unknown SHEAR engine option\(s\) \['correct_threshold', 'spanlen'\]"):
        ShearConfig.from_mapping({"spanlen": 3, "correct_threshold": 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.span_len = 3


def test_shear_advantages():
    adv = torch.tensor([[1.5, 1.5, 1.5], [-0.5, -0.5, 0.0]])
    w = torch.tensor([[0.2, 1.0, 3.0], [2.0, 0.0, 1.0]])
    np.testing.assert_allclose(shear_advantages(adv, w).numpy(), [[0.3, 1.5, 4.5], [-1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"advantages \(2, 3\) and token weights \(2, 2\)"):
        shear_advantages(adv, w[:, :2])
