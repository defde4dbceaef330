"""SHEAR token weights of one GRPO group (Chen et al. 2026, arXiv 2604.23318, Algorithm 1 lines 1-13)
and their use (line 17).

One function per step of Algorithm 1 (docs/method.md, "Algorithm 1"):
  1. opposing set        -> ``spans.Side`` (the correct and the incorrect rollouts face each other)
  2. spans               -> ``spans.span_starts``
  3. span distance       -> ``span_distances.opposing_span_minima`` (min over all opposing spans)
  4. normalisation       -> ``group_mean_norm`` / ``normalize_rollout``
  5. token weight        -> ``spans.pool_spans_to_tokens``
  6. advantage           -> ``shear_advantages``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shear_verl.core.config import ShearConfig, ShearStats
from shear_verl.core.ot import check_backend, default_backend
from shear_verl.core.span_distances import opposing_span_minima
from shear_verl.core.spans import Side, pool_spans_to_tokens

# Metrics measured in hidden-state units (divided by the group's mean norm). MMD with the median
# bandwidth and the cosine distance are scale-free already, so they are left as they are.
_METRICS_WITH_UNITS = ("sinkhorn", "w1", "chamfer")


def validate_group(hidden_states: Sequence[torch.Tensor], correct: Sequence[bool]) -> list[torch.Tensor]:
    """Check one group's inputs; raise ValueError naming the rollout and the problem."""
    if len(hidden_states) != len(correct):
        raise ValueError(
            f"SHEAR got {len(hidden_states)} hidden-state tensors but {len(correct)} correctness flags; "
            "pass one flag per rollout of the group"
        )
    states = list(hidden_states)
    for i, h in enumerate(states):
        if not isinstance(h, torch.Tensor) or not h.is_floating_point():
            raise ValueError(f"rollout {i}: hidden states must be a floating-point torch.Tensor, got {type(h).__name__}"
                             + (f" of dtype {h.dtype}" if isinstance(h, torch.Tensor) else ""))
        if h.dim() != 2:
            raise ValueError(f"rollout {i}: hidden states must be 2-D [T, d], got shape {tuple(h.shape)}")
        if h.shape[1] != states[0].shape[1]:
            raise ValueError(
                f"rollout {i}: hidden size d={h.shape[1]} differs from rollout 0's d={states[0].shape[1]}; "
                "all rollouts of a group must come from the same layer of the same model"
            )
        if h.device != states[0].device:
            raise ValueError(f"rollout {i}: on {h.device} but rollout 0 is on {states[0].device}; move the group to one device")
    bad = [i for i, h in enumerate(states) if h.numel() and not bool(torch.isfinite(h).all())]
    if bad:
        raise ValueError(f"rollout {bad[0]}: hidden states contain NaN or inf (rollouts with non-finite values: {bad})")
    return states


def group_mean_norm(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """n_bar = mean over all tokens of all rollouts of ||h_t||_2 (Algorithm 1 lines 8-9). Scalar tensor."""
    total = sum(torch.linalg.vector_norm(h, dim=1).sum() for h in states)
    count = sum(h.shape[0] for h in states)
    return total / max(count, 1)


def normalize_rollout(weights: torch.Tensor) -> torch.Tensor:
    """Ablation normalisation: rescale one rollout's weights to mean 1 (all-zero weights become ones)."""
    mean = weights.mean()
    return weights / mean if bool(mean > 0) else torch.ones_like(weights)


def group_token_weights(hidden_states: Sequence[torch.Tensor], correct: Sequence[bool], cfg: ShearConfig,
                        stats: ShearStats | None = None, backend: str | None = None) -> list[torch.Tensor]:
    """SHEAR weights w_t^(i) of every response token of one GRPO group (Algorithm 1 lines 1-13).

    hidden_states: G tensors [T_i, d] (the counted response tokens, in order), on one device;
    correct: G bools. Returns G float32 tensors [T_i] on that device. Rollouts without a non-empty
    opposing rollout keep plain GRPO (all ones). ``stats``, if given, is added to. ``backend``: where the
    tiled solver's loops run, "numba" (host memory) or "torch" (any device); None picks, once here, the
    faster one for the states' device (``ot.backend.default_backend``).
    """
    states = validate_group(hidden_states, correct)
    if states:
        backend = check_backend(default_backend(states[0]) if backend is None else backend, states[0])
    flags = [bool(c) for c in correct]
    stats = stats if stats is not None else ShearStats()
    stats.groups += 1
    stats.rollouts += len(states)
    dtype = getattr(torch, cfg.compute_dtype)
    h = [x.to(dtype) for x in states]  # [T_i, d]
    out = [torch.ones(x.shape[0], dtype=torch.float32, device=x.device) for x in states]
    side_members = [[i for i, x in enumerate(h) if flags[i] == outcome and x.shape[0] > 0] for outcome in (True, False)]
    if not all(side_members):
        stats.fallback_rollouts += len(states)
        return out
    stats.mixed_groups += 1

    n_bar = group_mean_norm(h)
    scale = float(n_bar) if bool(n_bar > 0) else 1.0
    # Distances are divided by n_bar (step 4). A relative eps is in units of n_bar: Sinkhorn on h / n_bar
    # with eps is Sinkhorn on h with eps * n_bar (the same plan), its value divided by n_bar, so the
    # states are not copied to be scaled.
    epsilon = cfg.epsilon * scale if cfg.epsilon_mode == "relative" else cfg.epsilon
    stats.n_bar_sum += float(n_bar)
    stats.epsilon_raw_sum += epsilon
    post_scale = 1.0 / scale if cfg.metric in _METRICS_WITH_UNITS else 1.0

    good, bad = (Side.build(m, [h[i] for i in m], cfg) for m in side_members)
    min_good, min_bad = opposing_span_minima(good, bad, cfg, epsilon, stats, backend)  # [S_good], [S_bad]
    for side, minima in ((good, min_good), (bad, min_bad)):
        for pos, i in enumerate(side.members):
            span_d = minima[side.first[pos]:side.first[pos] + len(side.starts[pos])] * post_scale  # [K_i]
            w = pool_spans_to_tokens(span_d, side.starts[pos], side.sizes[pos], h[i].shape[0], cfg.pooling)  # [T_i]
            if cfg.normalization == "rollout":
                w = normalize_rollout(w)
            out[i] = w.to(torch.float32)
    return out


def shear_advantages(advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A_t^(i) = A_i * w_t^(i) (Algorithm 1 line 17), elementwise on [B, T]; weights >= 0 keep the sign."""
    if advantages.shape != weights.shape:
        raise ValueError(
            f"shear_advantages: advantages {tuple(advantages.shape)} and token weights {tuple(weights.shape)} "
            "must have the same [B, T] shape"
        )
    return advantages * weights.to(advantages.dtype)
