"""`top_entropy`: the policy-gradient loss on the top-rho high-entropy response tokens only.

Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for LLM
Reasoning" (arXiv 2506.01939): with M the response tokens of a batch and B_rho the ceil(rho |M|)
of them with the highest entropy H_t (rho = 0.2),

    J(theta) = 1/|B_rho| * sum_{t in B_rho} min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t).

Official code (Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR, verl fork, 6f5dda6):
`core_algos.get_global_entropy_top_mask` takes top_k = int(|M| * rho + 0.9999) tokens of the
micro-batch by the update pass's entropy, and `compute_policy_loss_vanilla` aggregates the loss
with the mask `response_mask * entropy_top_mask`: under `loss_agg_mode=token-mean` a mean over the
*selected* tokens only.

verl 0.9.1's token-mean divides the summed loss of a mini-batch by all its response tokens
(`batch_num_tokens`, every DP rank's). Zeroing the other tokens' advantages alone would therefore
scale the loss by |B_rho| / |M| (~rho) against the official one. This estimator zeroes them and
multiplies the selected tokens' advantages by |M| / |B_rho|: every term of verl's clipped loss is
linear in A_t (both clip branches and the dual clip), so the loss verl computes is exactly the
official mean over the selected tokens when a step is one mini-batch on one rank (the official
code, Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR @ 6f5dda6, core_algos.py:1007 and dp_actor.py:434,
takes that mean per micro-batch and weights the micro-batches by their sequences), and that mean
in expectation over mini-batches otherwise (`algorithm.top_entropy.renormalize=false` keeps verl's
token-mean over all tokens instead).

Why an estimator and not a policy loss: verl registers policy losses too, but 0.9.1's `ppo_loss`
does not pass the token entropy to them, so a loss would need one more patch of verl; the
estimator reads the old policy's entropy that verl's old-log-prob pass already writes. Two
differences from the official code follow, both stated: the selection is over the whole step's
batch (the paper's "batch") rather than each GPU's micro-batch (which depends on micro-batch size
and GPU count), and it uses the old policy's entropy (the update's own on the first update; with
several mini-batches per step the official code re-reads it after each). Other
`loss_agg_mode`s keep their own normalisation over all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shear_verl.baselines.common import entropy_step, missing_entropy_help, parse_section
from shear_verl.integration import signals
from shear_verl.integration.balance import PAD_UID_PREFIX
from shear_verl.integration.fields import ENTROPY_KEY

NAME = "top_entropy"


@dataclass(frozen=True)
class TopEntropySettings:
    """`algorithm.top_entropy.*`."""

    rho: float = 0.2  # share of the batch's response tokens that keep their gradient (the paper's 20 %)
    renormalize: bool = True  # mean over the selected tokens (official) instead of over all tokens

    def __post_init__(self):
        if not 0 < self.rho <= 1:
            raise ValueError(f"algorithm.top_entropy.rho must be in (0, 1], got {self.rho}")


def top_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, rho: float) -> torch.Tensor:
    """The ceil(rho * |M|) response tokens of highest entropy, as the official code counts them. [B, T] bool"""
    mask = response_mask.bool()
    pool = entropy[mask]  # [|M|]
    out = torch.zeros_like(mask)
    if pool.numel() == 0:
        return out
    k = max(1, int(pool.numel() * rho + 0.9999))  # the official ceil
    chosen = torch.zeros_like(pool, dtype=torch.bool)
    chosen[torch.topk(pool, k).indices] = True
    out[mask] = chosen
    return out


def compute_top_entropy_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                  index: np.ndarray | None = None, config=None, epsilon: float = 1e-6,
                                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO advantages on the top-rho entropy tokens of the step (rescaled), 0 on the others."""
    found, settings, grpo, entropy = entropy_step(NAME, TopEntropySettings, token_level_rewards, response_mask, index, config,
                                                  epsilon)
    entropy = entropy.to(torch.float32)  # [B, T]
    real = torch.tensor([not str(u).startswith(PAD_UID_PREFIX) for u in index], device=grpo.device)  # [B]
    pool = response_mask.bool() & real[:, None]  # verl's padding rows never take part
    top = top_entropy_mask(entropy, pool, settings.rho)  # [B, T]
    scale = pool.sum() / top.sum().clamp_min(1) if settings.renormalize else torch.ones((), device=grpo.device)
    advantages = grpo * top.to(grpo.dtype) * scale.to(grpo.dtype)
    kept = top.sum().clamp_min(1)
    found.handoff["metrics"] = {
        f"{NAME}/selected_frac": float(top.sum() / pool.sum().clamp_min(1)),
        f"{NAME}/entropy_threshold": float(entropy[top].min()) if top.any() else 0.0,
        f"{NAME}/entropy_mean_selected": float(entropy[top].sum() / kept),
        f"{NAME}/entropy_mean": float(entropy[pool].mean()) if pool.any() else 0.0,
        f"{NAME}/adv_scale": float(scale),
    }
    return advantages, advantages


SIGNAL = signals.TokenSignal(
    name=NAME, fields=(ENTROPY_KEY,), parse=lambda algorithm: parse_section(algorithm, NAME, TopEntropySettings),
    missing_help=missing_entropy_help(NAME),
)
ESTIMATOR = compute_top_entropy_advantage
