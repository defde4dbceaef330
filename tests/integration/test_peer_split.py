"""peer_split: LPT shares against the brute-force optimum, and the split weights (gloo, 2 and 3
processes) identical to the single-rank path. See split_worker.py."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shear_verl.integration.peer_split import balanced_partition, group_costs
from shear_verl.integration.worker import COL, GROUP_COLUMNS

WORKER = Path(__file__).with_name("split_worker.py")


def optimal_makespan(costs: list[int], k: int) -> int:
    """Brute force over every assignment of the groups to k shares (small inputs only)."""
    best = sum(costs)
    for assign in itertools.product(range(k), repeat=len(costs)):
        loads = [0] * k
        for c, p in zip(costs, assign):
            loads[p] += c
        best = min(best, max(loads))
    return best


cost_lists = st.lists(st.integers(0, 1000), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(costs=cost_lists, k=st.integers(1, 3))
def test_lpt_within_graham_bound_of_the_optimum(costs, k):
    named = {f"u{i}": c for i, c in enumerate(costs)}
    shares = balanced_partition(named, k)
    assert len(shares) == k
    assert sorted(u for s in shares for u in s) == sorted(named)  # every group in exactly one share
    makespan = max(sum(named[u] for u in s) for s in shares)
    opt = optimal_makespan(costs, k)
    assert makespan * 3 * k <= (4 * k - 1) * opt  # LPT <= (4/3 - 1/(3k)) OPT (Graham 1969)


@settings(max_examples=100, deadline=None)
@given(costs=cost_lists, k=st.integers(1, 4), data=st.data())
def test_partition_independent_of_arrival_order(costs, k, data):
    """Every peer must compute the same shares, whatever order it sees the groups in."""
    named = {f"u{i}": c for i, c in enumerate(costs)}
    order = data.draw(st.permutations(list(named)))
    assert balanced_partition({u: named[u] for u in order}, k) == balanced_partition(named, k)


def test_zero_cost_groups_spread_over_peers():
    shares = balanced_partition({f"u{i}": 0 for i in range(6)}, 3)
    assert [len(s) for s in shares] == [2, 2, 2]


def test_partition_refuses_no_peers():
    with pytest.raises(ValueError, match="0 ranks"):
        balanced_partition({"u": 1}, 0)


def test_group_costs_count_opposite_span_pairs():
    # span_len 4, stride 2: 10 tokens -> starts 0,2,4,6 (4 spans), 6 -> 0,2 (2), 4 -> 0 (1)
    from shear_verl.core.spans import span_starts

    assert [len(span_starts(n, 4, 2)) for n in (10, 6, 4)] == [4, 2, 1]
    costs = group_costs(["a", "a", "a", "b", "b"], [10, 6, 4, 10, 10], [True, False, False, True, True], 4, 2)
    assert costs == {"a": 4 * (2 + 1), "b": 0}


@pytest.mark.parametrize("world", [2, 3])
def test_split_weights_identical_to_single_rank(tmp_path, free_port, world):
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"rank{rank}.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for batch in zip(*ranks):
        uids = batch[0]["uids"]
        shares = [set(b["share"]) for b in batch]
        assert set().union(*shares) == set(uids) and sum(map(len, shares)) == len(set(uids))
        for rank, b in enumerate(batch):
            # the peer stashed its share's rows only
            assert all((n > 0) == (u in shares[rank]) for u, n in zip(uids, b["stash_rows"]))
            # every peer ends with every row's weights, bit for bit those of the single-rank path
            for got, want in zip(b["weights"], batch[0]["single_weights"]):
                assert torch.equal(got, want)
            group_cols = [COL[c] for c in GROUP_COLUMNS] + [COL["fallback"]]
            assert torch.equal(b["stats"][:, group_cols], batch[0]["single_stats"][:, group_cols])
            for u in shares[rank]:  # the group's stats row names the peer that computed it
                assert b["stats"][uids.index(u), COL["rank"]].item() == rank
