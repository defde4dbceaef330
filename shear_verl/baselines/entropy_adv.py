"""`entropy_adv`: GRPO advantages plus a clipped, gradient-detached entropy bonus.

Cheng et al. 2025, "Reasoning with Exploration: An Entropy Perspective" (arXiv 2506.14758), eq. of
the entropy-based advantage:

    psi(H_t) = min(alpha * H_t.detach(), |A_t| / kappa),        A_t^shaped = A_t + psi(H_t)

H_t is the policy's token entropy; the clip |A_t| / kappa (kappa > 1) keeps the bonus below the
advantage's own magnitude, so no token's advantage changes sign and a zero-advantage group (all
rollouts alike) gets none. Here H_t is the old policy's entropy that verl's V1 old-log-prob pass
writes (`entropy`, at the rollout temperature): the entropy of the policy being updated on the
first update of a step, and on every update with one mini-batch and one epoch per step (on-policy);
with several mini-batches the later ones use the step's starting policy's entropy.

Defaults alpha = 0.4, kappa = 2: the paper's GRPO values (arXiv 2506.14758v4, Sec. 4, "RL Training
Configuration": "We fix kappa to 2 throughout all experiments, and set alpha to 0.4 for GRPO and 0.1
for PPO"). The paper takes H_t in the update pass, with 16 updates per rollout (its Table 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shear_verl.baselines.common import entropy_step, missing_entropy_help, parse_section
from shear_verl.integration import signals
from shear_verl.integration.fields import ENTROPY_KEY

NAME = "entropy_adv"


@dataclass(frozen=True)
class EntropyAdvSettings:
    """`algorithm.entropy_adv.*`."""

    alpha: float = 0.4  # scale of the entropy bonus (see the module docstring for the source)
    kappa: float = 2.0  # the bonus is at most |A_t| / kappa

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError(f"algorithm.entropy_adv.alpha must be >= 0, got {self.alpha}")
        if self.kappa <= 1:
            raise ValueError(f"algorithm.entropy_adv.kappa must be > 1 (the bound |A|/kappa then keeps every "
                             f"advantage's sign), got {self.kappa}")


def shape_advantages(advantages: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor,
                     alpha: float = 0.4, kappa: float = 2.0) -> torch.Tensor:
    """A_t + min(alpha * H_t.detach(), |A_t| / kappa) on response tokens, 0 elsewhere. All [B, T]."""
    bonus = torch.minimum(alpha * entropy.detach().to(advantages.dtype), advantages.abs() / kappa)  # [B, T]
    return (advantages + bonus) * response_mask.to(advantages.dtype)


def compute_entropy_adv_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                  index: np.ndarray | None = None, config=None, epsilon: float = 1e-6,
                                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO advantages, shaped by the old policy's entropy (the driver hands it over)."""
    found, settings, grpo, entropy = entropy_step(NAME, EntropyAdvSettings, token_level_rewards, response_mask, index, config,
                                                  epsilon)
    entropy = entropy.to(grpo.dtype)  # [B, T]
    shaped = shape_advantages(grpo, entropy, response_mask, settings.alpha, settings.kappa)
    found.handoff["metrics"] = entropy_adv_metrics(grpo, entropy, response_mask, settings)
    return shaped, shaped


def entropy_adv_metrics(grpo: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor,
                        s: EntropyAdvSettings) -> dict[str, float]:
    """`entropy_adv/*`: the mean entropy and bonus over response tokens, and how often the clip binds."""
    tok = response_mask.bool() & (grpo != 0)  # tokens that can take a bonus
    mask = response_mask.bool()
    raw = s.alpha * entropy
    bonus = torch.minimum(raw, grpo.abs() / s.kappa)
    mean = lambda x, m: float(x[m].mean()) if m.any() else 0.0  # noqa: E731
    return {
        f"{NAME}/entropy_mean": mean(entropy, mask),
        f"{NAME}/bonus_mean": mean(bonus, tok),
        f"{NAME}/clip_frac": mean((raw > grpo.abs() / s.kappa).float(), tok),
        f"{NAME}/bonus_to_adv": mean(bonus / grpo.abs().clamp_min(1e-12), tok),
    }


SIGNAL = signals.TokenSignal(
    name=NAME, fields=(ENTROPY_KEY,), parse=lambda algorithm: parse_section(algorithm, NAME, EntropyAdvSettings),
    missing_help=missing_entropy_help(NAME),
)
ESTIMATOR = compute_entropy_adv_advantage
