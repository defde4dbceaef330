"""`hapo`: GRPO advantages reallocated within each response towards its high-entropy tokens.

He et al. 2026, "Rethinking Token-Level Credit Assignment in RLVR: A Polarity-Entropy Analysis"
(arXiv 2604.11056; v2: "Where Hindsight Credit Can Reside: A Signed-Capacity View of Token
Updates in RLVR"), Hindsight-Aware Policy Optimization (HAPO; v1 calls it EAPO).

A READING OF THE ABSTRACT, NOT A REPRODUCTION: only the abstract was public to this session (the
search tool returned no method section or code). What the abstract states: the credit a token can
carry is upper-bounded by its entropy (conditional mutual information), so entropy is a
*capacity*, not a direction; GRPO's uniform broadcast "dilutes signal at high-entropy positions
while over-crediting deterministic tokens"; HAPO is "a sign-preserving modification to GRPO that
performs capacity-guided advantage reallocation", with distinct roles for positive and negative
updates (reward polarity). The reading implemented here, for response i with GRPO advantage A_i,
old-policy entropy H_t and response tokens o_i:

    c_t = H_t ** beta                                              (capacity)
    w_t = (1 - lam_s) + lam_s * c_t / mean_{u in o_i} c_u,         s = sign(A_i)   (lam_+, lam_-)
    A_t^HAPO = A_i * w_t

w_t >= 1 - lam_s >= 0, so no token's advantage changes sign ("sign-preserving"); mean_{o_i} w = 1,
so each response keeps GRPO's advantage mass sum_t A_t = |o_i| A_i and only its distribution over
tokens moves ("reallocation"), from low- to high-entropy tokens ("capacity-guided"). A response
whose entropy is 0 on every token keeps GRPO's uniform advantage. The open choices are keys:
lam_pos / lam_neg (how much of the mass is reallocated, per polarity; 0 is GRPO), beta (how
sharply capacity concentrates it). The defaults (0.5, 0.5, 1) are this reading's, not the paper's.
H_t is the old policy's entropy verl's V1 old-log-prob pass writes (as in entropy_adv).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shear_verl.baselines.common import entropy_step, missing_entropy_help, parse_section
from shear_verl.integration import signals
from shear_verl.integration.fields import ENTROPY_KEY

NAME = "hapo"


@dataclass(frozen=True)
class HapoSettings:
    """`algorithm.hapo.*` (defaults of this reading of the abstract, see the module docstring)."""

    lam_pos: float = 0.5  # share of a positive response's advantage mass reallocated by capacity
    lam_neg: float = 0.5  # the same for negative responses
    beta: float = 1.0  # capacity exponent: c_t = H_t ** beta

    def __post_init__(self):
        for key in ("lam_pos", "lam_neg"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise ValueError(f"algorithm.hapo.{key} must be in [0, 1] (above 1 a token's advantage can change "
                                 f"sign), got {value}")
        if self.beta <= 0:
            raise ValueError(f"algorithm.hapo.beta must be > 0, got {self.beta}")


def capacity_weights(advantages: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor,
                     lam_pos: float = 0.5, lam_neg: float = 0.5, beta: float = 1.0) -> torch.Tensor:
    """w_t = (1 - lam_s) + lam_s * c_t / mean_{o_i} c, c = H ** beta, s = sign of the row's advantage.

    All [B, T]; 0 off the response tokens; 1 on rows whose capacity is 0 everywhere.
    """
    mask = response_mask.to(torch.float32)  # [B, T]
    cap = entropy.detach().to(torch.float32).clamp_min(0) ** beta * mask  # [B, T]
    mean = cap.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    ratio = torch.where(mean > 0, cap / mean.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(cap))
    positive = ((advantages * response_mask).sum(-1, keepdim=True) > 0)  # [B, 1] the row's polarity
    lam = torch.where(positive, cap.new_tensor(lam_pos), cap.new_tensor(lam_neg))  # [B, 1]
    return ((1 - lam) + lam * ratio) * mask


def compute_hapo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                           index: np.ndarray | None = None, config=None, epsilon: float = 1e-6,
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO advantages, reallocated within each response by the old policy's entropy."""
    found, s, grpo, entropy = entropy_step(NAME, HapoSettings, token_level_rewards, response_mask, index, config,
                                           epsilon)
    weights = capacity_weights(grpo, entropy, response_mask, s.lam_pos, s.lam_neg, s.beta)  # [B, T]
    advantages = grpo * weights.to(grpo.dtype)
    found.handoff["metrics"] = hapo_metrics(grpo, advantages, weights, entropy, response_mask)
    return advantages, advantages


def hapo_metrics(grpo, advantages, weights, entropy, response_mask) -> dict[str, float]:
    """`hapo/*`: mean entropy, the weights' range on rows with a nonzero advantage, the share of
    GRPO's |A| mass moved between tokens, and the largest per-row change of the mass (should be ~0)."""
    mask = response_mask.bool()
    active = mask & (grpo != 0)  # [B, T]
    total = grpo.abs()[active].sum().clamp_min(1e-12)
    row_mass = lambda a: (a * response_mask).sum(-1)  # noqa: E731
    scale = row_mass(grpo.abs()).clamp_min(1e-12)
    return {
        f"{NAME}/entropy_mean": float(entropy.float()[mask].mean()) if mask.any() else 0.0,
        f"{NAME}/weight_max": float(weights[active].max()) if active.any() else 1.0,
        f"{NAME}/weight_min": float(weights[active].min()) if active.any() else 1.0,
        f"{NAME}/moved_mass_frac": float(0.5 * (advantages - grpo).abs()[active].sum() / total),
        f"{NAME}/mass_rel_error": float(((row_mass(advantages) - row_mass(grpo)).abs() / scale).max())
        if len(grpo) else 0.0,
    }


SIGNAL = signals.TokenSignal(
    name=NAME, fields=(ENTROPY_KEY,), parse=lambda algorithm: parse_section(algorithm, NAME, HapoSettings),
    missing_help=missing_entropy_help(NAME),
)
ESTIMATOR = compute_hapo_advantage
