"""The `shear` advantage estimator (Algorithm 1, line 17: A_t^(i) = A_i * w_t^(i)).

The per-token weights computed on the workers reach it as a token signal (signals.py): the
driver's `_compute_advantage` wrapper opens `signals.pending("shear", {"weights": ...})` around
verl's own advantage step; the estimator hands the GRPO advantages it scaled back through the
same handle (for the credit dumps and the fallback metric).
"""

from __future__ import annotations

import numpy as np
import torch

from shear_verl.core import shear_advantages
from shear_verl.integration import signals
from shear_verl.integration.settings import ESTIMATOR_NAME

MISSING_WEIGHTS_HELP = (
    "algorithm.adv_estimator=shear found no SHEAR token weights for this batch. They are computed "
    "by the actor workers during the old-log-prob pass and handed over by shear-verl's trainer "
    "hooks. Check that (1) shear-verl is installed in the environment of every Ray process (its "
    "`verl.plugins` entry point must load: `python -c 'import verl, shear_verl.plugin as p; "
    "print(p.status())'`), (2) algorithm.rollout_correction.bypass_mode is false (bypass skips "
    "the old-log-prob pass), (3) the trainer is verl's V1 trainer (trainer.use_v1=true) and the "
    "actor engine is FSDP (model_engine=dp) or Megatron."
)


def compute_shear_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config=None,
    epsilon: float = 1e-6,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages exactly as verl computes them, scaled per token by the SHEAR weights.

    Args:
        token_level_rewards: [B, T] outcome rewards (verl's `token_level_rewards`).
        response_mask: [B, T].
        index: [B] uid of each row (GRPO groups).
        config: `config.algorithm`; honours `norm_adv_by_std_in_grpo` like verl's GRPO.
    Returns:
        (advantages, returns), both [B, T]; returns == advantages as in verl's GRPO.
    """
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    found = signals.current(ESTIMATOR_NAME, index, response_mask, MISSING_WEIGHTS_HELP, token_keys=("weights",))
    weights, handoff = found.payload["weights"], found.handoff

    norm_by_std = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    grpo_adv, _ = compute_grpo_outcome_advantage(  # [B, T]
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_by_std,
    )
    weights = weights.to(device=grpo_adv.device, dtype=grpo_adv.dtype)
    advantages = shear_advantages(grpo_adv, weights) * response_mask  # [B, T]
    handoff["grpo_advantages"] = grpo_adv
    return advantages, advantages


def register_estimator() -> None:
    """Register `shear` and its token signal with verl (idempotent: same function object every time)."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    from shear_verl.integration.driver import SHEAR_SIGNAL

    signals.register_signal(SHEAR_SIGNAL)
    if ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is compute_shear_outcome_advantage:
        return
    register_adv_est(ESTIMATOR_NAME)(compute_shear_outcome_advantage)
