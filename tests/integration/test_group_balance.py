"""Group-aware batch balancing: whole GRPO groups per data-parallel rank, balanced workload."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shear_verl.integration.balance import (
    GroupSplitError,
    assert_groups_whole,
    group_balanced_partitions,
    uid_of_key,
)


@st.composite
def batches(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.sampled_from([2, 4, 8]))
    groups_per_rank = draw(st.integers(1, 4))
    n_groups = k * groups_per_rank
    uids, loads = [], []
    for g in range(n_groups):
        for _ in range(n):
            uids.append(f"u{g}")
            loads.append(draw(st.integers(1, 5000)))
    order = draw(st.permutations(range(len(uids))))
    return [uids[i] for i in order], [loads[i] for i in order], k


@settings(max_examples=150, deadline=None)
@given(batches())
def test_partitions_keep_groups_whole_and_equal_size(batch):
    uids, loads, k = batch
    parts = group_balanced_partitions(uids, loads, k)
    assert sorted(r for p in parts for r in p) == list(range(len(uids)))
    assert {len(p) for p in parts} == {len(uids) // k}
    owner = {}
    for rank, part in enumerate(parts):
        for r in part:
            assert owner.setdefault(uids[r], rank) == rank
    # contiguous dispatch of the reordered batch keeps groups whole
    assert_groups_whole([uids[r] for p in parts for r in p], k)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_balance_is_within_lpt_bound(batch):
    """Largest-first greedy: max load <= mean load + the largest single group load."""
    uids, loads, k = batch
    parts = group_balanced_partitions(uids, loads, k)
    part_loads = [sum(loads[r] for r in p) for p in parts]
    group_load = {}
    for u, w in zip(uids, loads):
        group_load[u] = group_load.get(u, 0) + w
    assert max(part_loads) <= sum(loads) / k + max(group_load.values())


def test_balances_better_than_arrival_order():
    # 4 ranks, 8 groups of 2: heavy groups arrive first; contiguous order would put both on rank 0
    uids = [f"g{g}" for g in range(8) for _ in range(2)]
    loads = [100 if g < 2 else 1 for g in range(8) for _ in range(2)]
    parts = group_balanced_partitions(uids, loads, 4)
    part_loads = sorted(sum(loads[r] for r in p) for p in parts)
    assert part_loads == [4, 4, 202, 202]  # each heavy group shares a rank with one light group


def test_padding_rows_fill_gaps_and_may_split():
    # verl pads with rows whose uid starts with "pad"; 3 groups of 2 + 2 pads over 4 ranks
    uids = ["a", "a", "b", "b", "c", "c", "padx", "padx"]
    parts = group_balanced_partitions(uids, [1] * 8, 4)
    assert all(len(p) == 2 for p in parts)
    assert_groups_whole([uids[r] for p in parts for r in p], 4)


def test_unsplittable_batch_names_the_setting():
    uids = ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # 3 groups of 4 over 2 ranks of 6 rows
    with pytest.raises(GroupSplitError, match="train_batch_size"):
        group_balanced_partitions(uids, [1] * 12, 2)


def test_split_group_is_detected():
    with pytest.raises(GroupSplitError, match="split across data-parallel ranks"):
        assert_groups_whole(["a", "b", "b", "a"], 2)


def test_uid_of_key_matches_verl_key_format():
    assert uid_of_key("3f2a_1_0") == "3f2a"
    assert uid_of_key("my_uid_with_underscores_7_2") == "my_uid_with_underscores"
    with pytest.raises(ValueError):
        uid_of_key("nounderscore")
