"""Diagnostic helpers against hand-made sequences, scipy-free brute force and a planted generator."""

import itertools

import numpy as np
import pytest

from shear_verl.diagnose import binned_auc, continuation_success, prefix_positions, shift_events, spearman


def test_prefix_positions_exclude_answer_spans():
    assert prefix_positions(40, span_len=8, start=8, stride=8) == [8, 16, 24, 32, 40]
    # answer from token 30: spans [p-8, p) with p <= 30 hold no answer token
    assert prefix_positions(40, span_len=8, start=8, stride=8, answer_start=30) == [8, 16, 24]
    assert prefix_positions(40, span_len=8, start=4, stride=5) == [8, 13, 18, 23, 28, 33, 38]
    with pytest.raises(ValueError):
        prefix_positions(10, 0, 1, 1)


def test_continuation_success_within_binomial_error():
    rng = np.random.default_rng(0)
    for p in (0.1, 0.5, 0.9):
        k = 400
        est = continuation_success(rng.random(k) < p)
        assert abs(est - p) <= 4 * np.sqrt(p * (1 - p) / k)


def test_spearman_against_brute_force_formula():
    rng = np.random.default_rng(1)
    x, y = rng.permutation(12).astype(float), rng.permutation(12).astype(float)
    d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
    assert spearman(x, y) == pytest.approx(1 - 6 * (d ** 2).sum() / (12 * (12 ** 2 - 1)))
    assert spearman([1, 2], [3, 4]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_shift_events_threshold():
    ev = shift_events([8, 16, 24], [1.0, 0.75, 0.75], [0.1, 0.3, 0.2], min_shift=0.25)
    assert ev == [{"position": 16, "delta_success": -0.25, "delta_distance": pytest.approx(0.2)}]


def test_binned_auc_against_pair_count():
    rng = np.random.default_rng(2)
    d, s, c = rng.random(60), rng.integers(0, 5, 60) / 4, rng.random(60) < 0.5
    rows = binned_auc(d, s, c, bins=3)
    assert sum(r["spans"] for r in rows) == 60
    for r in rows:
        m = (d >= r["low"]) & ((d < r["high"]) | (r["bin"] == 2))
        pos, neg = s[m & c], s[m & ~c]
        brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)])
        assert r["auc"] == pytest.approx(brute)


def test_continuation_successes_against_planted_generator():
    """A fake generator whose completions of prefix p are correct with a planted probability:
    the estimates are within their binomial error, and each prefix gets k completions."""
    from shear_verl.diagnose.run import continuation_successes

    planted = {4: 0.9, 8: 0.5, 12: 0.1}
    rng = np.random.default_rng(3)
    prompt, response, calls = [7, 7], list(range(100, 116)), []

    def sample(ids, k, budget):
        p = len(ids) - len(prompt)
        assert ids == prompt + response[:p] and budget == 40 - p
        calls.append(k)
        return [[1] if rng.random() < planted[p] else [0] for _ in range(k)]

    k = 600
    est = continuation_successes(sample, lambda ids: ids[-1] == 1, prompt, response, sorted(planted), k, 40)
    assert calls == [k] * 3
    for (p, truth), got in zip(sorted(planted.items()), est):
        assert abs(got - truth) <= 4 * np.sqrt(truth * (1 - truth) / k), (p, got)
