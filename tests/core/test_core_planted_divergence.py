"""Planted divergence: the paper's separation theorem in miniature.

Correct rollouts draw every hidden state from one distribution; incorrect ones from the same until
t*, then from a shifted one. On incorrect rollouts, the weights after t* must separate from those
before it (AUC >= 0.95).
"""

import os

import torch

from shear_verl.core import ShearConfig, group_token_weights

DEVICE = torch.device(os.environ.get("SHEAR_TEST_DEVICE", "cpu"))  # e.g. SHEAR_TEST_DEVICE=cuda: inputs on a GPU


def _auc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney U / (n_p n_n))."""
    diff = positives[:, None] - negatives[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def test_weights_separate_tokens_after_the_divergence_point():
    g = torch.Generator().manual_seed(0)
    d, length, t_star = 16, 240, 130
    shift = torch.zeros(d)
    shift[:4] = 0.9  # a shift of norm 1.8 against per-token noise of norm ~4
    correct = [True] * 4 + [False] * 4
    states = []
    for ok in correct:
        h = torch.randn(length, d, generator=g)
        if not ok:
            h[t_star:] += shift
        states.append(h.to(DEVICE))
    weights = group_token_weights(states, correct, ShearConfig(span_len=40, stride=10))
    for w, ok in zip(weights, correct):
        if not ok:
            assert _auc(w[t_star:], w[:t_star]) >= 0.95
