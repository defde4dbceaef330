"""OAR-G's Bi-Level reshaping against a reference written here from the paper's steps (numpy, one
rollout at a time, as the authors' `calculate_oar_hybrid_weights` loops), on random batches with
mixed signs, masks, groups and reasoning spans; and the estimator through verl's GRPO."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shear_verl.baselines.oar_g import OarGSettings, bilevel_weights, reshape_advantages


def reference_weights(importance: np.ndarray, tau: float, beta: float, floor: float, sum_to_len: bool) -> np.ndarray:
    """log1p -> min-max -> quantile split -> suppress below (floored), boost above -> sum to R."""
    s = np.log1p(importance.astype(np.float64))
    rng = s.max() - s.min()
    n = (s - s.min()) / (rng if rng > 0 else 1.0)
    q = np.quantile(n, tau)
    w = np.empty_like(n)
    for i, x in enumerate(n):
        w[i] = max(x / (q + 1e-8), floor) if x < q else 1.0 + beta * (x - q) / (1.0 - q + 1e-8)
    if sum_to_len:
        w = w * (len(w) / (w.sum() + 1e-8)) if w.sum() > 0 else np.ones_like(w)
    return w


def reference_advantages(grpo, importance, reasoning, mask, **kw):
    out = np.zeros_like(grpo)
    for b in range(grpo.shape[0]):
        w = np.ones(grpo.shape[1])
        r = reasoning[b] & mask[b]
        if r.any():
            w[r] = reference_weights(importance[b][r], **kw)
        out[b] = grpo[b] * w * mask[b]
    return out


def random_batch(seed, b=12, t=20, groups=3):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 2, size=b).astype(np.float64)
    uid = np.array([i % groups for i in range(b)])
    grpo = np.zeros(b)
    for g in range(groups):
        m = uid == g
        grpo[m] = (scores[m] - scores[m].mean()) / (scores[m].std(ddof=1) + 1e-6)
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None] < lengths[:, None]
    mask &= rng.random((b, t)) > 0.15  # tool spans inside the response
    answer = np.array([rng.integers(0, n + 1) for n in lengths])  # reasoning = [0, answer); 0: none
    reasoning = np.arange(t)[None] < answer[:, None]
    importance = rng.exponential(rng.choice([1e-4, 1.0, 30.0]), size=(b, t))
    importance[rng.random((b, t)) < 0.1] = 0.0
    return grpo[:, None] * mask, importance, reasoning, mask


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.05, 0.95), beta=st.floats(0.0, 3.0),
       floor=st.floats(0.0, 1.0), sum_to_len=st.booleans())
def test_reshaping_matches_the_papers_steps(seed, tau, beta, floor, sum_to_len):
    grpo, importance, reasoning, mask = random_batch(seed)
    kw = dict(tau=tau, beta=beta, floor=floor, sum_to_len=sum_to_len)
    got = reshape_advantages(torch.tensor(grpo), torch.tensor(importance), torch.tensor(reasoning),
                             torch.tensor(mask), **kw)
    np.testing.assert_allclose(got.numpy(), reference_advantages(grpo, importance, reasoning, mask, **kw),
                               rtol=1e-5, atol=1e-6)


def test_mass_is_preserved_and_sign_kept():
    grpo, importance, reasoning, mask = random_batch(3)
    r = torch.tensor(reasoning & mask)
    w = bilevel_weights(torch.tensor(importance), r)
    for b in range(w.shape[0]):
        if r[b].any():
            assert float(w[b][r[b]].sum()) == pytest.approx(int(r[b].sum()), rel=1e-5)
    assert (w > 0).all()  # floor 0.1 > 0: no advantage changes sign
    assert (w[~r] == 1).all()


def test_all_equal_saliency_is_grpo():
    w = bilevel_weights(torch.full((2, 5), 0.3), torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(w, torch.ones(2, 5))


def test_settings_refuse_out_of_range():
    with pytest.raises(ValueError, match="algorithm.oar_g.tau"):
        OarGSettings(tau=1.0)
    with pytest.raises(ValueError, match="algorithm.oar_g.noise_std"):
        OarGSettings(noise_std=0.0)
    assert OarGSettings(noise_std=0.0, target="answer_joint").noise_std == 0.0
    with pytest.raises(ValueError, match="algorithm.oar_g.target"):
        OarGSettings(target="first")
