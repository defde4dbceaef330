"""The baselines' formulas against references written here from the papers' equations (for HAPO,
from this package's reading of its abstract, shear_verl.baselines.hapo), on random batches with
mixed signs, masks and groups, through verl's registered-estimator lookup, GRPO and policy-loss code."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from shear_verl.baselines import entropy_adv, hapo, register_baselines, top_entropy
from shear_verl.integration import signals


def random_batch(seed, groups=4, size=4, T=9, deterministic_row=False):
    g = torch.Generator().manual_seed(seed)
    B = groups * size
    uids = np.array([f"g{i // size}" for i in range(B)], dtype=object)
    scores = torch.randint(0, 2, (B,), generator=g).float()
    scores[:size] = torch.tensor([1.0, 0.0, 0.3, 1.0])[:size]  # a partial-credit member
    scores[size:2 * size] = 1.0  # one group all alike: zero advantage
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # [B, T]
    mask[0, 1] = 0.0  # a tool span inside a response
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    entropy = torch.rand(B, T, generator=g) * 3  # [B, T], nats
    if deterministic_row:
        entropy[2] = 0.0  # a fully deterministic response
    return rewards, mask, uids, scores, entropy


def grpo_reference(scores, uids, eps=1e-6):
    """(r_i - mean_G r) / (std_G r + eps), as a plain loop (std with Bessel's correction, like verl)."""
    out = [0.0] * len(uids)
    for u in set(uids):
        idx = [i for i, v in enumerate(uids) if v == u]
        s = [float(scores[i]) for i in idx]
        mean = sum(s) / len(s)
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (len(s) - 1))
        for i in idx:
            out[i] = (float(scores[i]) - mean) / (std + eps)
    return out


def run_estimator(name, rewards, mask, uids, entropy, section):
    register_baselines()
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    config = OmegaConf.create({"norm_adv_by_std_in_grpo": True, name: section})
    with signals.pending(name, {"entropy": entropy}, list(uids)) as handoff:
        adv, ret = get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=mask, index=uids,
                                              config=config)
    assert torch.equal(adv, ret)
    return adv, handoff


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha, kappa", [(0.4, 2.0), (1.5, 1.2)])
def test_shape_advantages_is_the_papers_equation(seed, alpha, kappa):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(5, 7, generator=g) * 2  # mixed signs
    A[0] = 0.0
    H = torch.rand(5, 7, generator=g) * 4
    M = (torch.rand(5, 7, generator=g) > 0.3).float()
    got = entropy_adv.shape_advantages(A, H, M, alpha, kappa)
    for b in range(5):
        for t in range(7):
            a, h = float(A[b, t]), float(H[b, t])
            expect = a + min(alpha * h, abs(a) / kappa) if M[b, t] else 0.0
            assert float(got[b, t]) == pytest.approx(expect, rel=1e-6, abs=1e-6)
            if M[b, t] and a != 0:
                assert math.copysign(1, float(got[b, t])) == math.copysign(1, a)  # kappa > 1 keeps the sign


def test_shape_advantages_detaches_the_entropy():
    H = torch.rand(2, 3, requires_grad=True)
    out = entropy_adv.shape_advantages(torch.ones(2, 3), H, torch.ones(2, 3), 0.4, 2.0)
    assert not out.requires_grad


@pytest.mark.parametrize("seed", [0, 3])
def test_entropy_adv_estimator_is_grpo_plus_the_clipped_bonus(seed):
    rewards, mask, uids, scores, H = random_batch(seed)
    adv, handoff = run_estimator("entropy_adv", rewards, mask, uids, H, {"alpha": 0.7, "kappa": 3.0})
    grpo = grpo_reference(scores, uids)
    for b in range(len(uids)):
        for t in range(mask.shape[1]):
            a = grpo[b]
            expect = a + min(0.7 * float(H[b, t]), abs(a) / 3.0) if mask[b, t] else 0.0
            assert float(adv[b, t]) == pytest.approx(expect, rel=1e-5, abs=1e-5)
    assert torch.all(adv[4:8] == 0)  # the all-correct group keeps a zero advantage
    m = handoff["metrics"]
    assert m["entropy_adv/entropy_mean"] == pytest.approx(float(H[mask.bool()].mean()), rel=1e-6)
    assert 0.0 <= m["entropy_adv/clip_frac"] <= 1.0 and m["entropy_adv/bonus_to_adv"] <= 1 / 3.0 + 1e-6


