"""`pure`: PURE's min-form credit assignment of process rewards (Cheng et al. 2025, arXiv 2504.15275).

The paper's min-form return of a token in step k is the minimum of the remaining step rewards,
G_t = min_{k' >= k} r_{k'}, instead of their sum. Its differentiable approximation re-weights the
step rewards of a response by a softmax of their negatives at temperature T before the usual
sum-to-go:

    w_k = exp(-r_k / T) / sum_j exp(-r_j / T),       r_k' = w_k * r_k,       G_t = sum_{k' >= k} r_{k'}'

(T -> 0: the sum becomes the minimum). Transcribed from the official code (CJReinforce/PURE,
branch ``verl`` @ 83f9869), each step as it does:

1. step rewards r_k = p_pos - p_neg of the PRM at step k's last token (prm.py), weighted as above
   (verl/workers/fsdp_workers.py l. 1525-1537; T = ``reward_model.credit_assignment``, 0.1 by
   default, l. 1206-1211); ``strict_min=true`` ("strict min-form"): unweighted rewards, and the
   returns are a running minimum over the response instead of a sum (ray_trainer.py l. 520-526,
   core_algos.py l. 232-238: the minimum runs over every response position, the zeros of tokens that
   end no step included, as the official code does);
2. token scores: ``verifiable_reward_coef`` x the verifiable reward (at the last token) + the
   weighted step rewards (ray_trainer.py l. 1087-1096; coef 1.0);
3. RLOO with the official baseline: b_i = sum_{j != i in the group} sum_t G_j[t] / ((n - 1) * T_w),
   subtracted from every token's return (core_algos.py l. 240-253; a prompt's lone rollout gets
   b = 0, as verl's own RLOO does, where the official code divides by zero; T_w is the responses' padded width:
   PURE pads to data.max_response_length, verl 0.9.1 to the batch's longest response, so
   ``baseline_width`` can set it);
4. whitening over the batch's response tokens (``adv_norm=true``, verl's masked_whiten, l. 254-256).

The PRM's step ends and scores reach this estimator as reward extra info (prm_reward.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shear_verl.baselines.common import parse_section
from shear_verl.baselines.prm import STEP_ENDS_KEY, STEP_SCORES_KEY, at_ends
from shear_verl.integration import signals

NAME = "pure"


@dataclass(frozen=True)
class PureSettings:
    """`algorithm.pure.*` (defaults: the official code's)."""

    temperature: float = 0.1  # softmax temperature of the approximate min-form
    strict_min: bool = False  # "strict min-form": running minimum, no softmax weights
    verifiable_reward_coef: float = 1.0
    adv_norm: bool = True  # whiten the advantages over the batch's response tokens
    baseline_width: int = 0  # T_w of the RLOO baseline; 0: the padded width verl hands over

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"algorithm.pure.temperature must be > 0, got {self.temperature} "
                             "(the strict minimum is algorithm.pure.strict_min=true)")
        if self.baseline_width < 0:
            raise ValueError(f"algorithm.pure.baseline_width must be >= 0, got {self.baseline_width}")


def min_form_step_rewards(step_rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(-r / T) * r over one response's steps: their sum-to-go approximates the min-form return. [K]"""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if step_rewards.numel() == 0:
        return step_rewards.clone()
    return torch.softmax(-step_rewards / temperature, dim=-1) * step_rewards


def pure_token_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, ends: list[list[int]],
                      step_scores: list[list[float]], settings: PureSettings) -> torch.Tensor:
    """Step 1-2: coef x verifiable reward + the (min-form weighted) step rewards at the step ends. [B, T]"""
    B, T = response_mask.shape
    prm = torch.zeros_like(token_level_rewards)  # [B, T]
    for i in range(B):
        r = torch.tensor(step_scores[i], dtype=prm.dtype, device=prm.device)  # [K_i]
        if not settings.strict_min:
            r = min_form_step_rewards(r, settings.temperature)
        prm[i] = at_ends(r.tolist(), ends[i], T, dtype=prm.dtype, device=prm.device)
    return (settings.verifiable_reward_coef * token_level_rewards + prm) * response_mask.to(prm.dtype)


def pure_returns(scores: torch.Tensor, response_mask: torch.Tensor, strict_min: bool) -> torch.Tensor:
    """Step 1's aggregation: sum-to-go, or (strict_min) the running minimum to the end. [B, T]"""
    mask = response_mask.to(scores.dtype)
    if not strict_min:
        return (scores * mask).flip(-1).cumsum(-1).flip(-1) * mask
    return torch.cummin((scores * mask).flip(-1), dim=-1).values.flip(-1)


