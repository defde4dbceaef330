"""SHEAR's weight work of one data-parallel rank, split among the ranks of its model-parallel group.

Every peer of a data-parallel rank (its Ulysses SP group on FSDP; its TP x CP group on Megatron's
last pipeline stage) receives the same batch and ends the forward with the same un-sharded hidden
states (verl's own SP / CP gathers), but verl collects outputs from one of them. Rather than that
rank running every group while its peers wait, each peer keeps only the rows of its share of the
groups, computes their weights on its own device, and one all-reduce of zero-padded buffers
brings every row's weights and stats rows to all peers (each row has exactly one non-zero
contributor, so the sum is exact: the weights are those of the single-rank path, bit for bit).

Shares are whole groups (SHEAR compares rollouts within a group), balanced by the engine's cost:
the span pairs of a group, sum over opposite-outcome rollout pairs of n_spans_i * n_spans_j
(every pair of spans is one candidate Sinkhorn problem, Algorithm 1 steps 3-5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

from shear_verl.core.spans import span_starts
from shear_verl.integration.settings import ShearSettings
from shear_verl.integration.worker import STATS_COLUMNS, compute_batch_weights


class Peers(NamedTuple):
    """The ranks that share one data-parallel rank's weight work."""

    group: object | None  # torch.distributed process group; None: this rank alone
    rank: int  # this process's rank in `group`
    size: int
    has_rows: bool  # False on ranks that hold no hidden states (Megatron's earlier pipeline stages)
    collects: bool  # verl collects the outputs from this rank


def group_costs(uids: Sequence[str], n_tokens: Sequence[int], correct: Sequence[bool],
                span_len: int, stride: int) -> dict[str, int]:
    """Estimated SHEAR cost of each group: its span pairs, sum_{i correct, j incorrect} K_i * K_j."""
    spans: dict[str, list[int]] = {}
    for uid, n, c in zip(uids, n_tokens, correct, strict=True):
        spans.setdefault(str(uid), [0, 0])[0 if c else 1] += len(span_starts(int(n), span_len, stride))
    # sum_i sum_j K_i K_j over opposite pairs = (sum K_correct) * (sum K_incorrect)
    return {uid: good * bad for uid, (good, bad) in spans.items()}


def balanced_partition(costs: Mapping[str, float], k: int) -> list[list[str]]:
    """Groups into k shares, largest cost first onto the least loaded share (LPT: max share <= 4/3 of
    the optimum). Ties go to the share with fewer groups, so zero-cost (fallback) groups spread too.
    Deterministic: every peer computes the same partition from the same batch."""
    if k < 1:
        raise ValueError(f"cannot split SHEAR work among {k} ranks")
    shares: list[list[str]] = [[] for _ in range(k)]
    loads = [0.0] * k
    for uid in sorted(costs, key=lambda u: (-costs[u], u)):
        best = min(range(k), key=lambda p: (loads[p], len(shares[p]), p))
        shares[best].append(uid)
        loads[best] += costs[uid]
    return shares


def share_of(uids: Sequence[str], n_tokens: Sequence[int], correct: Sequence[bool], settings: ShearSettings,
             peers: Peers) -> set[str]:
    """The groups whose weights this peer computes."""
    if peers.size == 1:
        return {str(u) for u in uids}
    costs = group_costs(uids, n_tokens, correct, settings.engine.span_len, settings.engine.stride)
    return set(balanced_partition(costs, peers.size)[peers.rank])


def keep_share(rows: torch.Tensor, uids: Sequence[str], share: set[str]) -> torch.Tensor:
    """nested [b, L_i, H] -> the same rows with those outside `share` cut to length 0."""
    kept = [r if str(u) in share else r[:0] for r, u in zip(rows.unbind(), uids, strict=True)]
    return torch.nested.as_nested_tensor(kept, layout=torch.jagged)


def comm_device(group, fallback: torch.device) -> torch.device:
    """Where the exchange buffer must live: host memory for gloo, the computing device otherwise
    (NCCL and other accelerator backends take tensors on the current device)."""
    backend = torch.distributed.get_backend(group)
    return torch.device("cpu") if backend == torch.distributed.Backend.GLOO else fallback


def exchange(weights: Sequence[torch.Tensor | None], stats: torch.Tensor, lengths: Sequence[int], group,
             device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every peer's rows, on every peer. weights: per row [L_i] where this peer computed the row,
    else None; stats: [b, S] with zeros outside this peer's rows. One all-reduce (sum) of one
    zero-padded float32 buffer; returns the weights on `device`, the stats on CPU (as the worker)."""
    b = len(lengths)
    flat = torch.zeros(sum(lengths) + stats.numel(), dtype=torch.float32, device=comm_device(group, device))
    offset = 0
    for w, n in zip(weights, lengths, strict=True):
        if w is not None:
            flat[offset:offset + n] = w
        offset += n
    flat[offset:] = stats.reshape(-1)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
    rows = [t.to(device) for t in torch.split(flat[:offset], list(lengths))]  # [L_i]
    return rows, flat[offset:].reshape(b, len(STATS_COLUMNS)).cpu()


def split_batch_weights(hidden: Sequence[torch.Tensor], response_mask: Sequence[torch.Tensor], scores: torch.Tensor,
                        uids: Sequence[str], settings: ShearSettings, share: set[str], peers: Peers,
                        device: torch.device | None = None, capture_mb: float = 0.0,
                        release: Callable[[], None] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`compute_batch_weights` on this peer's share, then the exchange: every row's weights [L_i]
    and stats [b, S], as the single-rank path gives them. hidden rows outside `share` are not read
    (they may be empty); `release` is called once the share's weights exist, for the caller to drop
    the captured rows before the exchange. Collective over peers.group."""
    mine = [r for r, u in enumerate(uids) if str(u) in share]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    part_w, part_stats = compute_batch_weights(
        hidden=[hidden[r] for r in mine], response_mask=[response_mask[r] for r in mine], scores=scores[mine],
        uids=[str(uids[r]) for r in mine], settings=settings, device=device, rank=rank, capture_mb=capture_mb,
    )
    del hidden
    if release is not None:
        release()
    if peers.size == 1:
        return part_w, part_stats
    weights: list[torch.Tensor | None] = [None] * len(uids)
    stats = torch.zeros(len(uids), len(STATS_COLUMNS), dtype=torch.float32)
    for r, w, s in zip(mine, part_w, part_stats):
        weights[r], stats[r] = w, s
    target = device if device is not None else (part_w[0].device if part_w else torch.device("cpu"))
    return exchange(weights, stats, [m.shape[0] for m in response_mask], peers.group, target)
