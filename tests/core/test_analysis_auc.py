"""divergence_auc's AUC against a brute-force pairwise count."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shear_verl.analysis import auc, divergence_auc, dump_divergence

values = st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 2.0]) | st.floats(0, 3, width=32), min_size=1, max_size=30)


def brute_auc(pos, neg):
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(values, values)
def test_auc_is_the_pairwise_win_rate(pos, neg):
    assert auc(pos, neg) == pytest.approx(brute_auc(pos, neg), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1, width=32), min_size=4, max_size=40), st.data())
def test_divergence_auc_splits_at_the_error_and_drops_its_span(weights, data):
    n = len(weights)
    mask = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    error = data.draw(st.integers(0, n - 1))
    span = data.draw(st.integers(1, 6))
    for span_len, cut in ((None, error), (span, error - span + 1)):
        after = [w for t, (w, m) in enumerate(zip(weights, mask)) if m and t >= error]
        before = [w for t, (w, m) in enumerate(zip(weights, mask)) if m and t < cut]
        got = divergence_auc(weights, mask, error, span_len)
        if after and before:
            assert got == pytest.approx(brute_auc(after, before), abs=1e-12)
        else:
            assert got is None


def test_divergence_auc_edge_cases():
    assert divergence_auc([0.1, 0.2], [1, 1], -1) is None  # correct rollout
    assert divergence_auc([0.1, 0.2], [1, 1], 5) is None  # error past the end: nothing after it
    assert divergence_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 1, 1], 2) == 1.0
    with pytest.raises(ValueError, match="length"):
        divergence_auc([0.1], [1, 1], 0)
    with pytest.raises(ValueError, match="non-empty"):
        auc([], [1.0])
    assert np.isclose(auc([1.0], [1.0]), 0.5)


def test_dump_divergence_counts_incorrect_rollouts_of_mixed_groups_only():
    from shear_verl.view import parse_rollout

    def row(step, uid, correct, weights, first_error):
        n = len(weights)
        return parse_rollout({
            "step": step, "uid": uid, "estimator": "shear", "score": float(correct), "correct": correct,
            "response_ids": list(range(n)), "tokens": ["t"] * n, "response_mask": [1] * n, "weights": weights,
            "grpo_advantage": [0.0] * n, "advantage": [0.0] * n,
            "reward_extra_info": {"first_error": first_error}}, "test")

    rising, flat = [0.1, 0.2, 0.9, 0.8], [1.0] * 4
    rollouts = [
        row(1, "a", True, [0.1] * 4, -1), row(1, "a", False, rising, 2), row(1, "a", False, [0.5, 0.9, 0.1, 0.1], 2),
        row(1, "b", False, flat, 1), row(1, "b", False, flat, 2),  # no correct rollout: fallback weights
        row(2, "a", False, rising, 2),  # the same uid at another step is another group (all incorrect)
    ]
    per_step = dump_divergence(rollouts)
    assert per_step == {1: {"divergence_auc": pytest.approx((brute_auc([0.9, 0.8], [0.1, 0.2])
                                                             + brute_auc([0.1, 0.1], [0.5, 0.9])) / 2),
                            "rollouts": 2}}