def rloo_advantages(returns: torch.Tensor, response_mask: torch.Tensor, index, adv_norm: bool,
                    width: int = 0) -> torch.Tensor:
    """Steps 3-4: the official leave-one-out baseline per token, then batch whitening. [B, T]"""
    from verl.utils.torch_functional import masked_whiten

    width = width or returns.shape[-1]
    totals = returns.sum(-1)  # [B]
    groups: dict = {}
    for i, u in enumerate(index):
        groups.setdefault(u, []).append(i)
    baseline = torch.zeros_like(totals)  # [B]
    for rows in groups.values():
        if len(rows) < 2:
            continue  # a lone rollout (e.g. verl's padding rows) has no other: baseline 0, as verl's RLOO does
        group_sum = totals[rows].sum()
        baseline[rows] = (group_sum - totals[rows]) / ((len(rows) - 1) * width)
    mask = response_mask.to(returns.dtype)
    adv = (returns - baseline[:, None]) * mask
    if adv_norm:
        adv = masked_whiten(adv, response_mask.bool()) * mask
    return adv


def reward_info_rows(found: signals.Pending, name: str, response_mask: torch.Tensor) -> tuple[list, list]:
    """The PRM's step ends and scores per row, checked against the batch (no row gets a default)."""
    ends, scores = found.payload[STEP_ENDS_KEY], found.payload[STEP_SCORES_KEY]
    lengths = response_mask.sum(-1).tolist()
    for i, (e, s) in enumerate(zip(ends, scores, strict=True)):
        if e is None or s is None:
            raise RuntimeError(f"{name}: row {i} has no PRM step scores ({STEP_ENDS_KEY}={e}, {STEP_SCORES_KEY}={s})")
        if len(e) != len(s):
            raise RuntimeError(f"{name}: row {i} has {len(e)} PRM step ends but {len(s)} step scores")
        if lengths[i] > 0 and (not e or e[-1] != lengths[i] - 1):
            raise RuntimeError(f"{name}: row {i}'s PRM steps end at {e} but its response has {lengths[i]} tokens: "
                               "the reward extra info belongs to another response")
    return [list(map(int, e)) for e in ends], [list(map(float, s)) for s in scores]


def missing_prm_help(name: str) -> str:
    return (f"algorithm.adv_estimator={name} found no PRM step scores ({STEP_ENDS_KEY}/{STEP_SCORES_KEY}) in the "
            "rollouts' reward extra info: set reward.reward_model.enable=true, reward.reward_model.model_path=<PRM>, "
            "reward.reward_model.enable_resource_pool=true, reward.reward_manager.source=importlib, "
            "reward.reward_manager.module.path=<shear_verl/baselines/prm_reward.py>, "
            "reward.reward_manager.name=PRMRewardManager (recipes/run_pure_math.sh sets them)")


def compute_pure_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                           index: np.ndarray | None = None, config=None, epsilon: float = 1e-6,
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """PURE's advantages from the verifiable reward and the PRM's step scores (driver hand-over)."""
    found = signals.current(NAME, index, response_mask, missing_prm_help(NAME))
    settings = parse_section(config, NAME, PureSettings)
    ends, step_scores = reward_info_rows(found, NAME, response_mask)
    scores = pure_token_scores(token_level_rewards, response_mask, ends, step_scores, settings)  # [B, T]
    returns = pure_returns(scores, response_mask, settings.strict_min)  # [B, T]
    adv = rloo_advantages(returns, response_mask, [str(u) for u in index], settings.adv_norm,
                          settings.baseline_width)
    flat = torch.tensor([s for row in step_scores for s in row] or [0.0])
    found.handoff["metrics"] = {
        f"{NAME}/num_steps_mean": float(np.mean([len(e) for e in ends])) if ends else 0.0,
        f"{NAME}/step_score_mean": float(flat.mean()),
        f"{NAME}/step_score_min_mean": float(np.mean([min(s) for s in step_scores if s] or [0.0])),
        f"{NAME}/lone_rollouts": float(sum(1 for u in set(map(str, index)) if list(map(str, index)).count(u) == 1)),
        f"{NAME}/return_mean": float(returns[response_mask.bool()].mean()) if response_mask.any() else 0.0,
    }
    return adv, returns


SIGNAL = signals.TokenSignal(
    name=NAME, fields=(), parse=lambda algorithm: parse_section(algorithm, NAME, PureSettings),
    reward_info=(STEP_ENDS_KEY, STEP_SCORES_KEY), missing_help=missing_prm_help(NAME),
)
ESTIMATOR = compute_pure_advantage
