"""PRM baselines: PURE's step segmentation, min-form credit and full `pure` advantages, `prm_reshape`,
against references written here from the paper's equations (arXiv 2504.15275) and from the official
code's formula (CJReinforce/PURE, branch `verl` @ 83f9869, transcribed below with its lines)."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from shear_verl.baselines import prm, register_baselines
from shear_verl.baselines.prm import STEP_ENDS_KEY, STEP_SCORES_KEY
from shear_verl.baselines.prm_reshape import reshape_advantages
from shear_verl.baselines.pure import PureSettings, min_form_step_rewards
from shear_verl.integration import signals


# ----------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def tok():
    """The tiny policy tokenizer plus two tokens that end with a blank line (one of them merged text)."""
    from shear_verl.tiny.assets import TinySpec, build_tokenizer

    t = build_tokenizer(TinySpec())
    t.add_tokens(["\n\n", "x.\n\n"])
    return t


def ids(tok, *pieces):
    out = []
    for p in pieces:
        out += [tok.eos_token_id] if p == "EOS" else tok.encode(p, add_special_tokens=False)
    return out


def test_split_tokens_are_those_ending_with_a_blank_line(tok):
    split = set(prm.split_token_ids(tok).tolist())
    assert split == {i for i in range(len(tok)) if tok.decode([i]).endswith("\n\n")}
    assert {tok.convert_tokens_to_ids("\n\n"), tok.convert_tokens_to_ids("x.\n\n")} <= split


@pytest.mark.parametrize("pieces, expect_steps", [
    (("ab", "cd", "EOS"), ["abcd"]),  # no blank line: one step, ending at EOS
    (("ab", "\n\n", "cd", "\n\n", "\n\n", "EOS"), ["ab", "cd", "", ""]),  # trailing blank lines, EOS alone
    (("\n\n", "ab", "EOS"), ["", "ab"]),  # a step of one token (a blank line first)
    (("ab", "x.\n\n", "cd"), ["abx.", "cd"]),  # truncated (no EOS): the last step ends at the last token
    (("ab", "\n\n", "cd", "\n\n"), ["ab", "cd"]),  # truncated right after a blank line: no empty extra step
])
def test_step_ends_and_texts(tok, pieces, expect_steps):
    response = ids(tok, *pieces)
    padded = torch.tensor(response + [tok.pad_token_id] * 3)  # [T]
    split = prm.split_token_ids(tok)
    ends = prm.step_ends(padded, len(response), split)
    reference = [j for j, t in enumerate(response) if tok.decode([t]).endswith("\n\n")]
    if not reference or reference[-1] != len(response) - 1:
        reference.append(len(response) - 1)
    assert ends == reference
    assert prm.step_texts(tok, padded, ends) == expect_steps


def test_empty_response_has_no_steps(tok):
    assert prm.step_ends(torch.tensor([tok.pad_token_id] * 4), 0, prm.split_token_ids(tok)) == []


def test_back_fill_and_at_ends():
    assert prm.back_fill([0.5, -1.0], [1, 4], 6).tolist() == [0.5, 0.5, -1.0, -1.0, -1.0, 0.0]
    assert prm.at_ends([0.5, -1.0], [1, 4], 6).tolist() == [0.0, 0.5, 0.0, 0.0, -1.0, 0.0]


def test_pooling_rows_give_p_pos_minus_p_neg_at_the_separators():
    sep = 9
    input_ids = [1, 2, sep, 3, sep]
    every = [[0.5, 0.5], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]
    assert prm.scores_from_pooling(every, input_ids, sep, 2) == pytest.approx([0.6, -0.8])
    assert prm.scores_from_pooling([[0.2, 0.8], [0.9, 0.1]], input_ids, sep, 2) == pytest.approx([0.6, -0.8])
    with pytest.raises(prm.PRMError, match="2 step separators for 3 steps"):
        prm.scores_from_pooling(every, input_ids, sep, 3)
    with pytest.raises(prm.PRMError, match="expected 2 probabilities"):
        prm.scores_from_pooling([[0.8], [0.1]], input_ids, sep, 2)


# ----------------------------------------------------------------------------- min-form credit
def test_min_form_step_rewards_is_the_papers_softmax_weighting():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        r = torch.rand(6, generator=g) * 2 - 1  # [K], mixed signs
        T = 0.1
        z = sum(math.exp(-float(x) / T) for x in r)
        reference = [math.exp(-float(x) / T) / z * float(x) for x in r]
        assert min_form_step_rewards(r, T).tolist() == pytest.approx(reference, rel=1e-5, abs=1e-7)
    # T -> 0: the weighted sum is the minimum (the min-form return of the first step)
    r = torch.tensor([0.3, -0.4, 0.9, -0.1], dtype=torch.float64)
    assert float(min_form_step_rewards(r, 1e-3).sum()) == pytest.approx(-0.4, abs=1e-6)
    assert min_form_step_rewards(torch.zeros(0), 0.1).numel() == 0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        min_form_step_rewards(r, 0.0)


# The official code, transcribed (CJReinforce/PURE@83f9869, branch verl), for the same inputs:
def official_rm_score(rm_score, reward_mask, temperature):
    """verl/workers/fsdp_workers.py l. 1527-1537 (rm_score already p_pos - p_neg, times reward_mask)."""
    weight = torch.softmax(-rm_score.masked_fill(~reward_mask, float("inf")) / temperature, dim=-1)
    rm_score = rm_score * weight
    return rm_score


def official_masked_whiten(values, mask):
    """verl/utils/torch_functional.py (masked_mean, masked_var(unbiased=True), masked_whiten)."""
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def official_rloo(token_level_rewards, eos_mask, index, adv_norm, return_aggregate_method):
    """verl/trainer/ppo/core_algos.py l. 201-256 (compute_rloo_outcome_advantage)."""
    response_length = token_level_rewards.shape[-1]
    if return_aggregate_method == "sum":
        returns = (token_level_rewards * eos_mask).fliplr().cumsum(dim=-1).fliplr() * eos_mask
    else:
        returns = token_level_rewards * eos_mask
        for col in range(response_length - 2, -1, -1):
            returns[:, col] = torch.min(returns[:, col], returns[:, col + 1])
    id2return, id2sum = {}, {}
    bsz = returns.shape[0]
    for i in range(bsz):
        id2return.setdefault(index[i], []).append(returns[i].sum())
    for idx in id2return:
        id2sum[idx] = torch.sum(torch.tensor(id2return[idx]))
    for i in range(bsz):
        response_num = len(id2return[index[i]])
        token_level_baseline = (id2sum[index[i]] - returns[i].sum()) / ((response_num - 1) * response_length)
        returns[i] -= token_level_baseline
    returns *= eos_mask
    advantages = returns.clone()
    if adv_norm:
        advantages = official_masked_whiten(advantages, eos_mask)
        advantages *= eos_mask
    return advantages, returns


def official_pure(verifiable, rm_dense, reward_mask, eos_mask, index, credit_assignment, vr_coef=1.0, adv_norm=True):
    """ray_trainer.py l. 520-526 (credit_assignment -> aggregate) and l. 1087-1096 (the combination)."""
    if credit_assignment != "strict min-form":
        rm_dense = official_rm_score(rm_dense, reward_mask, credit_assignment)
    aggregate = "min" if credit_assignment == "strict min-form" else "sum"
    token_level_scores = verifiable * vr_coef + rm_dense
    return official_rloo(token_level_scores, eos_mask.float(), index, adv_norm, aggregate)


def paper_pure(scores, lengths, ends, steps, uids, T, width, temperature, strict, coef, norm):
    """From the paper's equations, as plain loops: G_t = sum_{k >= k(t)} w_k r_k (+ coef * verifiable at the
    last token), RLOO baseline per token, whitening over response tokens. strict: G_t = the minimum of the
    token scores from t on, with the official code's zeros (tokens ending no step, and the padding)."""
    B = len(scores)
    tok = [[0.0] * T for _ in range(B)]
    for i in range(B):
        r = steps[i]
        if not strict:
            z = sum(math.exp(-x / temperature) for x in r)
            r = [math.exp(-x / temperature) / z * x for x in r]
        for e, v in zip(ends[i], r):
            tok[i][e] += v
        tok[i][lengths[i] - 1] += coef * scores[i]
    G = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(lengths[i]):
            later = tok[i][t:lengths[i]] + ([0.0] if lengths[i] < T else [])  # strict: padding zeros count
            G[i][t] = min(later) if strict else sum(tok[i][t:lengths[i]])
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        others = [j for j in range(B) if uids[j] == uids[i] and j != i]
        b = sum(sum(G[j]) for j in others) / (len(others) * width)
        for t in range(lengths[i]):
            adv[i][t] = G[i][t] - b
    if norm:
        vals = [adv[i][t] for i in range(B) for t in range(lengths[i])]
        m = sum(vals) / len(vals)
        var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
        adv = [[(adv[i][t] - m) / math.sqrt(var + 1e-8) if t < lengths[i] else 0.0 for t in range(T)]
               for i in range(B)]
    return torch.tensor(adv)