def test_top_entropy_keeps_the_top_share_rescaled():
    rewards, mask, uids, scores, H = random_batch(5, groups=3, size=4, T=11)
    adv, handoff = run_estimator("top_entropy", rewards, mask, uids, H, {"rho": 0.2})
    grpo = grpo_reference(scores, uids)
    pool = [(float(H[b, t]), b, t) for b in range(len(uids)) for t in range(mask.shape[1]) if mask[b, t]]
    k = math.ceil(0.2 * len(pool))
    chosen = {(b, t) for _, b, t in sorted(pool, reverse=True)[:k]}
    for b in range(len(uids)):
        for t in range(mask.shape[1]):
            expect = grpo[b] * len(pool) / k if (b, t) in chosen else 0.0
            assert float(adv[b, t]) == pytest.approx(expect, rel=1e-5, abs=1e-6)
    assert handoff["metrics"]["top_entropy/selected_frac"] == pytest.approx(k / len(pool))


def test_top_entropy_loss_under_verls_token_mean_is_the_official_mean_over_selected_tokens():
    """verl 0.9.1's vanilla PPO loss (token-mean over all tokens) on our advantages equals the
    official loss: the clipped objective on the unscaled GRPO advantages, averaged over the
    selected tokens only (official core_algos: agg_loss with response_mask * entropy_top_mask)."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import ActorConfig

    rewards, mask, uids, scores, H = random_batch(7, groups=3, size=4, T=11)
    adv, _ = run_estimator("top_entropy", rewards, mask, uids, H, {})
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(mask.shape, generator=g) * 2
    new = old + torch.randn(mask.shape, generator=g) * 0.3  # ratios inside and outside the clip
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2)
    ours, _ = compute_policy_loss_vanilla(old, new, adv, mask, loss_agg_mode="token-mean", config=cfg)
    grpo = grpo_reference(scores, uids)
    pool = [(float(H[b, t]), b, t) for b in range(len(uids)) for t in range(mask.shape[1]) if mask[b, t]]
    chosen = sorted(pool, reverse=True)[:math.ceil(0.2 * len(pool))]
    terms = []
    for _, b, t in chosen:
        r, a = math.exp(float(new[b, t] - old[b, t])), grpo[b]
        pg = max(-a * r, -a * min(max(r, 0.8), 1.2))
        terms.append(min(pg, -a * 3.0) if a < 0 else pg)  # dual clip, clip_ratio_c = 3
    assert float(ours) == pytest.approx(sum(terms) / len(terms), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name, section, message", [
    ("entropy_adv", {"alpha": -1}, "algorithm.entropy_adv.alpha must be >= 0"),
    ("entropy_adv", {"kappa": 1.0}, "algorithm.entropy_adv.kappa must be > 1"),
    ("entropy_adv", {"rho": 0.2}, "unknown key.*algorithm.entropy_adv.rho"),
    ("top_entropy", {"rho": 0}, r"algorithm.top_entropy.rho must be in \(0, 1\]"),
    ("top_entropy", {"rho": "high"}, "algorithm.top_entropy.rho must be a number"),
])
def test_bad_keys_name_the_setting(name, section, message):
    register_baselines()
    with pytest.raises(ValueError, match=message):
        signals.SIGNALS[name].parse({name: section})


def test_estimator_without_the_driver_hand_over_names_bypass_mode():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    register_baselines()
    with pytest.raises(RuntimeError, match="bypass_mode"):
        get_adv_estimator_fn("entropy_adv")(token_level_rewards=torch.zeros(2, 3), response_mask=torch.ones(2, 3),
                                            index=np.array(["a", "a"]), config=OmegaConf.create({}))


# HAPO (this package's reading of the abstract)

def hapo_reference(a, entropies, lam_pos, lam_neg, beta):
    """One response: A * ((1 - lam_s) + lam_s * c_t / mean(c)), c = H ** beta, over its tokens."""
    lam = lam_pos if a > 0 else lam_neg
    caps = [h ** beta for h in entropies]
    mean = sum(caps) / len(caps) if caps else 0.0
    return [a * ((1 - lam) + lam * (c / mean if mean > 0 else 1.0)) for c in caps]


def run_hapo(rewards, mask, uids, entropy, section):
    adv, handoff = run_estimator("hapo", rewards, mask, uids, entropy, section)
    return adv, handoff["metrics"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("section", [{}, {"lam_pos": 0.8, "lam_neg": 0.2, "beta": 2.0}, {"lam_pos": 1.0,
                                                                                         "lam_neg": 0.0}])
def test_hapo_estimator_matches_the_equation(seed, section):
    rewards, mask, uids, scores, H = random_batch(seed, deterministic_row=True)
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
    rewards, mask, uids, scores, H = random_batch(4, deterministic_row=True)
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
