"""`prm_reshape`: GRPO advantages reshaped by a process reward model's step scores.

The SHEAR paper (arXiv 2604.23318, Table 1, "PRM (Reshape adv.)") names this baseline without a
formula. This is a READING, not a reproduction: every token of step k carries the step's PRM score
s_k = p_pos - p_neg in [-1, 1] (back-filled, prm.py), and the outcome advantage A (verl's GRPO) is
reshaped token by token, in the way the paper's intrinsic baseline (Entropy adv.) reshapes it with a
token signal:

    mode=add   (default):  A_t' = A + coef * s_{k(t)}
    mode=scale:            A_t' = A * (1 + coef * s_{k(t)})        (coef <= 1 keeps every sign)

``add`` is the dense-process-reward reading (outcome advantage plus a step term, as PRM-shaped
advantages are usually built); ``scale`` only redistributes credit within a response, as SHEAR's
weights do. Choose with ``algorithm.prm_reshape.mode`` / ``.coef``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shear_verl.baselines.common import grpo_advantages, parse_section
from shear_verl.baselines.prm import STEP_ENDS_KEY, STEP_SCORES_KEY, back_fill
from shear_verl.baselines.pure import missing_prm_help, reward_info_rows
from shear_verl.integration import signals

NAME = "prm_reshape"
MODES = ("add", "scale")


@dataclass(frozen=True)
class PrmReshapeSettings:
    """`algorithm.prm_reshape.*`."""

    mode: str = "add"
    coef: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"algorithm.prm_reshape.mode must be one of {MODES}, got {self.mode!r}")
        if self.coef < 0:
            raise ValueError(f"algorithm.prm_reshape.coef must be >= 0, got {self.coef}")


def reshape_advantages(advantages: torch.Tensor, step_values: torch.Tensor, response_mask: torch.Tensor,
                       mode: str = "add", coef: float = 1.0) -> torch.Tensor:
    """A' from A and the back-filled step scores (see the module docstring), 0 off the response. All [B, T]"""
    s = step_values.to(advantages.dtype)
    if mode == "add":
        out = advantages + coef * s
    elif mode == "scale":
        out = advantages * (1 + coef * s)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return out * response_mask.to(advantages.dtype)


def compute_prm_reshape_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                  index: np.ndarray | None = None, config=None, epsilon: float = 1e-6,
                                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO advantages reshaped by the PRM's back-filled step scores (driver hand-over)."""
    found = signals.current(NAME, index, response_mask, missing_prm_help(NAME))
    settings = parse_section(config, NAME, PrmReshapeSettings)
    ends, step_scores = reward_info_rows(found, NAME, response_mask)
    grpo = grpo_advantages(token_level_rewards, response_mask, index, config, epsilon)  # [B, T]
    T = response_mask.shape[-1]
    filled = torch.stack([back_fill(s, e, T, dtype=grpo.dtype, device=grpo.device)
                          for s, e in zip(step_scores, ends, strict=True)])  # [B, T]
    out = reshape_advantages(grpo, filled, response_mask, settings.mode, settings.coef)
    mask = response_mask.bool()
    found.handoff["metrics"] = {
        f"{NAME}/num_steps_mean": float(np.mean([len(e) for e in ends])) if ends else 0.0,
        f"{NAME}/step_score_mean": float(filled[mask].mean()) if mask.any() else 0.0,
        f"{NAME}/sign_flip_frac": float(((out * grpo) < 0)[mask].float().mean()) if mask.any() else 0.0,
    }
    return out, out


SIGNAL = signals.TokenSignal(
    name=NAME, fields=(), parse=lambda algorithm: parse_section(algorithm, NAME, PrmReshapeSettings),
    reward_info=(STEP_ENDS_KEY, STEP_SCORES_KEY), missing_help=missing_prm_help(NAME),
)
ESTIMATOR = compute_prm_reshape_advantage
