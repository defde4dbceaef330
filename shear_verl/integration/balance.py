"""Batch balancing that keeps each GRPO group on one data-parallel rank.

SHEAR compares a rollout with the *other* rollouts of its group, and the weights are computed on
the rank that holds the hidden states, so a group split across ranks would silently lose its
opposing set. verl's balancer (`get_seqlen_balanced_partitions` over single samples) may split
groups; here whole groups are the items, balanced by their total workload.
"""

from __future__ import annotations

from collections.abc import Sequence

PAD_UID_PREFIX = "pad"  # verl's upsample_batch_to_divisible_size gives pad rows uid "pad<hex>"


class GroupSplitError(ValueError):
    """The batch cannot be divided into equal data-parallel shards of whole groups."""


def split_key(key: str) -> tuple[str, str, int]:
    """(uid, session_id, output index) of a verl V1 batch key "{uid}_{session_id}_{index}"
    (see compute_advantage_for_multi_trajectories)."""
    parts = key.rsplit("_", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"unexpected verl batch key {key!r}: expected '<uid>_<session>_<index>'")
    return parts[0], parts[1], int(parts[2])


def uid_of_key(key: str) -> str:
    return split_key(key)[0]


def group_balanced_partitions(
    uids: Sequence[str], workloads: Sequence[float], k_partitions: int
) -> list[list[int]]:
    """Split rows into `k_partitions` equal-size parts of whole groups, balancing workload.

    Rows of verl's padding uid are no-op samples and may go anywhere, so they fill the gaps. Groups
    are placed largest first onto the lightest part with room (LPT with capacities); raises
    GroupSplitError if some group fits nowhere.
    """
    n = len(uids)
    if len(workloads) != n:
        raise ValueError(f"{n} uids but {len(workloads)} workloads")
    if k_partitions <= 0 or n % k_partitions:
        raise GroupSplitError(f"{n} rows cannot be split into {k_partitions} equal data-parallel shards")
    capacity = n // k_partitions
    groups: dict[str, list[int]] = {}
    pads: list[int] = []
    for row, uid in enumerate(uids):
        (pads.append(row) if str(uid).startswith(PAD_UID_PREFIX) else groups.setdefault(str(uid), []).append(row))

    items = [(len(rows), sum(workloads[r] for r in rows), rows) for rows in groups.values()]
    items.sort(key=lambda it: (-it[0], -it[1]))
    items += [(1, workloads[r], [r]) for r in pads]
    parts: list[list[int]] = [[] for _ in range(k_partitions)]
    loads = [0.0] * k_partitions
    for size, load, rows in items:
        fitting = [p for p in range(k_partitions) if len(parts[p]) + size <= capacity]
        if not fitting:
            sizes = sorted({len(r) for r in groups.values()})
            raise GroupSplitError(
                f"SHEAR keeps every GRPO group on one data-parallel rank, but {len(groups)} groups "
                f"(sizes {sizes}) plus {len(pads)} padding rows cannot fill {k_partitions} shards of "
                f"{capacity} rows with whole groups. Make data.train_batch_size a multiple of the "
                f"actor's data-parallel size ({k_partitions}) so each rank gets whole groups, or "
                "use fewer data-parallel ranks."
            )
        best = min(fitting, key=lambda p: (loads[p], p))
        parts[best].extend(rows)
        loads[best] += load
    return [sorted(p) for p in parts]


def assert_groups_whole(uids: Sequence[str], k_partitions: int) -> None:
    """Raise GroupSplitError if contiguous equal sharding would split a (non-padding) group."""
    n = len(uids)
    size = n // k_partitions if k_partitions else n
    owner: dict[str, int] = {}
    for row, uid in enumerate(uids):
        uid = str(uid)
        if uid.startswith(PAD_UID_PREFIX):
            continue
        shard = row // size if size else 0
        if owner.setdefault(uid, shard) != shard:
            raise GroupSplitError(
                f"GRPO group {uid!r} is split across data-parallel ranks {owner[uid]} and {shard}; "
                "SHEAR needs whole groups per rank. Keep trainer.balance_batch=true (shear-verl then "
                "balances whole groups) and make data.train_batch_size a multiple of the actor's "
                "data-parallel size."
            )
