"""`oar_g`: GRPO advantages reshaped per reasoning token by its input-gradient outcome sensitivity.

Li et al. 2026, "Outcome-Grounded Advantage Reshaping for Fine-Grained Credit Assignment in
Mathematical Reasoning" (arXiv 2601.07408), OAR-G. For a rollout (prompt x, reasoning y_1..y_R,
answer a) with GRPO advantage A:

  1. Saliency (one backward pass w.r.t. the input embeddings e_t, not the parameters; worker side,
     shear_verl.integration.saliency):
        P_0 = the answer distribution of the clean sequence (no gradient),
        J   = KL(P_0 || P(e + xi)),  xi ~ N(0, sigma^2) on the reasoning embeddings only,
        I_t = | <dJ/de_t, e_t> |                                       (gradient x input)
  2. Bi-Level reshaping (this module, per rollout, over its R reasoning tokens):
        s_t = log(1 + I_t),  n_t = (s_t - min s) / (max s - min s)    (range 1 if all equal)
        q   = quantile_tau(n)
        w_t = max(n_t / q, w_min)                   if n_t < q         (noise suppression)
        w_t = 1 + beta (n_t - q) / (1 - q)          otherwise          (signal boosting)
        w_t <- w_t * R / sum_s w_s                                     (mass preservation)
  3. A_t = A * w_t on reasoning tokens, A on the answer tokens.

Sources. The paper's arXiv HTML (2601.07408v1) could only be read up to its abstract in this
session: the steps above are the authors' public code (Valsure/Outcome-Grounded-Advantage-
Reshaping, OAR-main.py @ 8dbc478: `calculate_token_importance_gradient`,
`calculate_oar_hybrid_weights`), which is incomplete (no trainer, no data pipeline, no argument
defaults for the quantile and the boost). Its defaults that ARE in the code: target
`answer_mean`, sigma = 1e-3, KL eps 1e-12, floor 0.1, the 1e-8 guards. `tau` = 0.5 and `beta`
= 1.0 are NOT the paper's (not found): choices of this package, to be checked against the
paper's hyper-parameter table before a comparison is reported. Open choices made configurable
(README, Baselines): the answer distribution (`target`), where the answer starts in a verl
rollout (`answer_marker`, `no_marker`), `sum_to_len`. With the noise, the saliency is random:
at sigma = 0 the KL targets have an exactly zero gradient (their minimum), so they are refused.

Engines: FSDP (1 and 2) only. Megatron is refused at start-up (actor strategy) and in its engine:
SHEAR's Megatron hooks (megatron_capture.py) capture the final norm's output, while OAR-G needs
the embedding output as a leaf and a backward through every pipeline stage -- not written, so
nothing of it is tested. Ulysses SP and fused kernels (no logits) are refused too. Cost: two
forwards and one backward per rollout, one sequence per call (docs: not measured at scale).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from shear_verl.baselines.common import grpo_advantages, parse_section
from shear_verl.integration import signals
from shear_verl.integration.fields import OAR_FLAG, OAR_REASONING_KEY, OAR_SALIENCY_KEY, OAR_STATS_KEY

NAME = "oar_g"
TARGETS = ("answer_mean", "last", "answer_joint")
NO_MARKER = ("uniform", "tail")


@dataclass(frozen=True)
class OarGSettings:
    """`algorithm.oar_g.*` (sources: module docstring)."""

    tau: float = 0.5  # quantile of the normalised saliency that splits suppression from boosting (code: threshold)
    beta: float = 1.0  # boost of the top token over 1 (code: beta)
    floor: float = 0.1  # lowest weight of a suppressed token (code: 0.1)
    sum_to_len: bool = True  # rescale a rollout's reasoning weights to sum to R (code: sum_to_L)
    target: str = "answer_mean"  # the answer distribution: mean answer logits | first answer position | answer log-lik
    noise_std: float = 1e-3  # sigma of the Gaussian noise on the reasoning embeddings (code: noise_std)
    answer_marker: str = "\\boxed"  # the answer starts at the response's last occurrence of this text
    no_marker: str = "uniform"  # rollouts without the marker: weight 1 ("uniform") or the last tail_tokens ("tail")
    tail_tokens: int = 8  # answer length under no_marker=tail
    seed: int = 0  # of the noise (per step: seed + the step's call count on the worker)

    def __post_init__(self):
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"algorithm.oar_g.tau must be in (0, 1), got {self.tau}")
        if self.beta < 0:
            raise ValueError(f"algorithm.oar_g.beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"algorithm.oar_g.floor must be in [0, 1], got {self.floor}")
        if self.target not in TARGETS:
            raise ValueError(f"algorithm.oar_g.target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.noise_std < 0 or (self.noise_std == 0 and self.target != "answer_joint"):
            raise ValueError(f"algorithm.oar_g.noise_std must be > 0 with target={self.target} (the KL to the clean "
                             f"answer distribution has a zero gradient at zero noise), got {self.noise_std}")
        if not isinstance(self.answer_marker, str):
            raise ValueError(f"algorithm.oar_g.answer_marker must be a string, got {self.answer_marker!r}")
        if self.no_marker not in NO_MARKER:
            raise ValueError(f"algorithm.oar_g.no_marker must be one of {', '.join(NO_MARKER)}, got {self.no_marker!r}")
        if not (isinstance(self.tail_tokens, int) and self.tail_tokens >= 1):
            raise ValueError(f"algorithm.oar_g.tail_tokens must be an integer >= 1, got {self.tail_tokens!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"algorithm.oar_g.seed must be an integer, got {self.seed!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> OarGSettings:
        return cls(**json.loads(text))


def bilevel_weights(saliency: torch.Tensor, reasoning: torch.Tensor, tau: float = 0.5, beta: float = 1.0,
                    floor: float = 0.1, sum_to_len: bool = True) -> torch.Tensor:
    """The Bi-Level weights w_t (module docstring, step 2) of each row's reasoning tokens; 1 elsewhere.

    saliency: [B, T] I_t >= 0; reasoning: [B, T] bool, the row's reasoning tokens. Returns [B, T].
    """
    weights = torch.ones_like(saliency, dtype=torch.float32)  # [B, T]
    for row in range(saliency.shape[0]):
        keep = reasoning[row].bool()
        if not keep.any():
            continue
        s = torch.log1p(saliency[row][keep].float())  # [R]
        span = s.max() - s.min()
        n = (s - s.min()) / (span if span > 0 else 1.0)  # [R] in [0, 1]
        q = torch.quantile(n, tau)  # linear interpolation, as numpy.quantile
        low = n < q
        w = torch.where(low, torch.clamp(n / (q + 1e-8), min=floor), 1.0 + beta * (n - q) / (1.0 - q + 1e-8))
        if sum_to_len:
            total = w.sum()
            w = w * (w.numel() / (total + 1e-8)) if total > 0 else torch.ones_like(w)
        weights[row][keep] = w
    return weights


def reshape_advantages(advantages: torch.Tensor, saliency: torch.Tensor, reasoning: torch.Tensor,
                       response_mask: torch.Tensor, tau: float = 0.5, beta: float = 1.0, floor: float = 0.1,
                       sum_to_len: bool = True) -> torch.Tensor:
    """A_t = A * w_t on reasoning tokens, A elsewhere on the response, 0 off it. All [B, T]."""
    reasoning = reasoning.bool() & response_mask.bool()
    w = bilevel_weights(saliency, reasoning, tau, beta, floor, sum_to_len).to(advantages.dtype)  # [B, T]
    return advantages * w * response_mask.to(advantages.dtype)


MISSING_HELP = (
    "algorithm.adv_estimator=oar_g found no saliency for this batch. The actor workers compute it in the "
    "old-log-prob pass (FSDP engine only) when shear-verl's plugin is loaded in every Ray process (`python -c "
    "'import verl, shear_verl.plugin as p; print(p.status())'`); check algorithm.rollout_correction.bypass_mode=false "
    "and trainer.use_v1=true."
)


def compute_oar_g_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                            index: np.ndarray | None = None, config=None, epsilon: float = 1e-6,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO advantages, reshaped by the workers' saliency (the driver hands it over)."""
    found = signals.current(NAME, index, response_mask, MISSING_HELP, token_keys=(OAR_SALIENCY_KEY, OAR_REASONING_KEY))
    s = parse_section(config, NAME, OarGSettings)
    grpo = grpo_advantages(token_level_rewards, response_mask, index, config, epsilon)  # [B, T]
    saliency = found.payload[OAR_SALIENCY_KEY].to(device=grpo.device, dtype=torch.float32)  # [B, T]
    reasoning = found.payload[OAR_REASONING_KEY].to(device=grpo.device).bool() & response_mask.bool()  # [B, T]
    weights = bilevel_weights(saliency, reasoning, s.tau, s.beta, s.floor, s.sum_to_len).to(grpo.dtype)
    shaped = grpo * weights * response_mask.to(grpo.dtype)
    found.handoff["metrics"] = oar_g_metrics(grpo, shaped, weights, reasoning, found.payload[OAR_STATS_KEY])
    return shaped, shaped


