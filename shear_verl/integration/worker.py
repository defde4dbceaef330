"""Worker side: from captured response hidden states to per-token SHEAR weights, group by group.

Runs on each data-parallel rank at the end of the old-log-prob pass, on the device that holds the
hidden states, so only the weights (B x T floats) leave the worker (docs/method.md, "Cost at paper scale").
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from shear_verl.core import ShearStats, group_token_weights
from shear_verl.integration.fields import STATS_KEY, WEIGHTS_KEY  # noqa: F401 - re-exported
from shear_verl.integration.settings import ShearSettings

# A group's totals sit on its first row (the ShearStats counters, its wall time); per row: whether
# it kept the fallback weight, the rank that computed it and that rank's captured megabytes.
GROUP_COLUMNS = ("sinkhorn_solves", "candidate_pairs", "pruned_pairs", "dual_pruned_pairs", "capped_solves",
                 "mixed_groups", "n_bar_sum", "epsilon_raw_sum")
STATS_COLUMNS = (*GROUP_COLUMNS, "time_s", "fallback", "rank", "capture_mb")
COL = {name: i for i, name in enumerate(STATS_COLUMNS)}


def sequence_scores(rm_scores: torch.Tensor) -> torch.Tensor:
    """Outcome score per rollout = sum of its token-level scores, as verl's GRPO does. [b]"""
    if rm_scores.is_nested:
        return torch.stack([row.sum() for row in rm_scores.unbind()]).float()
    return rm_scores.float().sum(dim=-1)


def compute_batch_weights(
    hidden: Sequence[torch.Tensor],
    response_mask: Sequence[torch.Tensor],
    scores: torch.Tensor,
    uids: Sequence[str],
    settings: ShearSettings,
    device: torch.device | None = None,
    rank: int = 0,
    capture_mb: float = 0.0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SHEAR weights for every row of a rank's batch.

    Args:
        hidden: per row [L_i, H] response hidden states (verl's old_log_probs row convention).
        response_mask: per row [L_i]; only tokens with mask 1 take part (spec section 4).
        scores: [b] outcome scores; correct iff score > settings.correct_threshold.
        uids: per row GRPO group id. Every member of a group must be in this batch.
        device: where to compute (default: where the hidden states are).
        rank, capture_mb: the computing process's rank and the megabytes its capture held, copied
            to every row for the driver's per-rank metrics.
    Returns:
        weights: per row [L_i] float32 on the hidden states' device, 0 where the mask is 0.
        stats: [b, len(STATS_COLUMNS)] float32 on CPU.
    """
    b = len(hidden)
    if not (len(response_mask) == len(uids) == scores.shape[0] == b):
        raise ValueError(
            f"SHEAR worker got {b} hidden-state rows, {len(response_mask)} masks, {scores.shape[0]} "
            f"scores and {len(uids)} uids: they must be the same batch"
        )
    groups: dict[str, list[int]] = defaultdict(list)
    for row, uid in enumerate(uids):
        groups[str(uid)].append(row)

    weights: list[torch.Tensor] = [None] * b  # type: ignore[list-item]
    stats = torch.zeros(b, len(STATS_COLUMNS), dtype=torch.float32)
    for members in groups.values():
        t0 = time.perf_counter()
        target = device if device is not None else hidden[members[0]].device
        keep = [response_mask[r].to(device=target).bool() for r in members]  # [L_i]
        states = [hidden[r].to(device=target)[k] for r, k in zip(members, keep)]  # [T_i, H]
        correct = [bool(scores[r] > settings.correct_threshold) for r in members]
        group_stats = ShearStats()
        group_w = group_token_weights(states, correct, settings.engine, stats=group_stats)  # [T_i]
        for r, k, w in zip(members, keep, group_w):
            full = torch.zeros(k.shape[0], dtype=torch.float32, device=w.device)  # [L_i]
            full[k] = w
            weights[r] = full.to(hidden[r].device)
        counts = [getattr(group_stats, name) for name in GROUP_COLUMNS]  # the ShearStats counters
        stats[members[0], : len(GROUP_COLUMNS)] = torch.tensor(counts, dtype=torch.float32)
        stats[members[0], COL["time_s"]] = time.perf_counter() - t0
        stats[members, COL["fallback"]] = float(group_stats.fallback_rollouts > 0)
    stats[:, COL["rank"]] = rank
    stats[:, COL["capture_mb"]] = capture_mb
    return weights, stats