def random_prm_batch(seed, groups=3, size=4, T=10):
    g = torch.Generator().manual_seed(seed)
    B = groups * size
    uids = np.array([f"g{i // size}" for i in range(B)], dtype=object)
    scores = torch.randint(0, 2, (B,), generator=g).float()
    lengths = torch.randint(2, T + 1, (B,), generator=g).tolist()
    lengths[0] = T  # one response fills the width
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()  # [B, T]
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), torch.tensor(lengths) - 1] = scores
    ends, steps = [], []
    for i in range(B):
        inner = sorted(set(torch.randint(0, lengths[i] - 1, (int(torch.randint(0, 4, (1,), generator=g)),),
                                         generator=g).tolist()))
        e = [*inner, lengths[i] - 1]
        ends.append(e)
        steps.append((torch.rand(len(e), generator=g) * 2 - 1).tolist())  # p_pos - p_neg in [-1, 1]
    return rewards, mask, uids, scores.tolist(), lengths, ends, steps


def run(name, rewards, mask, uids, ends, steps, section):
    register_baselines()
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    config = OmegaConf.create({"norm_adv_by_std_in_grpo": True, name: section})
    payload = {STEP_ENDS_KEY: ends, STEP_SCORES_KEY: steps}
    with signals.pending(name, payload, list(uids)) as handoff:
        adv, ret = get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=mask, index=uids,
                                              config=config)
    return adv, ret, handoff


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("section", [{}, {"temperature": 0.5, "verifiable_reward_coef": 2.0},
                                     {"strict_min": True}, {"adv_norm": False}])