def oar_g_metrics(grpo, shaped, weights, reasoning, stats) -> dict[str, float]:
    """`oar_g/*`: how many rollouts were reshaped, the weights' spread, that the advantage mass is kept."""
    rows = reasoning.any(dim=1)  # [B]
    w = weights[reasoning]
    mass = float(grpo[reasoning].abs().sum())
    stats = stats.float()  # [B, 3]: span found, marker found, seconds
    return {
        f"{NAME}/reshaped_frac": float(rows.float().mean()) if rows.numel() else 0.0,
        f"{NAME}/marker_frac": float(stats[:, 1].mean()) if stats.numel() else 0.0,
        f"{NAME}/weight_max": float(w.max()) if w.numel() else 1.0,
        f"{NAME}/weight_min": float(w.min()) if w.numel() else 1.0,
        f"{NAME}/boosted_frac": float((w > 1).float().mean()) if w.numel() else 0.0,
        f"{NAME}/mass_ratio": float(shaped[reasoning].abs().sum()) / mass if mass > 0 else 1.0,
        f"{NAME}/saliency_time_s": float(stats[:, 2].sum()),
    }


def check_config(config) -> None:
    """Refuse, at start-up, the actor set-ups the worker-side saliency does not support."""
    actor = config.actor_rollout_ref.actor
    strategy = str(actor.get("strategy", "fsdp"))
    if strategy not in ("fsdp", "fsdp2"):
        raise ValueError(f"algorithm.adv_estimator=oar_g supports the FSDP actor only, but actor_rollout_ref.actor."
                         f"strategy={strategy}: its input-gradient pass calls the HF model itself (the Megatron "
                         "capture hooks see the final norm, not the input embeddings). Use model_engine=dp.")
    sp = max(int(actor.get("ulysses_sequence_parallel_size", 1) or 1),
             int((actor.get("fsdp_config", None) or {}).get("ulysses_sequence_parallel_size", 1) or 1))
    if sp > 1:
        raise ValueError(f"algorithm.adv_estimator=oar_g does not support Ulysses sequence parallelism "
                         f"(actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp}): set it to 1")
    if bool(config.actor_rollout_ref.model.get("use_fused_kernels", False)):
        raise ValueError("algorithm.adv_estimator=oar_g needs the model's logits, which "
                         "actor_rollout_ref.model.use_fused_kernels=true does not return: set it to false")


SIGNAL = signals.TokenSignal(
    name=NAME, fields=(OAR_SALIENCY_KEY, OAR_REASONING_KEY, OAR_STATS_KEY),
    parse=lambda algorithm: parse_section(algorithm, NAME, OarGSettings), worker_flag=OAR_FLAG,
    missing_help=MISSING_HELP, check=check_config,
)
ESTIMATOR = compute_oar_g_advantage
