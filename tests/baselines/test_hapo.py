"""HAPO (this package's reading of the abstract, shear_verl.baselines.hapo) against a reference
written here as plain loops from the module's equation, on random batches with mixed signs, masks
and groups, through verl's registered-estimator lookup and its GRPO advantage."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from shear_verl.baselines import hapo, register_baselines
from shear_verl.integration import signals


def random_batch(seed, groups=4, size=4, T=9):
    g = torch.Generator().manual_seed(seed)
    B = groups * size
    uids = np.array([f"g{i // size}" for i in range(B)], dtype=object)
    scores = torch.randint(0, 2, (B,), generator=g).float()
    scores[:4] = torch.tensor([1.0, 0.0, 0.3, 1.0])  # a partial-credit member
    scores[size:2 * size] = 1.0  # one group all alike: zero advantage
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # [B, T]
    mask[0, 1] = 0.0  # a tool span inside a response
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    entropy = torch.rand(B, T, generator=g) * 3  # [B, T]
    entropy[2] = 0.0  # a fully deterministic response
    return rewards, mask, uids, scores, entropy


def grpo_reference(scores, uids, eps=1e-6):
    out = [0.0] * len(uids)
    for u in set(uids):
        idx = [i for i, v in enumerate(uids) if v == u]
        s = [float(scores[i]) for i in idx]
        mean = sum(s) / len(s)
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (len(s) - 1))
        for i in idx:
            out[i] = (float(scores[i]) - mean) / (std + eps)
    return out


def hapo_reference(a, entropies, lam_pos, lam_neg, beta):
    """One response: A * ((1 - lam_s) + lam_s * c_t / mean(c)), c = H ** beta, over its tokens."""
    lam = lam_pos if a > 0 else lam_neg
    caps = [h ** beta for h in entropies]
    mean = sum(caps) / len(caps) if caps else 0.0
    return [a * ((1 - lam) + lam * (c / mean if mean > 0 else 1.0)) for c in caps]


def run_hapo(rewards, mask, uids, entropy, section):
    register_baselines()
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    config = OmegaConf.create({"norm_adv_by_std_in_grpo": True, "hapo": section})
    with signals.pending("hapo", {"entropy": entropy}, list(uids)) as handoff:
        adv, ret = get_adv_estimator_fn("hapo")(token_level_rewards=rewards, response_mask=mask, index=uids,
                                                config=config)
    assert torch.equal(adv, ret)
    return adv, handoff["metrics"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("section", [{}, {"lam_pos": 0.8, "lam_neg": 0.2, "beta": 2.0}, {"lam_pos": 1.0,
                                                                                         "lam_neg": 0.0}])
def test_hapo_estimator_matches_the_equation(seed, section):
    rewards, mask, uids, scores, H = random_batch(seed)
    adv, metrics = run_hapo(rewards, mask, uids, H, section)
    s = hapo.HapoSettings(**section)
    grpo = grpo_reference(scores, uids)
    for b in range(len(uids)):
        toks = [t for t in range(mask.shape[1]) if mask[b, t]]
        expect = hapo_reference(grpo[b], [float(H[b, t]) for t in toks], s.lam_pos, s.lam_neg, s.beta)
        for t in range(mask.shape[1]):
            want = expect[toks.index(t)] if t in toks else 0.0
            assert float(adv[b, t]) == pytest.approx(want, rel=1e-5, abs=1e-6)
            if t in toks and grpo[b] != 0:  # sign-preserving
                assert float(adv[b, t]) * grpo[b] >= 0
        # reallocation: the response keeps GRPO's advantage mass
        assert float(adv[b].sum()) == pytest.approx(grpo[b] * len(toks), rel=1e-5, abs=1e-5)
    assert torch.all(adv[4:8] == 0)  # the all-correct group keeps a zero advantage
    assert metrics["hapo/entropy_mean"] == pytest.approx(float(H[mask.bool()].mean()), rel=1e-6)
    assert metrics["hapo/mass_rel_error"] < 1e-5
    assert metrics["hapo/weight_min"] >= 0


def test_polarity_picks_the_lambda_and_zero_is_grpo():
    rewards, mask, uids, scores, H = random_batch(4)
    grpo = torch.tensor(grpo_reference(scores, uids))[:, None] * mask
    plain, m = run_hapo(rewards, mask, uids, H, {"lam_pos": 0.0, "lam_neg": 0.0})
    assert torch.allclose(plain, grpo, atol=1e-6) and m["hapo/moved_mass_frac"] == pytest.approx(0, abs=1e-7)
    pos_only, _ = run_hapo(rewards, mask, uids, H, {"lam_pos": 1.0, "lam_neg": 0.0})
    neg = grpo[:, :1].squeeze(1) < 0
    assert torch.allclose(pos_only[neg], grpo[neg], atol=1e-6)  # negative rows untouched
    assert not torch.allclose(pos_only[~neg], grpo[~neg], atol=1e-3)


def test_high_entropy_tokens_gain_and_the_entropy_is_detached():
    A = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    H = torch.tensor([[0.1, 1.0, 2.0], [2.0, 0.0, 1.0]], requires_grad=True)
    w = hapo.capacity_weights(A, H, torch.ones(2, 3), 0.5, 0.5, 1.0)
    assert not w.requires_grad
    assert w[0, 2] > 1 > w[0, 1] > w[0, 0] and w[1, 0] > w[1, 2] > w[1, 1] == pytest.approx(0.5)


@pytest.mark.parametrize("section, message", [
    ({"lam_pos": 1.5}, r"algorithm.hapo.lam_pos must be in \[0, 1\]"),
    ({"lam_neg": -0.1}, r"algorithm.hapo.lam_neg must be in \[0, 1\]"),
    ({"beta": 0}, "algorithm.hapo.beta must be > 0"),
    ({"alpha": 0.4}, "unknown key.*algorithm.hapo.alpha"),
    ({"beta": "sharp"}, "algorithm.hapo.beta must be a number"),
])
def test_bad_keys_name_the_setting(section, message):
    register_baselines()
    with pytest.raises(ValueError, match=message):
        signals.SIGNALS["hapo"].parse({"hapo": section})


def test_start_up_refuses_hapo_keys_in_another_methods_run():
    from hydra import compose, initialize_config_module

    from shear_verl.integration.driver import validate_config

    register_baselines()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        ok = compose(config_name="ppo_trainer", overrides=["actor_rollout_ref.rollout.n=4",
                                                           "algorithm.adv_estimator=hapo", "+algorithm.hapo.beta=2"])
        bad = compose(config_name="ppo_trainer", overrides=["actor_rollout_ref.rollout.n=4",
                                                            "algorithm.adv_estimator=grpo", "+algorithm.hapo.beta=2"])
    assert validate_config(ok) == hapo.HapoSettings(beta=2.0)
    with pytest.raises(ValueError, match="algorithm.hapo.beta configure algorithm.adv_estimator=hapo"):
        validate_config(bad)