def test_pure_advantages_match_the_official_code_and_the_papers_equations(seed, section):
    rewards, mask, uids, scores, lengths, ends, steps = random_prm_batch(seed)
    s = PureSettings(**section)
    adv, _, handoff = run("pure", rewards, mask, uids, ends, steps, section)
    B, T = mask.shape
    rm_dense = torch.stack([prm.at_ends(st, e, T) for st, e in zip(steps, ends)])  # [B, T]
    reward_mask = rm_dense != 0
    official, _ = official_pure(rewards, rm_dense, reward_mask, mask.bool(), list(uids),
                                "strict min-form" if s.strict_min else s.temperature,
                                s.verifiable_reward_coef, s.adv_norm)
    torch.testing.assert_close(adv, official, rtol=1e-5, atol=1e-5)
    paper = paper_pure(scores, lengths, ends, steps, list(uids), T, T, s.temperature, s.strict_min,
                       s.verifiable_reward_coef, s.adv_norm)
    torch.testing.assert_close(adv, paper, rtol=1e-4, atol=1e-4)
    assert handoff["metrics"]["pure/num_steps_mean"] == pytest.approx(np.mean([len(e) for e in ends]))


def test_pure_baseline_width_is_the_official_padded_length():
    rewards, mask, uids, scores, lengths, ends, steps = random_prm_batch(3)
    adv, _, _ = run("pure", rewards, mask, uids, ends, steps, {"baseline_width": 16, "adv_norm": False})
    paper = paper_pure(scores, lengths, ends, steps, list(uids), mask.shape[1], 16, 0.1, False, 1.0, False)
    torch.testing.assert_close(adv, paper, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, coef", [("add", 1.0), ("add", 0.3), ("scale", 0.5)])
def test_prm_reshape_is_grpo_reshaped_by_the_back_filled_step_scores(mode, coef):
    rewards, mask, uids, scores, lengths, ends, steps = random_prm_batch(4)
    adv, _, handoff = run("prm_reshape", rewards, mask, uids, ends, steps, {"mode": mode, "coef": coef})
    B, T = mask.shape
    expect = torch.zeros(B, T)
    for i in range(B):
        group = [scores[j] for j in range(B) if uids[j] == uids[i]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
        a = (scores[i] - mean) / (std + 1e-6)  # verl's GRPO
        start = 0
        for e, v in zip(ends[i], steps[i]):
            for t in range(start, e + 1):  # every token of the step carries its score
                expect[i, t] = a + coef * v if mode == "add" else a * (1 + coef * v)
            start = e + 1
    torch.testing.assert_close(adv, expect, rtol=1e-5, atol=1e-5)
    assert 0.0 <= handoff["metrics"]["prm_reshape/sign_flip_frac"] <= 1.0


def test_missing_or_foreign_step_scores_stop_the_step():
    rewards, mask, uids, scores, lengths, ends, steps = random_prm_batch(0)
    bad_steps = list(steps)
    bad_steps[2] = None
    with pytest.raises(RuntimeError, match="row 2 has no PRM step scores"):
        run("pure", rewards, mask, uids, ends, bad_steps, {})
    with pytest.raises(RuntimeError, match="row 2 has 1 PRM step ends but 3 step scores"):
        run("pure", rewards, mask, uids, [*ends[:2], [lengths[2] - 1], *ends[3:]],
            [*steps[:2], [0.1, 0.2, 0.3], *steps[3:]], {})
    short, short_steps = [list(e) for e in ends], list(steps)
    short[1], short_steps[1] = [0], [0.5]  # ends before the response does: another response's steps
    with pytest.raises(RuntimeError, match="row 1's PRM steps end at"):
        run("prm_reshape", rewards, mask, uids, short, short_steps, {})


def test_estimators_without_the_hand_over_name_the_reward_model_settings():
    register_baselines()
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    rewards, mask, uids, *_ = random_prm_batch(0)
    for name in ("pure", "prm_reshape"):
        with pytest.raises(RuntimeError, match="reward.reward_model.enable=true.*PRMRewardManager"):
            get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=mask, index=uids,
                                       config=OmegaConf.create({}))


def test_reshape_modes_keep_masks():
    A = torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]])
    s = torch.tensor([[0.5, -1.0, 0.3], [0.5, 0.5, -0.5]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert reshape_advantages(A, s, m, "add", 1.0).tolist() == [[1.5, 0.0, 0.0], [-1.5, -1.5, -2.5]]
    assert reshape_advantages(A, s, m, "scale", 0.5).tolist() == [[1.25, 0.5, 0.0], [-2.5, -2.5, -1.5]]
