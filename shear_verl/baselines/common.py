"""What the token-signal baselines share: their `algorithm.<name>.*` parser, verl's GRPO advantage, and
the entropy handed over by the driver."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from shear_verl.integration import signals
from shear_verl.integration.fields import ENTROPY_KEY
from shear_verl.integration.settings import _plain


def parse_section(algorithm_cfg: Any, name: str, cls: type) -> Any:
    """``algorithm.<name>.*`` as the frozen dataclass ``cls`` (its defaults are the paper's).

    Unknown keys and non-numeric values raise ValueError naming the setting; ``cls.__post_init__``
    checks ranges.
    """
    section = {}
    if algorithm_cfg is not None and name in algorithm_cfg and algorithm_cfg[name] is not None:
        section = {str(k): _plain(v) for k, v in dict(algorithm_cfg[name]).items()}
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'algorithm.{name}.{k}' for k in unknown)}; "
                         f"algorithm.{name} takes {', '.join(sorted(known))}")
    for key, value in section.items():
        default = known[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"algorithm.{name}.{key} must be true/false, got {value!r}")
        elif isinstance(default, int | float) and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise ValueError(f"algorithm.{name}.{key} must be a number, got {value!r}")
    return cls(**{k: (float(v) if isinstance(known[k].default, float) else v) for k, v in section.items()})


def grpo_advantages(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                    config, epsilon: float = 1e-6) -> torch.Tensor:
    """verl's own GRPO outcome advantage (honours ``norm_adv_by_std_in_grpo``). [B, T]"""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    norm_by_std = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    adv, _ = compute_grpo_outcome_advantage(token_level_rewards=token_level_rewards, response_mask=response_mask,
                                            index=index, epsilon=epsilon, norm_adv_by_std_in_grpo=norm_by_std)
    return adv


def missing_entropy_help(name: str) -> str:
    return (f"algorithm.adv_estimator={name} found no `entropy` for this batch. verl's V1 old-log-prob pass "
            "writes it (trainer_base._compute_old_log_prob, calculate_entropy=True); check that "
            "algorithm.rollout_correction.bypass_mode is false (bypass skips that pass), trainer.use_v1=true, "
            "and that shear-verl's plugin loads in the trainer process (`python -c 'import verl, "
            "shear_verl.plugin as p; print(p.status())'`).")


def entropy_step(name: str, cls: type, token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                 index: np.ndarray | None, config, epsilon: float):
    """The entropy baselines' common start: the driver's hand-over (refused with a clear message when
    verl wrote no entropy), the ``algorithm.<name>.*`` settings, verl's GRPO advantage [B, T] and the
    old policy's entropy [B, T] on the advantage's device (in its own dtype)."""
    found = signals.current(name, index, response_mask, missing_entropy_help(name), token_keys=(ENTROPY_KEY,))
    settings = parse_section(config, name, cls)
    grpo = grpo_advantages(token_level_rewards, response_mask, index, config, epsilon)  # [B, T]
    entropy = found.payload[ENTROPY_KEY].to(device=grpo.device)  # [B, T]
    return found, settings, grpo, entropy
